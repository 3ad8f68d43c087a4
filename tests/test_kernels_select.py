"""GPU threshold selection (compaction with a device-side count) vs plain PyTorch."""

import pytest
import torch

from dejavu.kernels.select import (  # noqa: E402
    MAX_RANK,
    lowrank_scores_reference,
    lowrank_threshold_select,
    lowrank_topk,
    scratch_numel,
    threshold_select,
    threshold_select_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("b,n,block", [(1, 37, 16), (3, 300, 64), (8, 1031, 128)])
def test_selected_set_matches_reference(b, n, block):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(b, n, generator=g).half().to(DEVICE)
    idx, count = threshold_select(scores, 1.0, capacity=n, block=block)
    want = threshold_select_reference(scores, 1.0)
    k = int(count)
    assert k == want.numel() > 0
    assert torch.equal(torch.sort(idx[:k].long().cpu()).values, want.cpu())


def test_count_is_not_clamped_but_writes_stay_in_capacity():
    scores = torch.ones(1, 100, device=DEVICE)
    idx, count = threshold_select(scores, 0.5, capacity=10, block=32)
    assert int(count) == 100 and idx.numel() == 10
    assert ((idx.cpu() >= 0) & (idx.cpu() < 100)).all()
    assert torch.unique(idx.cpu()).numel() == 10


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        threshold_select(torch.zeros(1, 4, device=DEVICE), 0.0, capacity=0)
    with pytest.raises(ValueError, match="scores"):
        threshold_select(torch.zeros(4, device=DEVICE), 0.0, capacity=4)


def _factors(b, c, r, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, generator=g).to(dtype)
    p1 = (torch.randn(c, r, generator=g) * c**-0.5).to(dtype)
    p2 = torch.randn(r, n, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (x, p1, p2)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c,r,n,split_c,block_n", [(1, 100, 24, 300, 32, 64),
                                                     (3, 67, 128, 1031, 16, 128),
                                                     (16, 48, 7, 97, 16, 32)])
def test_lowrank_select_matches_reference(dtype, b, c, r, n, split_c, block_n):
    # One launch computes (x @ p1) @ p2 and compacts the rows above the threshold. Rows
    # within rounding of the threshold may go either way; every other row must be decided
    # as the reference decides it.
    x, p1, p2 = _factors(b, c, r, n, dtype, seed=c + n)
    ref = lowrank_scores_reference(x, p1, p2).max(0).values.cpu()
    thr = float(ref.quantile(0.8))
    idx, count = lowrank_threshold_select(x, p1, p2, thr, capacity=n, split_c=split_c,
                                          block_n=block_n)
    k = int(count)
    got = set(idx[:k].long().cpu().tolist())
    assert len(got) == k
    margin = 0.02 * float(ref.abs().max())
    sure_in = set(torch.nonzero(ref > thr + margin).flatten().tolist())
    sure_out = set(torch.nonzero(ref < thr - margin).flatten().tolist())
    assert sure_in <= got and not (got & sure_out)
    assert 0.1 * n < k < 0.3 * n


def test_lowrank_select_truncates_at_capacity_and_refuses_bad_input():
    x, p1, p2 = _factors(2, 40, 16, 200, torch.float16, seed=1)
    idx, count = lowrank_threshold_select(x, p1, p2, -1e9, capacity=50, block_n=32)
    assert int(count) == 200 and torch.unique(idx.cpu()).numel() == 50
    with pytest.raises(ValueError, match="p2"):
        lowrank_threshold_select(x, p1, p2.T, 0.0, capacity=4)
    with pytest.raises(ValueError, match="dtype"):
        lowrank_threshold_select(x.float(), p1, p2, 0.0, capacity=4)
    with pytest.raises(ValueError, match="capacity"):
        lowrank_threshold_select(x, p1, p2, 0.0, capacity=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c,r,n,k", [(1, 100, 24, 40, 20), (2, 67, 64, 7, 3),
                                       (1, 300, 64, 72, 36)])
def test_lowrank_topk_matches_reference(dtype, b, c, r, n, k):
    # The head predictor: (x @ p1) @ p2 and the k best rows, best first, in one launch.
    x, p1, p2 = _factors(b, c, r, n, dtype, seed=c + k)
    ref = lowrank_scores_reference(x, p1, p2).max(0).values.cpu()
    got = lowrank_topk(x, p1, p2, k).long().cpu()
    assert got.shape == (k,) and torch.unique(got).numel() == k
    margin = 0.02 * float(ref.abs().max())
    order = torch.sort(ref, descending=True).values
    kth = float(order[k - 1])
    sure_in = set(torch.nonzero(ref > kth + margin).flatten().tolist())
    sure_out = set(torch.nonzero(ref < kth - margin).flatten().tolist())
    assert sure_in <= set(got.tolist()) and not (set(got.tolist()) & sure_out)
    assert (ref[got][1:] <= ref[got][:-1] + margin).all()  # best first
    with pytest.raises(ValueError, match="k="):
        lowrank_topk(x, p1, p2, n + 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,live", [(1, 1), (4, 1), (4, 3), (16, 16)])
def test_lowrank_select_with_bias_counts_only_live_rows(dtype, b, live):
    # The engine's predictors carry a bias on their second factor, and a captured batch pads
    # its rows: rows past ``live`` must not add to the selection.
    c, r, n = 72, 16, 257
    x, p1, p2 = _factors(b, c, r, n, dtype, seed=b + live)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ref = lowrank_scores_reference(x[:live], p1, p2, bias).max(0).values.cpu()
    thr = float(ref.quantile(0.85))
    idx, count = lowrank_threshold_select(
        x, p1, p2, thr, capacity=n, bias=bias,
        live=torch.tensor([live], dtype=torch.int32, device=DEVICE), split_c=16, block_n=64)
    got = set(idx[: int(count)].long().cpu().tolist())
    margin = 0.02 * float(ref.abs().max())
    assert set(torch.nonzero(ref > thr + margin).flatten().tolist()) <= got
    assert not got & set(torch.nonzero(ref < thr - margin).flatten().tolist())
    if live < b:  # the padding rows alone would have selected more
        every = lowrank_scores_reference(x, p1, p2, bias).max(0).values.cpu()
        assert int((every > thr + margin).sum()) > len(got)
    with pytest.raises(ValueError, match="bias"):
        lowrank_threshold_select(x, p1, p2, thr, capacity=n, bias=bias.half())


@pytest.mark.parametrize("b,r", [(1, 16), (3, 24)])
def test_lowrank_select_in_a_callers_scratch(b, r):
    """A zeroed scratch of the caller's (a captured step zeroes every layer's at once):
    the same selection as the call's own, its count kept in the scratch."""
    c, n = 72, 300
    x, p1, p2 = _factors(b, c, r, n, torch.float16, seed=b)
    thr = float(lowrank_scores_reference(x, p1, p2).max(0).values.quantile(0.8))
    idx, count = lowrank_threshold_select(x, p1, p2, thr, capacity=n, split_c=16)
    rows = torch.zeros((2, scratch_numel(b, MAX_RANK)), dtype=torch.int32, device=DEVICE)
    idx2, count2 = lowrank_threshold_select(x, p1, p2, thr, capacity=n, split_c=16,
                                            scratch=rows[1])
    assert int(count2) == int(count) > 0 and count2.data_ptr() == rows[1, 1:2].data_ptr()
    assert set(idx2[: int(count2)].tolist()) == set(idx[: int(count)].tolist())
    assert not rows[0].any()  # nothing outside the row it was given
    with pytest.raises(ValueError, match="scratch"):
        lowrank_threshold_select(x, p1, p2, thr, capacity=n,
                                 scratch=rows[0, : scratch_numel(b, r) - 1])


@pytest.mark.parametrize("rows, n, share", [(1, 40, 0.5), (3, 2500, 0.1), (16, 1100, 0.02),
                                            (2, 7, 0.0), (1, 33, 1.0)])
def test_padded_union_in_one_launch_equals_the_torch_ops(rows, n, share):
    """kernels/select.py's ``padded_union`` (one program, two passes over blocks of 1024)
    against runtime/sparse.py's reference (any, stable argsort, sum): the same ids in the
    same order and the same count, also for an empty and a full union and across blocks."""
    from dejavu.kernels.select import padded_union
    from dejavu.runtime.sparse import padded_union_reference

    g = torch.Generator().manual_seed(rows * n)
    mask = (torch.rand(rows, 1, n, generator=g) < share).to(DEVICE)
    ids, count = padded_union(mask)
    want_ids, want_count = padded_union_reference(mask)
    assert ids.dtype == want_ids.dtype and count.dtype == want_count.dtype
    assert torch.equal(ids, want_ids) and torch.equal(count, want_count)
    assert sorted(ids.tolist()) == list(range(n))  # a permutation
