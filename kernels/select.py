"""Threshold selection compacted on the GPU: which rows any batch row's score selects.

    ids = { n : max_b scores[b, n] > threshold },  written to the front of a fixed-capacity
    index buffer, with the count in a [1] device tensor.

The sparse kernels read the count on the device, so choosing rows costs no host sync and
no top-k (torch.topk of 2,048 out of 20,480 costs tens of microseconds on an H100-class
GPU, about as much as the sparse MLP itself). Programs claim output ranges with an atomic
add, so the *order* of ids varies between runs; the set does not. More than ``capacity``
selected rows are truncated (the kernels clamp to the capacity) and the returned count,
which is not clamped, shows it.

What this module does not know: where thresholds come from (per-layer calibration of the
predictors is the sparsity engineer's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _threshold_compact_kernel(
    scores_ptr,  # [B, N] predictor scores
    idx_ptr,  # [capacity] int32 out: selected ids (first count entries)
    count_ptr,  # [1] int32, zeroed: number selected (not clamped to capacity)
    B, N, capacity,
    threshold,  # fp32 scalar
    stride_sb,
    BLOCK_B: tl.constexpr,  # batch rows padded to a power of two
    BLOCK: tl.constexpr,  # ids per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    offs_b = tl.arange(0, BLOCK_B)
    s = tl.load(scores_ptr + offs_b[:, None] * stride_sb + offs[None, :],
                mask=(offs_b < B)[:, None] & mask[None, :], other=float("-inf"))
    sel = (tl.max(s.to(tl.float32), axis=0) > threshold).to(tl.int32)
    total = tl.sum(sel, axis=0)
    base = tl.atomic_add(count_ptr, total)  # this program's range in the output
    pos = base + tl.cumsum(sel, axis=0) - sel
    tl.store(idx_ptr + pos, offs.to(tl.int32), mask=(sel > 0) & (pos < capacity))


def threshold_select(scores: Tensor, threshold: float, capacity: int, *,
                     block: int = 1024) -> tuple[Tensor, Tensor]:
    """(ids [capacity] int32, count [1] int32) of the rows any batch row scores above the
    threshold. Entries past min(count, capacity) are unspecified."""
    if scores.dim() != 2 or scores.stride(1) != 1:
        raise ValueError(f"scores: expected [B, N] with contiguous rows, got {tuple(scores.shape)}")
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    b, n = scores.shape
    idx = torch.empty(capacity, dtype=torch.int32, device=scores.device)
    count = torch.zeros(1, dtype=torch.int32, device=scores.device)
    _threshold_compact_kernel[(triton.cdiv(n, block),)](
        scores, idx, count, b, n, capacity, float(threshold), scores.stride(0),
        BLOCK_B=triton.next_power_of_2(b), BLOCK=block)
    return idx, count


def threshold_select_reference(scores: Tensor, threshold: float) -> Tensor:
    """Sorted ids selected by any row (plain PyTorch)."""
    return torch.nonzero((scores.float() > threshold).any(0)).flatten()
