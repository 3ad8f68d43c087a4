"""GPU threshold selection (compaction with a device-side count) vs plain PyTorch."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dejavu.kernels.select import threshold_select, threshold_select_reference  # noqa: E402

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
