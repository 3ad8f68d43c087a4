"""``gpu_memory_gib`` end to end: a GPU budget per worker that forces layers into host
records gives the tokens of the unbudgeted in-process engine (through a real 2-worker
launch and through `generate`), the plan says which layers are offloaded and the workers
agree with it, and bad values are refused naming the setting.

Workers run on the CPU; their offloaded layers run the kernels in Triton's interpreter
(TRITON_INTERPRET=1, inherited by the worker processes). The budgets are computed from the
planner's own figures, so they keep forcing offload if the reserve formula changes.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from pipeline_fixtures import TINY, cluster, read_log  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from dejavu.runtime.checkpoint import load_model, save_model  # noqa: E402
from dejavu.runtime.model import OPTModel  # noqa: E402
from dejavu.runtime.opt_config import OPTConfig  # noqa: E402
from dejavu.runtime.sampling import SamplingParams  # noqa: E402
from dejavu.runtime.settings import SettingsError, load_settings, make_settings  # noqa: E402
from dejavu.runtime.weight_store import GIB  # noqa: E402
from dejavu.scheduler.chat import format_stats  # noqa: E402
from dejavu.scheduler.engine import Engine  # noqa: E402
from dejavu.scheduler.planner import (  # noqa: E402
    PlanError,
    embed_bytes,
    layer_bytes,
    offload_reserved_bytes,
    plan_layers,
)
from dejavu.scheduler.zmq_client import PipelineConnection  # noqa: E402

# The offloaded layers here run on the CPU, which takes Triton's interpreter; with CUDA the
# interpreter is off (test_offload.py runs the offload path on the GPU instead).
CPU_KERNELS = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="CPU-interpreted kernels; test_offload.py covers CUDA")
SLOTS, MAX_LEN = 4, 32
PROMPTS = [[5, 6, 7], [9, 8]]
# logprobs=1: each token's log-probability comes back, so the comparison sees the numbers,
# not only the argmax.
GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=1)
# fp16 logits from the kernels (fp32 accumulation) against torch's fp16 matmuls.
LOGPROB_TOL = 2e-2


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    model = OPTModel(TINY)
    model.init_weights(torch.Generator().manual_seed(0), std=0.2)
    return save_model(model, tmp_path_factory.mktemp("tiny16"), dtype=torch.float16)


@pytest.fixture(scope="module")
def reference(tiny16):
    """The in-process engine, no budget: every layer resident and dense."""
    engine = Engine(load_model(tiny16, dtype=torch.float16), max_batch=SLOTS, max_len=MAX_LEN)
    return engine.run(PROMPTS, GREEDY)


def first_worker_budget(resident_layers: int, kv_inputs: bool = False) -> float:
    """GiB that leave worker 0 of two (layers [0, 2)) exactly ``resident_layers`` layers
    resident; worker 1 (smaller LM head than embeddings) keeps at most one more. A dense
    run keeps no attention inputs (``kv_inputs``)."""
    fixed = offload_reserved_bytes(TINY, 2, SLOTS, MAX_LEN, 2, kv_inputs=kv_inputs) + \
        embed_bytes(TINY, 2)
    return (fixed + resident_layers * layer_bytes(TINY, 2) + 1) / GIB


@CPU_KERNELS
@pytest.mark.parametrize("resident", [1, 0], ids=["half-offloaded", "all-offloaded"])
def test_budgeted_launch_equals_the_unbudgeted_engine(tiny16, reference, resident):
    budget = first_worker_budget(resident)
    plan = plan_layers(TINY, 2, dtype_bytes=2, slots=SLOTS, max_len=MAX_LEN,
                       gpu_budget=int(budget * GIB), kv_inputs=False)
    planned = [s.offloaded for s in plan.stages]
    assert planned[0] == 2 - resident and planned[1] >= 1  # both workers offload
    with cluster(tiny16, 2, dtype="float16", slots=SLOTS, max_len=MAX_LEN,
                 gpu_memory_gib=budget) as c, PipelineConnection(c.address) as conn:
        got = conn.run(PROMPTS, GREEDY)
        health = conn.health()
        log = read_log(c)
    assert [g.tokens for g in got] == [r.tokens for r in reference]
    for g, r in zip(got, reference, strict=True):
        assert max(abs(a - b) for a, b in zip(g.logprobs, r.logprobs, strict=True)) \
            < LOGPROB_TOL
    # The workers offloaded what the plan said, and their layers really read host rows.
    assert [w.offloaded_layers for w in health.workers] == planned
    assert all(w.host_bytes > 0 and w.expected_paged_per_token > 0 for w in health.workers)
    assert len(health.paged_bytes) == 2 and all(b > 0 for b in health.paged_bytes)
    stats = format_stats(health, {"tokens": 4, "seconds": 1.0},
                         SimpleNamespace(turns=[], dropped=0, max_len=MAX_LEN))  # chat /stats
    assert f"offloaded layers per worker: {planned[0]}, {planned[1]}; bytes paged" in stats
    # The printed plan and the workers' reports state it.
    assert f"({2} layers: {resident} resident, {2 - resident} offloaded" in log
    assert f"worker 0: {resident} layer(s) resident, {2 - resident} offloaded" in log
    assert "expected host bytes read per token" in log


def test_the_plan_offloads_the_last_layers_that_do_not_fit():
    opt30b = OPTConfig(hidden_size=7168, num_hidden_layers=48, ffn_dim=28672,
                       num_attention_heads=56, word_embed_proj_dim=7168)
    plan = plan_layers(opt30b, 4, dtype_bytes=2, slots=8, max_len=160, gpu_budget=8 * GIB)
    spans = plan.spans()
    assert spans[0].start == 0 and spans[-1].stop == 48 and plan.offload
    layer = layer_bytes(opt30b, 2)
    for s in plan.stages:
        resident = len(s.layers) - s.offloaded
        assert 0 < s.offloaded < len(s.layers)
        assert s.memory_bytes <= 8 * GIB < s.memory_bytes + layer  # one more would not fit
        assert s.host_bytes == s.offloaded * layer
        assert f"{resident} resident, {s.offloaded} offloaded" in plan.describe()
    # A budget that holds everything offloads nothing; the budget is a GPU one.
    roomy = plan_layers(opt30b, 4, dtype_bytes=2, slots=8, max_len=160, gpu_budget=40 * GIB)
    assert [s.offloaded for s in roomy.stages] == [0, 0, 0, 0]
    assert "GPU budget 40.000 GiB" in roomy.describe()


@pytest.mark.parametrize("kv_inputs", [True, False])
def test_the_worker_offloads_what_the_planner_predicts(tiny16, kv_inputs):
    """The worker's fit (runtime/offload.py on the loaded span) and the plan agree, at
    every budget from 'everything offloaded' to 'nothing offloaded', whether steps may
    skip heads (the cache keeps attention inputs) or not."""
    from dejavu.runtime.offload import fit_gib

    for resident in range(3):
        budget = first_worker_budget(resident, kv_inputs)
        plan = plan_layers(TINY, 2, dtype_bytes=2, slots=SLOTS, max_len=MAX_LEN,
                           gpu_budget=int(budget * GIB), kv_inputs=kv_inputs)
        for stage in plan.stages:
            model = load_model(tiny16, layers=stage.layers, dtype=torch.float16)
            offloaded, _ = fit_gib(model, budget, device="cpu", slots=SLOTS, max_len=MAX_LEN,
                                   kv_inputs=kv_inputs)
            assert len(offloaded) == stage.offloaded, (resident, stage)
            assert offloaded == list(stage.layers)[len(stage.layers) - stage.offloaded:]


def test_a_run_that_keeps_every_head_reserves_no_attention_inputs():
    """Lazy K/V stores each position's attention input beside its K and V (and a bit per
    head): half the K/V cache again, reserved only where a step may skip heads. At the
    OPT-13B shape with 8 slots of 512 positions (bench_e2e's) that is 1.57 GiB: two more
    resident layers of a 14 GiB budget."""
    opt13b = OPTConfig(hidden_size=5120, num_hidden_layers=40, ffn_dim=20480,
                       num_attention_heads=40, word_embed_proj_dim=5120)
    kept, lazy = (offload_reserved_bytes(opt13b, 40, 8, 512, 2, kv_inputs=k)
                  for k in (False, True))
    assert lazy - kept == 40 * (8 * 512 * 5120 * 2 + 8 * 40 * 512)
    off = {k: plan_layers(opt13b, 1, dtype_bytes=2, slots=8, max_len=512,
                          gpu_budget=14 * GIB, kv_inputs=k).stages[0].offloaded
           for k in (False, True)}
    assert (off[False], off[True]) == (26, 28)


@CPU_KERNELS
def test_generate_with_a_budget_equals_generate_without(tiny16):
    from dejavu.tools.cli import app

    args = ["generate", "--model", str(tiny16), "--dtype", "float16", "--prompt-ids",
            "9,8,7,6,5", "--max-new-tokens", "5", "--json"]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0, plain.output
    # Room for the embeddings/head, the reserve and one layer of four.
    fixed = offload_reserved_bytes(TINY, 4, 1, 10, 2, kv_inputs=False) + embed_bytes(TINY, 2)
    budget = (fixed + layer_bytes(TINY, 2) + 1) / GIB
    offl = CliRunner().invoke(app, args + ["--gpu-memory-gib", repr(budget)])
    assert offl.exit_code == 0, offl.output
    want, got = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (plain, offl))
    assert got["tokens"] == want["tokens"]
    assert got["offload"]["offloaded_layers"] >= 2
    assert got["offload"]["host_bytes_read"] > 0
    too_small = CliRunner().invoke(app, args + ["--gpu-memory-gib", "0.00001"])
    assert too_small.exit_code == 2
    assert "gpu_memory_gib" in too_small.output and "raise it" in too_small.output


@pytest.mark.parametrize("overrides, needles", [
    ({"pipeline.gpu_memory_gib": 0.0}, ["--gpu-memory-gib", "gpu_memory_gib = 0.0",
                                        "out of range", "(0.0, "]),
    ({"pipeline.gpu_memory_gib": -1}, ["gpu_memory_gib = -1", "out of range"]),
    ({"pipeline.gpu_memory_gib": math.nan}, ["gpu_memory_gib = nan", "finite"]),
    ({"pipeline.gpu_memory_gib": "8"}, ["gpu_memory_gib = '8'", "wrong type"]),
    ({"pipeline.gpu_memory_gib": 8.0}, ["gpu_memory_gib = 8.0", "dtype", "float16",
                                        "\"float32\""]),
    ({"sparsity.selector": "random", "sparsity.mlp_density": 0.1},
     ["selector = \"random\"", "head_density"]),
    ({"sparsity.selector": "oracle"}, ["selector = 'oracle'", "'predictors', 'random'"]),
])
def test_bad_budget_and_selector_settings_name_the_key(overrides, needles):
    with pytest.raises(SettingsError) as info:
        load_settings(None, overrides)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_bad_budget_in_settings_and_a_plan_that_cannot_hold_the_cache(tiny16):
    # Validated once, where the settings are read; the pipeline config carries them whole.
    with pytest.raises(SettingsError, match="gpu_memory_gib.*float16"):
        make_settings({"model.dtype": "float32", "pipeline.gpu_memory_gib": 8.0})
    with pytest.raises(SettingsError, match="gpu_memory_gib = 0"):
        make_settings({"model.dtype": "float16", "pipeline.gpu_memory_gib": 0})
    with pytest.raises(SettingsError, match="selector"):
        make_settings({"sparsity.selector": "random", "sparsity.mlp_density": 0.5})
    fine = load_settings(None, {"pipeline.gpu_memory_gib": 2.5, "model.dtype": "bfloat16"})
    assert fine.pipeline.gpu_memory_gib == 2.5
    with pytest.raises(PlanError, match=r"gpu_memory_gib = .*worker of layers \[0, 2\).*"
                                        r"KV cache of 4 slots x 32 positions"):
        plan_layers(TINY, 2, dtype_bytes=2, slots=SLOTS, max_len=MAX_LEN, gpu_budget=1000)
    # Without gpu_memory_gib a memory budget still refuses, and says how to offload.
    with pytest.raises(PlanError, match="set gpu_memory_gib"):
        plan_layers(TINY, 2, dtype_bytes=2, budgets=[1000, 1000])
