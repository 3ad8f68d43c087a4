"""Lookahead across workers (workers/ahead.py), real processes on the CPU: a stage sends
the next stage's first selection ahead of its activations, the next stage uses it (and,
when that layer is offloaded, starts reading its rows on arrival). Tokens equal the
in-process engine's with lookahead on and off, with 2 and 3 workers; the workers' stats
count the selections used and wasted and say how busy each stage was.
"""

from __future__ import annotations

import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():  # offloaded layers run the kernels, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pipeline_fixtures import (  # noqa: E402
    GREEDY,
    PROMPTS,
    TINY,
    add_predictors,
    cluster,
    make_tiny_model,
    wait_until,  # noqa: E402
)
from test_offload_pipeline import CPU_KERNELS, MAX_LEN, SLOTS  # noqa: E402  # noqa: E402
from test_offload_pipeline import GREEDY as GREEDY_LOGPROBS  # noqa: E402
from test_offload_pipeline import PROMPTS as SHORT_PROMPTS  # noqa: E402

from dejavu.runtime.checkpoint import load_model, save_model  # noqa: E402
from dejavu.runtime.model import OPTModel  # noqa: E402
from dejavu.runtime.predictors import PredictorSet  # noqa: E402
from dejavu.runtime.selection import PredictorSelector, SelectionConfig  # noqa: E402
from dejavu.runtime.sizes import stream_buffer_bytes  # noqa: E402
from dejavu.runtime.weight_store import GIB  # noqa: E402
from dejavu.scheduler.chat import format_stats  # noqa: E402
from dejavu.scheduler.engine import Engine  # noqa: E402
from dejavu.scheduler.planner import embed_bytes, offload_reserved_bytes  # noqa: E402
from dejavu.scheduler.serve.metrics import ServerMetrics  # noqa: E402
from dejavu.scheduler.zmq_client import PipelineConnection, _worker_stats  # noqa: E402

DENSITY = dict(mlp_density=0.3, head_density=0.5)


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("ahead") / "m")
    add_predictors(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def sparse_reference(sparse_model):
    model = load_model(sparse_model)
    preds = PredictorSet.load(sparse_model / "predictors", model)
    engine = Engine(model, max_batch=8, max_len=128,
                    selector=PredictorSelector(preds, SelectionConfig(**DENSITY)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: top-k ties break alike
    try:
        return [engine.generate(p, GREEDY).tokens for p in PROMPTS[:4]]
    finally:
        torch.set_num_threads(threads)


def stats_after_work(conn, workers: int, done=lambda stats: True):
    """Each worker's stats, from heartbeats that came after the work (they beat every
    0.3 s): the first that say every worker was busy and satisfy ``done``, or the last."""
    last = []

    def fresh():
        last[:] = [w.stats for w in conn.health().workers]
        return all(s is not None and s.busy_fraction > 0 for s in last) and done(last)

    wait_until(fresh, 5.0)
    assert all(s is not None for s in last), last
    return last


@pytest.mark.parametrize("workers,lookahead", [(2, True), (3, True), (2, False)])
def test_pipeline_with_lookahead_equals_the_sparse_engine(sparse_model, sparse_reference,
                                                          workers, lookahead):
    with cluster(sparse_model, workers, sparse=True, lookahead=lookahead, **DENSITY) as c, \
            PipelineConnection(c.address) as conn:
        # One request at a time: a batch computes the union of its rows' selections.
        got = [conn.run([p], GREEDY)[0].tokens for p in PROMPTS[:4]]
        steps = 4 * GREEDY.max_new_tokens  # one prefill step and 11 decode steps each
        stats = stats_after_work(conn, workers,
                                 lambda st: not lookahead or
                                 all(x.ahead_used >= steps for x in st[1:]))
        health = conn.health()
        text = format_stats(health, {"tokens": 1, "seconds": 1.0},
                            SimpleNamespace(turns=[], dropped=0, max_len=128))  # chat /stats
        metrics = ServerMetrics()
        # As the server's client reports workers (scheduler/zmq_client.py).
        metrics.observe_engine(True, [{"worker": w.index, "alive": True, **_worker_stats(w)}
                                      for w in health.workers], {})
        exported = metrics.render()
    assert "busy fraction per worker (last 10 s): " in text
    for k in range(workers):  # /metrics: one gauge per worker, within [0, 1]
        value = float(exported.split(f'dejavu_worker_busy_fraction{{worker="{k}"}} ')[1]
                      .split()[0])
        assert 0 < value <= 1
    assert 'dejavu_worker_prefetch{worker="1",kind="ahead",outcome="used"}' in exported
    assert got == sparse_reference
    for k, s in enumerate(stats):
        assert 0 < s.busy_fraction <= 1 and s.window_s > 0
        if k == 0 or not lookahead:  # the first stage has no stage before it
            assert (s.ahead_used, s.ahead_wasted) == (0, 0), (k, s)
        else:  # every step of this stage ran on the selection sent ahead
            assert s.ahead_used >= steps and s.ahead_wasted == 0, (k, s)


@CPU_KERNELS
@pytest.mark.parametrize("lookahead,mlp_source", [(True, "lookahead"), (False, "lookahead"),
                                                  (True, "mlp_in")])
def test_offloaded_next_stage_prefetches_what_the_stage_before_selected(tmp_path,
                                                                        lookahead, mlp_source):
    """Worker 1's first layer is offloaded: with lookahead its rows are gathered when the
    selection arrives, and the step uses that gather; same tokens as the engine. With MLP
    predictors reading each layer's own MLP input ("mlp_in") only the heads travel ahead:
    the neurons are selected, and their rows requested, after the layer's attention (a
    neuron request on arrival would be wasted)."""
    from dejavu.runtime.build import build_stage, resolve
    from dejavu.runtime.settings import make_settings

    # Six layers, three per worker, all offloaded: more layers than the two stream slots,
    # so decode steps gather their rows (a slot no longer holds the layer whole).
    config = replace(TINY, num_hidden_layers=6)
    model = OPTModel(config)
    model.init_weights(torch.Generator().manual_seed(0), std=0.2)
    model_dir = save_model(model, tmp_path / "m16", dtype=torch.float16)
    add_predictors(model_dir, mlp_source=mlp_source)
    budget = (offload_reserved_bytes(config, 3, SLOTS, MAX_LEN, 2) + embed_bytes(config, 2)
              + stream_buffer_bytes(config, 2) + 1) / GIB
    settings = resolve(make_settings({"model.path": str(model_dir), "model.dtype": "float16",
                                      "sparsity.mlp_density": 0.3,
                                      "sparsity.head_density": 0.5,
                                      "sparsity.backend": "torch"}), True)
    engine = Engine.from_stage(build_stage(settings, slots=SLOTS, max_len=MAX_LEN).stage)
    want = [engine.generate(p, GREEDY_LOGPROBS).tokens for p in SHORT_PROMPTS]
    with cluster(model_dir, 2, dtype="float16", slots=SLOTS, max_len=MAX_LEN,
                 gpu_memory_gib=budget, sparse=True, lookahead=lookahead, backend="torch",
                 **DENSITY) as c, PipelineConnection(c.address) as conn:
        got = [conn.run([p], GREEDY_LOGPROBS)[0].tokens for p in SHORT_PROMPTS]
        health = conn.health()
        decode_steps = len(SHORT_PROMPTS) * (GREEDY_LOGPROBS.max_new_tokens - 1)
        stats = stats_after_work(conn, 2, lambda st: not lookahead or
                                 st[1].prefetch_used >= 2 * decode_steps)
    assert [w.offloaded_layers for w in health.workers] == [3, 3]
    assert got == want
    if lookahead:
        # Layers 3 and 5 share stream slot 0 and gather every decode step: 3 on the
        # selection sent ahead, 5 one layer early inside the worker; layer 4 stays whole
        # in slot 1 from the prefill (whose chunks stream whole layers).
        assert stats[1].ahead_used >= decode_steps and stats[1].ahead_wasted == 0
        assert stats[1].prefetch_used >= 2 * decode_steps
        assert stats[1].prefetch_wasted == 0
    else:
        # Nothing is sent ahead; each offloaded layer still requests its rows as soon as its
        # own selection exists (at its start), and reads them.
        assert (stats[1].ahead_used, stats[1].ahead_wasted) == (0, 0)
        assert stats[1].prefetch_wasted == 0
