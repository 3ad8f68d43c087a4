"""Lazy K/V completion: the batched, synchronisation-free pass (what a CUDA decode step of a
resident head-sparse layer runs) against the per-head loop (the reference), its bookkeeping
both as the one-launch kernel (kernels/kv_fill.py, under Triton's interpreter) and as torch
ops."""

from __future__ import annotations

import pytest
import torch

from dejavu.runtime import lazy_kv
from dejavu.runtime.lazy_kv import fill_missing_kv, fill_missing_kv_batched, keep_recomputed
from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.sparse import LayerStats, SparseStats

# The kernel runs on the GPU where there is one, else under Triton's interpreter on the CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CFG = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                num_attention_heads=4, max_position_embeddings=32)


def cache_state(seed: int, slots: int = 3, length: int = 12):
    """Random stored inputs, K/V and valid flags (some pairs missing) for one layer."""
    g = torch.Generator().manual_seed(seed)
    h, d, c = CFG.num_attention_heads, CFG.hidden_size // CFG.num_attention_heads, CFG.hidden_size
    xs = torch.randn(slots, length, c, generator=g, dtype=torch.float64)
    k = torch.randn(slots, h, length, d, generator=g, dtype=torch.float64)
    v = torch.randn(slots, h, length, d, generator=g, dtype=torch.float64)
    valid = torch.rand(slots, h, length, generator=g) < 0.4
    return xs, k, v, valid


@pytest.fixture(params=["kernel", "torch"])
def keep(request, monkeypatch):
    """Each test once with the kernel keeping the recomputed K/V, once with torch ops."""
    monkeypatch.setattr(lazy_kv, "KEEP", request.param)
    return request.param


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_completion_equals_the_per_head_loop(seed, keep):
    torch.manual_seed(seed)
    attn = OPTModel(CFG).to(torch.float64).layers()[0].self_attn
    xs, k, v, valid = cache_state(seed)
    slots = torch.tensor([2, 0])
    pos = torch.tensor([[9], [6]])  # each row's last position: they differ
    idx = torch.tensor([3, 1])  # two of the four heads, out of order
    ref = [t.clone() for t in (k, v, valid)]
    n_ref = fill_missing_kv(attn, *ref[:2], xs, ref[2], idx, slots, pos)
    dev = KERNEL_DEVICE if keep == "kernel" else "cpu"
    got = [t.clone().to(dev) for t in (k, v, valid)]
    n = fill_missing_kv_batched(attn.to(dev), *got[:2], xs.to(dev), got[2], idx.to(dev),
                                slots.to(dev), pos.to(dev), length=10)
    got = [t.cpu() for t in got]
    assert n_ref > 0 and int(n) == n_ref
    for want, have in zip(ref, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-12)
    # untouched: the unselected heads, a slot not in the batch, positions past each row's last
    assert torch.equal(got[0][1], k[1]) and torch.equal(got[0][:, [0, 2]], k[:, [0, 2]])
    assert torch.equal(got[0][0, :, 7:], k[0, :, 7:])


def test_kv_counted_on_the_device_is_folded_into_the_stats():
    stats = SparseStats()
    layer = stats.layer(0)
    layer.tokens = 1
    layer.add_pending("kv", torch.tensor([5]))
    layer.add_pending("kv", torch.tensor([2]))
    layer.add_pending("heads", torch.tensor([2]), 0.25)
    assert stats.as_dict()["layers"]["0"]["kv_recomputed"] == 7
    assert stats.head_density == 0.5
    assert layer.pending is None and isinstance(layer, LayerStats)


@pytest.mark.parametrize("dtype, prefill", [(torch.float16, False), (torch.float32, False),
                                            (torch.float16, True)])
def test_keeping_is_the_same_by_kernel_and_by_torch(dtype, prefill, monkeypatch):
    """The rule of kernels/kv_fill.py on a padded union (``live``), rows at different
    positions, several query tokens per row, recomputed values in float32 kept in a
    half-precision cache: the kernel and the torch ops write the same cache, the same
    bits, and count the same pairs."""
    g = torch.Generator().manual_seed(7)
    dev = KERNEL_DEVICE
    slots_n, heads_n, max_len, d = 4, 6, 40, 8
    cache_k = torch.randn(slots_n, heads_n, max_len, d, generator=g).to(dtype)
    cache_v = torch.randn(slots_n, heads_n, max_len, d, generator=g).to(dtype)
    valid = torch.rand(slots_n, heads_n, max_len, generator=g) < 0.5
    heads = torch.tensor([4, 0, 5, 2])
    live = torch.tensor([True, True, False, True])
    slots = torch.tensor([3, 1])
    positions = torch.tensor([[30, 31, 33], [5, 6, 7]])  # last: 33 and 7
    if prefill:  # a prompt chunk longer than the kernel reads whole: the same lasts
        positions = torch.cat([positions[:, :1].expand(2, 97), positions], 1)
    length = 34  # past 32: two position blocks
    k = torch.randn(2, length, 4, d, generator=g)
    v = torch.randn(2, length, 4, d, generator=g)
    out = {}
    for how in ("kernel", "torch"):
        monkeypatch.setattr(lazy_kv, "KEEP", how)
        state = [t.clone().to(dev) for t in (cache_k, cache_v, valid)]
        n = keep_recomputed(*state, *(t.to(dev) for t in (heads, slots, positions, k, v, live)))
        out[how] = (*(t.cpu() for t in state), int(n))
    for want, have in zip(out["torch"], out["kernel"], strict=True):
        if isinstance(want, int):
            assert have == want > 0
        else:
            assert torch.equal(have, want)
    got_k, _, got_valid, _ = out["kernel"]
    # the padding head (5), a slot outside the batch and positions past row 1's last: as before
    assert torch.equal(got_k[:, 5], cache_k[:, 5]) and torch.equal(got_k[0], cache_k[0])
    assert torch.equal(got_valid[1, :, 8:], valid[1, :, 8:])
    # every live pair up to each row's last position is now valid
    assert got_valid[3][[4, 0, 2], :34].all() and got_valid[1][[4, 0, 2], :8].all()


def test_keeping_refuses_mismatched_shapes():
    from dejavu.kernels.kv_fill import keep_missing_kv

    cache = torch.zeros(2, 3, 8, 4)
    valid = torch.zeros(2, 3, 8, dtype=torch.bool)
    k = torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match="valid must be bool"):
        keep_missing_kv(cache, cache.clone(), valid.int(), torch.tensor([0, 1]),
                        torch.tensor([0]), torch.tensor([[3]]), k, k)
    with pytest.raises(ValueError, match="positions must be"):
        keep_missing_kv(cache, cache.clone(), valid, torch.tensor([0, 1]), torch.tensor([0]),
                        torch.tensor([3]), k, k)
    with pytest.raises(ValueError, match="do not fit"):
        keep_missing_kv(cache, cache.clone(), valid, torch.tensor([0, 1]), torch.tensor([0]),
                        torch.tensor([[3]]), torch.zeros(1, 9, 2, 4), torch.zeros(1, 9, 2, 4))
