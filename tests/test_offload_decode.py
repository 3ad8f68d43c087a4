"""Decode of offloaded layers at the link: each step's selected rows are requested once per
layer, as soon as the selection exists (``OffloadedLayer.prefetch``, on the copy stream on a
GPU, inline on a CPU), the ops then read them from the device buffer, and with every head
selected the next offloaded layer's head block is copied ahead. Results equal the resident
model's.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_row_stream import CFG4, _streams, decode_steps, offloaded_model, prefill  # noqa: E402
from test_sparse_backend import DEVICE, TOL, rel_err, tiny_model  # noqa: E402

from dejavu.kernels.compiles import Compiles  # noqa: E402
from dejavu.runtime import offload, row_stream, sparse, sparse_backend  # noqa: E402
from dejavu.runtime.model import Batch  # noqa: E402
from dejavu.runtime.offload import host_bytes_read  # noqa: E402
from dejavu.runtime.sparse import Selection  # noqa: E402
from dejavu.runtime.weight_store import RecordLayout  # noqa: E402

OFFLOADED = [1, 2, 3]


def _forget_buffers(model):
    """As if other work had used the stream buffer since the prefill: nothing is whole."""
    for stream in _streams(model):
        for slot in stream.slots:
            for block in slot.values():
                block.owner = None


def test_staged_is_the_default_decode_path():
    model = offloaded_model(torch.float16, OFFLOADED, CFG4)
    for lid in OFFLOADED:
        ops = model.layers()[lid].offloaded
        assert ops._staged_decode("heads") and ops._staged_decode("neurons")


@pytest.mark.parametrize("heads", [1.0, 0.5])
def test_decode_rows_are_read_ahead_once_and_equal_resident(heads, monkeypatch):
    """Three offloaded layers, decode after a prefill: every row a step reads crosses in
    ``prefetch`` (never gathered again by the ops), once per step, and with every head
    selected the next layer's head block is the whole copy issued by the layer before; the
    logits equal the resident model's."""
    dtype, n, steps = torch.float16, 6, 3
    ref_model = tiny_model(dtype, config=CFG4)
    _, ref_cache = prefill(ref_model, CFG4, n, heads=0.5)
    ref, _ = _decode(ref_model, [], ref_cache, n, steps, heads)
    model = offloaded_model(dtype, OFFLOADED, CFG4)
    _, cache = prefill(model, CFG4, n, heads=0.5)
    _forget_buffers(model)
    events = []
    stream_cls = row_stream.RowStream
    for name in ("gather", "gather_ahead", "prefetch_whole"):
        real = getattr(stream_cls, name)

        def spy(self, owner, slot, kind, host, *rest, _real=real, _name=name):
            events.append((_name, owner.rows.layer_id, kind))
            return _real(self, owner, slot, kind, host, *rest)
        monkeypatch.setattr(stream_cls, name, spy)
    before = host_bytes_read(model)
    out, rows = _decode(model, OFFLOADED, cache, n, steps, heads)
    assert rel_err(out, ref) < TOL[dtype]
    assert not [e for e in events if e[0] == "gather"]  # the ops never gathered themselves
    layout = RecordLayout.of(CFG4)
    read = host_bytes_read(model) - before
    per_rows = sum(h * layout.head_len * 2 + f * layout.neuron_len * 2 for h, f in rows)
    if heads == 1.0:
        # Layer 1 gathers its own heads in step 0 only; layers 2 and 3 get whole copies from
        # the layer before (slot parity: 1 -> 2 only, 3 shares layer 1's slot), each step.
        assert ("prefetch_whole", 2, "heads") in events
        assert read <= per_rows
    else:
        assert read == per_rows
        assert not [e for e in events if e[0] == "prefetch_whole"]


def _decode(model, offloaded, cache, start, steps, heads):
    if heads == 1.0:
        return decode_steps(model, CFG4, offloaded, cache, start, steps)
    import test_row_stream
    real = test_row_stream.RandomSelector

    class Half(real):
        def __init__(self, f, h, m, _h, seed=0):
            super().__init__(f, h, m, heads, seed=seed)
    test_row_stream.RandomSelector = Half
    try:
        return decode_steps(model, CFG4, offloaded, cache, start, steps)
    finally:
        test_row_stream.RandomSelector = real


def test_a_decode_step_never_reads_an_offloaded_union_on_the_host(monkeypatch):
    """An offloaded layer's decode step pads its unions (``padded_union``: the count stays
    on the device) instead of finding them with a nonzero (a device read on a GPU); a block
    kept whole comes with its union known (every id). Only resident layer 0 still finds its
    neurons' union."""
    model = offloaded_model(torch.float16, OFFLOADED, CFG4)
    _, cache = prefill(model, CFG4, 5, heads=0.5)
    calls, padded = [], []
    real, real_padded = sparse.union_index, sparse.padded_union

    def counting(mask):
        calls.append(mask.shape[-1])
        return real(mask)

    def counting_padded(mask):
        padded.append(mask.shape[-1])
        return real_padded(mask)
    monkeypatch.setattr(sparse, "union_index", counting)
    monkeypatch.setattr(offload, "union_index", counting)
    monkeypatch.setattr(sparse, "padded_union", counting_padded)
    decode_steps(model, CFG4, OFFLOADED, cache, 5, 2)
    # On a GPU resident layer 0 runs on the kernels and pads its neurons too
    # (sparse_backend.pads_resident); on a CPU it finds its union, each step.
    pads = sparse_backend.pads_resident(model.layers()[0], "neurons", torch.Size([1, 1]),
                                        Batch(torch.zeros(1, 1, dtype=torch.long)))
    assert pads == (DEVICE == "cuda")
    assert calls == ([] if pads else [CFG4.ffn_dim] * 2)
    # Every head selected (known on the host); the neurons padded, once per layer and step.
    assert padded == [CFG4.ffn_dim] * 2 * (len(OFFLOADED) + pads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: nothing compiles under "
                    "the interpreter")
@pytest.mark.parametrize("heads", [1.0, 0.5])
def test_gpu_warm_decode_compiles_nothing_at_later_positions(heads):
    """Once two steps have run, decode compiles no kernel at any later position. A kernel
    that let Triton specialize a position or a length compiled again when the position
    reached a multiple of 16: seen as ~130 ms inside the first timed steps of the e2e
    bench with half the heads (2026-12-06)."""
    model = offloaded_model(torch.float16, OFFLOADED, CFG4)
    _, cache = prefill(model, CFG4, 3, heads=0.5)
    _decode(model, OFFLOADED, cache, 3, 2, heads)  # positions 3 and 4: compiles, captures
    with Compiles() as compiled:
        _decode(model, OFFLOADED, cache, 5, CFG4.max_position_embeddings - 5, heads)
    assert compiled.names == []


@pytest.mark.parametrize("heads", [1.0, 0.5])
def test_offloaded_decode_step_has_no_host_sync(heads):
    """The bench's counter (profile_offload count): no aten call that reads the device
    (nonzero, item, boolean indexing, tolist...) per offloaded layer and decode step, with
    every head or half of them selected (K/V of heads skipped earlier completed)."""
    from dejavu.bench.profile_offload import count_span

    low, high = (count_span(n, heads, torch.device(DEVICE)) for n in (3, 5))
    assert high["syncs"] == low["syncs"], (low["sync_ops"], high["sync_ops"])


@pytest.mark.parametrize("completion", ["batched", "loop"])
def test_resident_decode_step_has_no_host_sync(completion, monkeypatch):
    """Resident head-sparse layers on the kernels: a decode step pads their unions
    (``pads_resident``) and completes skipped heads' K/V in one pass, whatever pass
    ``COMPLETION`` names for other steps: no aten call that reads the device per layer,
    nor (counted on a GPU) one that copies host values in, as a Python bool written into
    the K/V-valid bits did twice per layer, with every head or half of them (either waits
    for all the work queued before it, offloaded layers' transfers included)."""
    from dejavu.bench.profile_offload import count_span
    from dejavu.runtime import lazy_kv

    def per_layer(heads: float) -> float:
        low, high = (count_span(n, heads, torch.device(DEVICE), offload=False) for n in (3, 5))
        return (high["syncs"] - low["syncs"]) / 2

    monkeypatch.setattr(lazy_kv, "COMPLETION", completion)
    assert per_layer(1.0) == 0
    assert per_layer(0.5) == 0
    # Past the one-pass bound (a long prefix, many rows) heads are not padded: the step
    # reads its union and completes only what is missing.
    monkeypatch.setattr(lazy_kv, "BATCHED_KV_POSITIONS", 4)
    assert per_layer(0.5) > 0


def test_a_selection_other_than_the_prefetched_one_is_gathered_again():
    """Prefetched rows serve only the selection they were read for (the same tensors):
    another one is gathered when the op runs, and the result is still exact."""
    dtype = torch.float16
    model = offloaded_model(dtype, [1], CFG4)
    _, cache = prefill(model, CFG4, 4, heads=1.0)
    _forget_buffers(model)
    ops = model.layers()[1].offloaded
    h = torch.zeros(1, 1, CFG4.num_attention_heads, dtype=torch.bool, device=DEVICE)
    h[..., :2] = True
    f = torch.zeros(1, 1, CFG4.ffn_dim, dtype=torch.bool, device=DEVICE)
    f[..., 3:9] = True
    ops.prefetch(Selection(heads=h, neurons=f))
    before = ops.read
    x = torch.randn(1, 1, CFG4.hidden_size, dtype=dtype, device=DEVICE)
    other = torch.tensor([3, 4, 5], device=DEVICE)
    with torch.inference_mode():
        out = ops.mlp(x, other)
    layout = RecordLayout.of(CFG4)
    assert ops.read - before == 3 * layout.neuron_len * 2
    ops.stage_neurons = False  # the in-place kernel over the host rows: the reference
    with torch.inference_mode():
        ref = ops.mlp(x, other)
    assert rel_err(out.float(), ref.float()) < TOL[dtype]
    del cache


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetched_decode_layer_never_synchronises():
    """Given its selection's unions, an offloaded layer's decode (prefetch on the copy
    stream, attention with K/V completion, MLP) runs with CUDA's sync debug mode set to
    error."""
    model = offloaded_model(torch.float16, [1, 2, 3], CFG4)
    _, cache = prefill(model, CFG4, 6, heads=0.5)
    layer = model.layers()[1]
    ops = layer.offloaded
    h = torch.ones(1, 1, CFG4.num_attention_heads, dtype=torch.bool, device="cuda")
    f = torch.zeros(1, 1, CFG4.ffn_dim, dtype=torch.bool, device="cuda")
    f[..., ::5] = True
    sel = Selection(heads=h, neurons=f, head_index=torch.arange(4, device="cuda"),
                    neuron_index=torch.arange(0, CFG4.ffn_dim, 5, device="cuda"))
    x = torch.randn(1, 1, CFG4.hidden_size, dtype=torch.float16, device="cuda")
    batch = Batch(torch.tensor([[6]], device="cuda"), torch.tensor([0], device="cuda"),
                  cache, None, length=7)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            ops.prefetch(sel)
            idx, count = ops.known_union(h)  # (the union prefetch found, its device count)
            a = ops.attention(layer.self_attn, x, 1, batch, idx, count)
            m = ops.mlp(x, sel.neuron_index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(a).all() and torch.isfinite(m).all()


@pytest.mark.parametrize("stream", [True, False])
def test_a_cache_without_inputs_serves_a_selector_that_keeps_every_head(stream):
    """A selector that keeps every head (``keeps_every_head``, which ``OffloadSelector``
    passes on) gets a KV cache without attention inputs (``needs_kv_inputs``): the offloaded
    ops then skip the lazy K/V bookkeeping (no inputs stored, nothing completed), through a
    streamed prefill and staged decode (``stream``) or token-by-token prefill and in-place
    decode, and compute what the resident model does with a cache that keeps them."""
    from test_row_stream import RandomSelector

    from dejavu.runtime.model import KVCache
    from dejavu.runtime.offload import OffloadSelector, move_resident, offload_layers

    every = OffloadSelector(RandomSelector(CFG4.ffn_dim, CFG4.num_attention_heads, 0.3, 1.0),
                            OFFLOADED, CFG4)
    half = OffloadSelector(RandomSelector(CFG4.ffn_dim, CFG4.num_attention_heads, 0.3, 0.5),
                           OFFLOADED, CFG4)
    assert every.keeps_every_head and not sparse.needs_kv_inputs(every)
    assert not half.keeps_every_head and sparse.needs_kv_inputs(half)

    dtype, n, steps = torch.float16, 6, 3

    def run(model, keep_inputs):
        cache = KVCache(CFG4, model.layer_ids, 1, CFG4.max_position_embeddings, dtype=dtype,
                        device=DEVICE, keep_inputs=keep_inputs)
        prefill(model, CFG4, n, heads=1.0, cache=cache)
        return decode_steps(model, CFG4, OFFLOADED, cache, n, steps)[0], cache

    ref, _ = run(tiny_model(dtype, config=CFG4), True)
    model = tiny_model(dtype, "cpu", config=CFG4)
    offload_layers(model, OFFLOADED, device=DEVICE, stream=stream)
    move_resident(model, DEVICE)
    out, cache = run(model, False)
    assert cache.inputs is None
    assert rel_err(out, ref) < TOL[dtype]
    assert not any(offload.kv_recomputed(model).values())
