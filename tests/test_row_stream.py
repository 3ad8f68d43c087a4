"""Prefill of offloaded layers by streaming (runtime/row_stream.py) against the resident
model: each offloaded layer's rows cross once per chunk, whatever the chunk's length, and
the results equal the resident model's.

Without a GPU the decode steps' kernels run in Triton's interpreter; the streamed prefill is
torch math over the copied records on the CPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_sparse_backend import CFG, DEVICE, TOL, decode_run, rel_err, tiny_model  # noqa: E402

from dejavu.runtime import row_stream, sparse_backend  # noqa: E402
from dejavu.runtime.model import Batch, KVCache  # noqa: E402
from dejavu.runtime.offload import (  # noqa: E402
    OffloadSelector,
    host_bytes_read,
    kv_recomputed,
    move_resident,
    offload_layers,
)
from dejavu.runtime.opt_config import OPTConfig  # noqa: E402
from dejavu.runtime.selection import RandomSelector  # noqa: E402
from dejavu.runtime.sparse import SparseContext, SparseStats  # noqa: E402
from dejavu.runtime.weight_store import RecordLayout  # noqa: E402

# Four layers, so that three offloaded ones go through both slots and a prefetch chain.
CFG4 = OPTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=4, ffn_dim=72,
                 num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)


def offloaded_model(dtype, layers, config=CFG):
    model = tiny_model(dtype, "cpu", config=config)
    offload_layers(model, layers, device=DEVICE)
    move_resident(model, DEVICE)
    return model


def prefill(model, config, prompt_len, batch=1, mlp=0.3, heads=0.25, seed=1, cache=None):
    """One prefill chunk through the model (sparse, gather mode). Returns (logits, cache)."""
    device = next(p for p in model.parameters() if not p.is_meta).device
    dtype = next(p for p in model.parameters() if not p.is_meta).dtype
    if cache is None:
        cache = KVCache(config, model.layer_ids, batch, config.max_position_embeddings,
                        dtype=dtype, device=device, keep_inputs=True)
    sel = RandomSelector(config.ffn_dim, config.num_attention_heads, mlp, heads, seed=seed)
    sel = OffloadSelector(sel, [lid for lid in model.layer_ids
                                if sparse_backend.is_offloaded(model.layers()[lid])], config)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, config.vocab_size, (batch, prompt_len), generator=g).to(device)
    pos = torch.arange(prompt_len, device=device).expand(batch, prompt_len)
    slots = torch.arange(batch, device=device)
    ctx = SparseContext(sel, stats=SparseStats(), dense_above=1.01)
    with torch.inference_mode():
        return model(ids, Batch(pos, slots, cache, ctx)), cache


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("union", [False, True])
def test_streamed_prefill_and_decode_equal_resident(dtype, union, monkeypatch):
    """Whole layers copied (the default for a wide union) or only the union gathered
    (forced): prefill and the decode steps after it match the resident model."""
    if union:  # every block gathers its union instead of a whole copy
        monkeypatch.setattr(row_stream, "UNION_BELOW", 1.01)
    ref, ref_tokens, _ = decode_run(tiny_model(dtype), "torch", 2)
    model = offloaded_model(dtype, [0, 1])
    out, tokens, _ = decode_run(model, "torch", 2)
    for step in range(out.shape[0]):
        assert rel_err(out[step], ref[step]) < TOL[dtype], f"step {step}"
    assert tokens == ref_tokens
    stream = next(iter(_streams(model)))
    whole = [b.whole for slot in stream.slots for b in slot.values()]
    assert whole == ([False] * 4 if union else [True] * 4)


def _streams(model):
    return {layer.offloaded.stream for layer in model.layers() if layer.offloaded is not None}


def test_each_offloaded_layer_crosses_once_per_chunk_whatever_its_length():
    """Host bytes of a prefill are the offloaded layers' records once, for 3 tokens as for
    20 (token by token they grew with every prompt token)."""
    dtype = torch.float16
    layout = RecordLayout.of(CFG4)
    layer = layout.layer_bytes(2)
    read = []
    for n in (3, 20):
        model = offloaded_model(dtype, [1, 2, 3], CFG4)
        prefill(model, CFG4, n, mlp=0.9, heads=1.0)
        read.append(host_bytes_read(model))
    assert read == [3 * layer, 3 * layer]


def test_prefetch_of_the_next_layer_is_issued_before_this_layer_computes(monkeypatch):
    """The order of operations on the device: layer k+1's whole copy is issued while layer
    k's block runs (double buffering), each offloaded layer copied once per block."""
    log = []
    stream_cls = row_stream.RowStream
    real_prefetch, real_mlp, real_attn = (stream_cls.prefetch_whole, row_stream.streamed_mlp,
                                          row_stream.streamed_attention)

    def prefetch(self, owner, slot, kind, host):
        n = real_prefetch(self, owner, slot, kind, host)
        if n:
            log.append(("copy", owner.rows.layer_id, kind, slot))
        return n

    def mlp(records, *args, **kwargs):
        log.append(("mlp", _owner(records), "neurons"))
        return real_mlp(records, *args, **kwargs)

    def attn(records, *args, **kwargs):
        log.append(("attention", _owner(records), "heads"))
        return real_attn(records, *args, **kwargs)

    model = offloaded_model(torch.float16, [1, 2, 3], CFG4)
    stream = next(iter(_streams(model)))

    def _owner(records):
        for slot in stream.slots:
            for b in slot.values():
                if b.buffer.data_ptr() == records.data_ptr():
                    return b.owner.rows.layer_id
        return None

    monkeypatch.setattr(stream_cls, "prefetch_whole", prefetch)
    monkeypatch.setattr(row_stream, "streamed_mlp", mlp)
    monkeypatch.setattr(row_stream, "streamed_attention", attn)
    prefill(model, CFG4, 12, mlp=0.9, heads=1.0)
    assert log == [
        ("copy", 1, "heads", 0), ("copy", 2, "heads", 1), ("attention", 1, "heads"),
        ("copy", 1, "neurons", 0), ("copy", 2, "neurons", 1), ("mlp", 1, "neurons"),
        ("copy", 3, "heads", 0), ("attention", 2, "heads"),
        ("copy", 3, "neurons", 0), ("mlp", 2, "neurons"),
        ("attention", 3, "heads"), ("mlp", 3, "neurons"),
    ]


def test_whole_blocks_still_in_their_slots_are_not_copied_again():
    """Two offloaded layers fit the two slots: a second prefill reads nothing from the host
    and computes the same."""
    model = offloaded_model(torch.float16, [0, 1])
    first, _ = prefill(model, CFG, 6, mlp=0.9, heads=1.0)
    read = host_bytes_read(model)
    again, _ = prefill(model, CFG, 6, mlp=0.9, heads=1.0)
    assert host_bytes_read(model) == read
    assert torch.equal(first, again)


def test_whole_prefill_leaves_every_heads_kv_complete():
    """With the whole head block on the device, K/V of every head are written for the
    prompt (only compute), so decode steps recompute none of the prompt's positions; the
    K/V equal the resident model's dense ones."""
    dtype = torch.float16
    model = offloaded_model(dtype, [1])
    _, cache = prefill(model, CFG, 7, heads=0.25)
    _, valid = cache.layer_inputs(1)
    assert bool(valid[0, :, :7].all())
    # The resident model's k_proj over the inputs the prefill stored (layer 0 ran sparse,
    # so those are the inputs layer 1 saw), for every head.
    xs, _ = cache.layer_inputs(1)
    with torch.inference_mode():
        k_ref = tiny_model(dtype).layers()[1].self_attn.k_proj(xs[0, :7])
    k, _ = cache.layer(1)
    assert rel_err(k[0, :, :7].float(), k_ref.view(7, 4, -1).transpose(0, 1).float()) \
        < TOL[dtype]


def test_budget_keeps_room_for_the_double_buffer_and_the_planner_agrees():
    """A budget that holds one whole layer and the double buffer: the buffer is kept (two
    layers fewer stay resident than without it), the planner's count is the runtime's, and
    the buffer's real size is the planner's figure. A budget too small for the buffer runs
    without it."""
    from dejavu.runtime.offload import plan_offload, plan_streaming, stream_bytes
    from dejavu.scheduler.planner import (
        layer_bytes,
        offload_reserved_bytes,
        offloaded_layers,
        stream_buffer_bytes,
    )

    model = tiny_model(torch.float16, "cpu", config=CFG4)
    lb = layer_bytes(CFG4, 2)
    other = sum(p.numel() * 2 for p in model.parameters()) - 4 * lb
    stream = stream_bytes(model)
    assert stream == stream_buffer_bytes(CFG4, 2)
    assert 2 * lb < stream < 3 * lb  # two layers' records, padded
    budget = other + stream + lb + 10
    assert plan_offload(model, budget) == [1]  # without the buffer: 3 layers resident
    assert plan_streaming(model, budget) == ([0, 2, 3], True)  # layer 1 kept: the middle
    assert plan_streaming(model, other + lb) == ([0, 2, 3], False)  # no room for it
    # The planner (what `launch` prints) counts the same for budgets around both edges.
    reserved = offload_reserved_bytes(CFG4, 4, 1, 8, 2)
    for b in (budget, budget - 11, other + lb, other + 3 * lb + stream, other + 4 * lb):
        layers, _ = plan_streaming(model, b + reserved, reserved)
        assert offloaded_layers(CFG4, range(4), b + reserved, dtype_bytes=2, slots=1,
                                max_len=8) == len(layers), b
    held = offloaded_model(torch.float16, [2, 3], CFG4)
    assert next(iter(_streams(held))).nbytes() == stream


class Recording:
    """A selector that remembers each call's masks (to count the rows a step selects)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, lid, source):
        sel = self.inner(lid, source)
        self.calls.append((lid, sel))
        return sel


def decode_steps(model, config, offloaded, cache, start, steps, seed=5):
    """``steps`` greedy decode steps (batch 1) after a prefill of ``start`` tokens, every
    head selected (so heads the prefill skipped need their K/V); returns (logits per step,
    the rows each step selected per offloaded layer)."""
    device = cache.k.device
    sel = Recording(OffloadSelector(RandomSelector(config.ffn_dim, config.num_attention_heads,
                                                   0.3, 1.0, seed=seed), offloaded, config))
    tok = torch.tensor([[7]], device=device)
    out = []
    with torch.inference_mode():
        for i in range(steps):
            pos = torch.full((1, 1), start + i, device=device)
            ctx = SparseContext(sel, stats=SparseStats(), dense_above=1.01)
            logits = model(tok, Batch(pos, torch.zeros(1, dtype=torch.long, device=device),
                                      cache, ctx, length=start + i + 1))
            out.append(logits[:, -1].float())
            tok = logits[:, -1].argmax(-1)[:, None]
    rows = [(int(s.heads.any(0).any(0).sum()), int(s.neurons.any(0).any(0).sum()))
            for lid, s in sel.calls if lid in offloaded]
    return torch.stack(out), rows


@pytest.mark.parametrize("staged,neurons_staged", [(True, False), (True, True),
                                                    (False, False)])
def test_decode_reads_each_selected_row_once_per_step(staged, neurons_staged):
    """After a prefill, a decode step of an offloaded layer reads each selected head's and
    neuron's record once, K/V of heads skipped earlier included (staged on the device);
    the reference path (no stream buffer: in-place kernels, heads completed one by one)
    reads the recomputed heads' records again. ``neurons_staged``: the MLP's selected rows
    are gathered to the device too, instead of read in place. All compute what the resident
    model does."""
    dtype, offloaded, n = torch.float16, [1], 6
    layout = RecordLayout.of(CFG)
    ref_model = tiny_model(dtype)
    _, ref_cache = prefill(ref_model, CFG, n, heads=0.25)
    assert not bool(ref_cache.layer_inputs(1)[1][0, :, :n].all())  # heads were skipped
    ref, _ = decode_steps(ref_model, CFG, [], ref_cache, n, 3)
    model = tiny_model(dtype, "cpu")
    offload_layers(model, offloaded, device=DEVICE, stream=staged)
    move_resident(model, DEVICE)
    model.layers()[1].offloaded.stage_neurons = neurons_staged
    _, cache = prefill(model, CFG, n, heads=0.25)
    if staged:  # as if other layers had used the buffer since: the heads are gathered
        for slot in next(iter(_streams(model))).slots:
            for block in slot.values():
                block.owner = None
        _, valid = cache.layer_inputs(1)
        valid[0, 2, :n] = False  # and one head's prompt K/V as a union prefill leaves them
    before = host_bytes_read(model)
    out, rows = decode_steps(model, CFG, offloaded, cache, n, 3)
    assert rel_err(out, ref) < TOL[dtype]
    once = sum(h * layout.head_len * 2 + f * layout.neuron_len * 2 for h, f in rows)
    if staged:
        assert host_bytes_read(model) - before == once
        assert kv_recomputed(model)[1] > 0  # heads skipped earlier were completed
    else:
        assert host_bytes_read(model) - before > once


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staged_decode_attention_never_synchronises():
    """The offloaded layer's decode attention, K/V completion included, runs with CUDA's
    sync debug mode set to error: no .item(), nonzero or host copy inside."""
    model = offloaded_model(torch.float16, [1])
    _, cache = prefill(model, CFG, 6, heads=0.25)
    layer = model.layers()[1]
    ops = layer.offloaded
    x = torch.randn(2, 1, CFG.hidden_size, dtype=torch.float16, device="cuda")
    pos = torch.tensor([[6], [6]], device="cuda")
    batch = Batch(pos, torch.tensor([0, 1], device="cuda"), KVCache(
        CFG, model.layer_ids, 2, CFG.max_position_embeddings, dtype=torch.float16,
        device="cuda", keep_inputs=True), None, length=7)
    idx = torch.tensor([0, 2], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.attention(layer.self_attn, x, 1, batch, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (2, 1, CFG.hidden_size) and torch.isfinite(out).all()
    del cache
