"""The GPU budget left after whole layers becomes row caches of the offloaded layers: the
same greedy tokens as the resident model, host reads that stop once the dynamic slots hold
a selection that repeats, and caches that stay within the budget (in process and as the
workers of a real 2-worker launch report it).

Without a GPU the kernels run in Triton's interpreter over CPU "host" records
(TRITON_INTERPRET=1, set before triton is imported, inherited by worker processes).
"""

import pytest
import torch
from pipeline_fixtures import TINY, cluster, read_log  # noqa: E402
from test_offload import layer_bytes, other_bytes  # noqa: E402
from test_sparse_backend import CFG, DEVICE, selector, tiny_model  # noqa: E402

from dejavu.runtime import sparse_backend  # noqa: E402
from dejavu.runtime.checkpoint import load_model, save_model  # noqa: E402
from dejavu.runtime.model import OPTModel  # noqa: E402
from dejavu.runtime.offload import (  # noqa: E402
    CACHE_MARGIN,
    OffloadSelector,
    budget_report,
    cache_placements,
    fit_budget,
    host_bytes_read,
    spare_bytes,
)
from dejavu.runtime.sampling import SamplingParams  # noqa: E402
from dejavu.runtime.sparse import Selection  # noqa: E402
from dejavu.runtime.weight_store import GIB, LayerFrequencies, RecordLayout  # noqa: E402
from dejavu.scheduler.engine import Engine  # noqa: E402
from dejavu.scheduler.planner import embed_bytes, offload_reserved_bytes  # noqa: E402
from dejavu.scheduler.planner import layer_bytes as pipeline_layer_bytes  # noqa: E402
from dejavu.scheduler.zmq_client import PipelineConnection  # noqa: E402

PROMPTS = [[2, 9, 4], [2, 40, 41, 42, 7], [2, 13]]
PARAMS = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
RESERVED = 4096  # stands for the KV cache and activations (any figure; it is subtracted)
# The launch test's workers run offloaded layers on the CPU (Triton's interpreter); with
# CUDA the interpreter is off, as in test_offload_pipeline.py.
CPU_KERNELS = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="CPU-interpreted kernels in worker processes")
SLOTS, MAX_LEN = 4, 32
LAUNCH_PROMPTS = [[5, 6, 7], [9, 8]]
LAUNCH_GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)


def budget(extra: int) -> int:
    """Room for everything but layer 1's weights, plus ``extra`` bytes."""
    model = tiny_model(torch.float16, "cpu")
    return other_bytes(model) + layer_bytes(model) + RESERVED + extra


def rows_of(model, lid):
    return model.layers()[lid].offloaded.rows


def gpu_bytes_held(model) -> int:
    """What the budgeted model actually keeps on its device: weights left on the modules,
    and each offloaded layer's caches, small tensors and location maps."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    for layer in model.layers():
        if (ops := layer.offloaded) is not None:
            r = ops.rows
            total += sum(t.numel() * t.element_size() for t in
                         [r.cache_neurons, r.cache_heads, r.neuron_loc, r.head_loc,
                          *r.small.values()])
    return total


class Same:
    """The same neurons and heads of layer 1 on every token (layer 0 dense)."""

    def __init__(self, neurons, heads):
        self.neurons, self.heads = neurons, heads

    def __call__(self, lid, x):
        if lid != 1:
            return Selection()
        b, t = x.shape[:2]
        n = torch.zeros(b, t, CFG.ffn_dim, dtype=torch.bool, device=x.device)
        h = torch.zeros(b, t, CFG.num_attention_heads, dtype=torch.bool, device=x.device)
        n[..., self.neurons] = True
        h[..., self.heads] = True
        return Selection(heads=h, neurons=n)


def test_caches_share_the_spare_budget_and_follow_frequencies():
    lay, e = RecordLayout.of(CFG), 2
    nb, hb = lay.neuron_len * e, lay.head_len * e
    # No frequencies: an even share per layer, heads in proportion to their bytes.
    p = cache_placements(lay, e, [3, 5], 2 * (2 * hb + 30 * nb))
    assert sorted(p) == [3, 5]
    for lp in p.values():
        assert lp.hot_neurons.numel() == 0 and lp.hot_heads.numel() == 0
        assert lp.dynamic_heads >= 1 and lp.dynamic_neurons >= 1
        assert lp.dynamic_neurons * nb + lp.dynamic_heads * hb <= 2 * hb + 30 * nb
    # A share larger than every neuron: the rest goes to heads, none past the layer's count.
    big = cache_placements(lay, e, [0], 10 * lay.layer_bytes(e))[0]
    assert big.dynamic_neurons == lay.ffn and big.dynamic_heads == lay.heads
    assert cache_placements(lay, e, [0], 0) == {} and cache_placements(lay, e, [0], -5) == {}
    # Frequencies: the hottest rows are static, a quarter becomes dynamic neuron slots.
    fr = LayerFrequencies(torch.linspace(1, 0, lay.ffn), torch.zeros(lay.heads))
    hot = cache_placements(lay, e, [1], 40 * nb, {1: fr})[1]
    assert hot.hot_neurons.tolist() == list(range(30)) and hot.dynamic_neurons == 10
    with pytest.raises(ValueError, match=r"layers \[1\]"):
        cache_placements(lay, e, [1], 40 * nb, {0: fr})


def test_cached_offload_engine_tokens_equal_resident_engine():
    """Random selections (rows enter and leave the dynamic slots): the same greedy tokens
    as the resident engine, and the slots really filled."""
    resident = tiny_model(torch.float16)
    sparse_backend.use_backend(resident, "torch")
    ref = [c.tokens for c in Engine(resident, max_batch=3, max_len=32,
                                    selector=selector()).run(PROMPTS, PARAMS)]
    model = tiny_model(torch.float16, "cpu")
    layers = fit_budget(model, budget(layer_bytes(model) // 2), device=DEVICE,
                        reserved_bytes=RESERVED)
    assert layers == [1]
    rows = rows_of(model, 1)
    assert rows.cache_neurons.shape[0] > 0 and rows.cache_heads.shape[0] > 0
    engine = Engine(model, max_batch=3, max_len=32,
                    selector=OffloadSelector(selector(), layers, CFG))
    assert [c.tokens for c in engine.run(PROMPTS, PARAMS)] == ref
    assert len(rows.dynamic) == rows.cache_neurons.shape[0]  # every slot used
    assert len(rows.dynamic_heads) > 0
    assert (rows.neuron_loc >= 0).sum() == rows.cache_neurons.shape[0]


@pytest.mark.parametrize("caches", [True, False])
def test_repeated_selection_stops_host_reads_once_cached(caches):
    """Layer 1 selects the same 10 neurons and one head on every token: the first forward
    reads them from the host, every later token from the dynamic slots (without caches,
    every token reads them again)."""
    sel = Same(list(range(0, 40, 4)), [2])
    resident = tiny_model(torch.float16)
    sparse_backend.use_backend(resident, "torch")
    ref = [c.tokens for c in Engine(resident, max_batch=1, max_len=32,
                                    selector=sel).run(PROMPTS[1:2], PARAMS)]
    model = tiny_model(torch.float16, "cpu")
    layers = fit_budget(model, budget(layer_bytes(model) // 2), device=DEVICE,
                        reserved_bytes=RESERVED, caches=caches)
    reads = []

    def counting(lid, x):  # layer 0 starts each forward: note the counter there
        if lid == 0:
            reads.append(host_bytes_read(model))
        return sel(lid, x)

    engine = Engine(model, max_batch=1, max_len=32,
                    selector=OffloadSelector(counting, layers, CFG))
    assert [c.tokens for c in engine.run(PROMPTS[1:2], PARAMS)] == ref
    reads.append(host_bytes_read(model))
    per_step = [b - a for a, b in zip(reads, reads[1:], strict=False)]
    assert len(per_step) == PARAMS.max_new_tokens  # the prefill, then one per decoded token
    nb, hb = (n * 2 for n in (RecordLayout.of(CFG).neuron_len, RecordLayout.of(CFG).head_len))
    # The prefill: the neurons once (one launch), the head once per prompt token; with
    # caches, admitting them reads each once more.
    first = 10 * nb + len(PROMPTS[1]) * hb
    assert per_step[0] == first + (10 * nb + hb if caches else 0), per_step
    if caches:
        assert per_step[1:] == [0] * (len(per_step) - 1), per_step
    else:
        assert per_step[1:] == [10 * nb + hb] * (len(per_step) - 1), per_step


@pytest.mark.parametrize("extra", [0, 3000, 12000, 200000])
def test_caches_stay_within_the_budget_and_the_report_counts_them(extra):
    model = tiny_model(torch.float16, "cpu")
    total = budget(extra)
    layers = fit_budget(model, total, device=DEVICE, reserved_bytes=RESERVED)
    held = gpu_bytes_held(model) + RESERVED
    report = budget_report(model, layers, None, budget_bytes=total, reserved_bytes=RESERVED)
    assert report["gpu_bytes"] == held  # the report counts exactly what is held
    if not layers:  # the largest budget holds both layers: nothing to cache
        assert extra >= layer_bytes(model) and held <= total
        return
    rows = rows_of(model, 1)
    cached = (rows.cache_neurons.numel() + rows.cache_heads.numel()) * 2
    assert report["row_cache_bytes"] == cached
    spare = spare_bytes(tiny_model(torch.float16, "cpu"), layers, total, RESERVED)
    if spare < 0:  # whole layers fill the budget (the layer's norms and maps overrun it
        assert cached == 0  # slightly, as before caches existed): no cache on top
        return
    assert held <= total
    # The spare went to the caches, all but the margin and less than one head record.
    head = RecordLayout.of(CFG).head_len * 2
    assert spare - cached <= spare * CACHE_MARGIN + head
    assert cached > 0 or spare < head
    # Dense run: every row counted at density 1, the static part only (no hot rows here).
    layout = RecordLayout.of(CFG)
    assert report["host_bytes_per_step"] == layout.layer_bytes(2)


@CPU_KERNELS
def test_budgeted_launch_with_caches_equals_the_engine_and_reports_them(tmp_path):
    """A real 2-worker launch whose worker 0 keeps one layer whole and half a layer's bytes
    spare: the unbudgeted engine's tokens, each worker's expected GPU bytes within the
    budget and, where it offloads, close to it (the caches counted), and paged bytes."""
    model = OPTModel(TINY)
    model.init_weights(torch.Generator().manual_seed(0), std=0.2)
    path = save_model(model, tmp_path / "tiny16", dtype=torch.float16)
    ref = Engine(load_model(path, dtype=torch.float16), max_batch=SLOTS,
                 max_len=MAX_LEN).run(LAUNCH_PROMPTS, LAUNCH_GREEDY)
    layer = pipeline_layer_bytes(TINY, 2)
    # A dense run: its cache keeps no attention inputs.
    fixed = offload_reserved_bytes(TINY, 2, SLOTS, MAX_LEN, 2, kv_inputs=False) + \
        embed_bytes(TINY, 2)
    total = fixed + layer + layer // 2
    with cluster(path, 2, dtype="float16", slots=SLOTS, max_len=MAX_LEN,
                 gpu_memory_gib=total / GIB, offload_cache=True) as c, \
            PipelineConnection(c.address) as conn:
        got = conn.run(LAUNCH_PROMPTS, LAUNCH_GREEDY)
        health = conn.health()
        log = read_log(c)
    assert [g.tokens for g in got] == [r.tokens for r in ref]
    w0 = health.workers[0]
    assert w0.offloaded_layers == 1
    budget_bytes = int(total / GIB * GIB)
    for w in health.workers:
        assert w.expected_gpu_bytes <= budget_bytes
    # Without caches worker 0 would leave about half a layer unused.
    assert budget_bytes - w0.expected_gpu_bytes < layer // 4
    assert health.paged_bytes[0] > 0
    assert "dynamic neuron slots" in log and "an upper bound" in log


@CPU_KERNELS
def test_row_caches_are_opt_in(tmp_path):
    """[pipeline] offload_cache is off unless set (LRU admission reads a missed row twice),
    and fit_gib (what the builder calls for workers, generate and serve) honours it."""
    from dejavu.runtime.offload import fit_gib
    from dejavu.runtime.settings import load_settings

    assert load_settings(None, find_file=False).pipeline.offload_cache is False
    toml = tmp_path / "dejavu.toml"
    toml.write_text("[pipeline]\noffload_cache = true\n")
    assert load_settings(toml).pipeline.offload_cache is True
    reserved = offload_reserved_bytes(CFG, CFG.num_hidden_layers, 2, 16, 2)
    gib = (other_bytes(tiny_model(torch.float16, "cpu")) + reserved
           + layer_bytes(tiny_model(torch.float16, "cpu")) * 3 // 2) / GIB
    cached = {}
    for caches in (False, True):
        model = tiny_model(torch.float16, "cpu")
        kw = {"caches": True} if caches else {}
        layers, _ = fit_gib(model, gib, device=DEVICE, slots=2, max_len=16, **kw)
        assert layers == [1]
        rows = rows_of(model, 1)
        cached[caches] = rows.cache_neurons.numel() + rows.cache_heads.numel()
    assert cached[False] == 0 and cached[True] > 0
