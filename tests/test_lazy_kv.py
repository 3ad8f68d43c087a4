"""Lazy K/V completion: the batched, synchronisation-free pass (what a CUDA decode step of a
resident head-sparse layer runs) against the per-head loop (the reference)."""

from __future__ import annotations

import pytest
import torch

from dejavu.runtime.lazy_kv import fill_missing_kv, fill_missing_kv_batched
from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.sparse import LayerStats, SparseStats

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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_completion_equals_the_per_head_loop(seed):
    torch.manual_seed(seed)
    attn = OPTModel(CFG).to(torch.float64).layers()[0].self_attn
    xs, k, v, valid = cache_state(seed)
    slots = torch.tensor([2, 0])
    pos = torch.tensor([[9], [6]])  # each row's last position: they differ
    idx = torch.tensor([3, 1])  # two of the four heads, out of order
    ref = [t.clone() for t in (k, v, valid)]
    n_ref = fill_missing_kv(attn, *ref[:2], xs, ref[2], idx, slots, pos)
    got = [t.clone() for t in (k, v, valid)]
    n = fill_missing_kv_batched(attn, *got[:2], xs, got[2], idx, slots, pos, length=10)
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
