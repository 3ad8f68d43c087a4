"""Threshold selection compacted on the GPU: which rows any batch row's score selects.

    ids = { n : max_b scores[b, n] > threshold },  written to the front of a fixed-capacity
    index buffer, with the count in a [1] device tensor.

The sparse kernels read the count on the device, so choosing rows costs no host sync and
no top-k (torch.topk of 2,048 out of 20,480 costs tens of microseconds on an H100-class
GPU, about as much as the sparse MLP itself). Programs claim output ranges with an atomic
add, so the *order* of ids varies between runs; the set does not. More than ``capacity``
selected rows are truncated (the kernels clamp to the capacity) and the returned count,
which is not clamped, shows it.

``lowrank_threshold_select`` does the same from a low-rank predictor's two factors,
scores = (x @ P1) @ P2 (+ a bias per row), in one launch (plus a memset): programs of the
first factor add their partial hidden vectors atomically, then programs of the second wait
on a device counter (as in mlp_chained.py: only on programs of smaller id, which never
wait), score their block of rows and compact it. That replaces two GEMVs, a memset and
the compaction.

What this module does not know: where thresholds come from (per-layer calibration of the
predictors is the sparsity engineer's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .env import interpreting

SCRATCH_HEAD = 32  # int32 slots of a lowrank scratch before the hidden sums: done, count, pad
SCRATCH_COUNT = 1  # where ``lowrank_threshold_select`` leaves its count in the scratch
MAX_RANK = 256  # the largest predictor rank the low-rank kernels take


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


@triton.jit
def _padded_union_kernel(
    mask_ptr,  # [M, N] uint8 view of a bool mask, contiguous rows
    ids_ptr,  # [N] int64 out: the union's ids ascending, then the others ascending
    count_ptr,  # [1] int32 out: the union's size
    M, N,
    BLOCK: tl.constexpr,
):
    # One program: a first pass counts the union (where the others start), a second writes
    # every id at its place; each block's places come from a running offset and a cumsum.
    offs = tl.arange(0, BLOCK)
    total = 0
    for start in range(0, N, BLOCK):
        n = start + offs
        hit = tl.zeros((BLOCK,), tl.int32)
        for r in range(M):
            hit = hit | tl.load(mask_ptr + r * N + n, mask=n < N, other=0).to(tl.int32)
        total += tl.sum((hit != 0).to(tl.int32), axis=0)
    tl.store(count_ptr, total)
    lead, rest = 0, total
    for start in range(0, N, BLOCK):
        n = start + offs
        inside = n < N
        hit = tl.zeros((BLOCK,), tl.int32)
        for r in range(M):
            hit = hit | tl.load(mask_ptr + r * N + n, mask=inside, other=0).to(tl.int32)
        sel = ((hit != 0) & inside).to(tl.int32)
        other = (inside & (hit == 0)).to(tl.int32)
        before_sel = tl.cumsum(sel, axis=0) - sel  # selected ids earlier in this block
        before_other = tl.cumsum(other, axis=0) - other
        place = tl.where(sel > 0, lead + before_sel, rest + before_other)
        tl.store(ids_ptr + place, n.to(tl.int64), mask=inside)
        lead += tl.sum(sel, axis=0)
        rest += tl.sum(other, axis=0)


def padded_union(mask: Tensor, *, block: int = 1024) -> tuple[Tensor, Tensor]:
    """[..., N] bool -> (ids [N] int64: the ids any row selects, ascending, then every other
    id ascending; count [1] int32: how many lead), in one launch and without reading the
    device from the host (runtime/sparse.py's ``padded_union`` is the reference: an ``any``,
    a stable argsort and a sum, several launches)."""
    if mask.dtype != torch.bool or mask.dim() < 1:
        raise ValueError(f"mask: expected bool [..., N], got {mask.dtype} {tuple(mask.shape)}")
    n = mask.shape[-1]
    rows = mask.reshape(-1, n).contiguous()
    ids = torch.empty(n, dtype=torch.int64, device=mask.device)
    count = torch.empty(1, dtype=torch.int32, device=mask.device)
    _padded_union_kernel[(1,)](rows.view(torch.uint8), ids, count, rows.shape[0], n,
                               BLOCK=min(block, triton.next_power_of_2(max(n, 16))))
    return ids, count


@triton.jit
def _hidden_part(pid, x_ptr, p1_ptr, h_ptr, done_ptr, B, C, R, stride_xb, stride_p1,
                 BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_C: tl.constexpr,
                 DOT_FP32: tl.constexpr):
    """First factor, program pid: h[b, :] += x[b, chunk] @ p1[chunk, :]; then count in."""
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_c = pid * SPLIT_C + tl.arange(0, SPLIT_C)
    c_mask = offs_c < C
    xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_c[None, :],
                 mask=b_mask[:, None] & c_mask[None, :], other=0.0)
    p1 = tl.load(p1_ptr + offs_c[:, None] * stride_p1 + offs_r[None, :],
                 mask=c_mask[:, None] & r_mask[None, :], other=0.0)
    if DOT_FP32:
        xt = xt.to(tl.float32)
        p1 = p1.to(tl.float32)
    part = tl.dot(xt, p1)  # [BLOCK_B, BLOCK_R]
    tl.atomic_add(h_ptr + offs_b[:, None] * R + offs_r[None, :], part,
                  mask=b_mask[:, None] & r_mask[None, :], sem="relaxed")
    tl.debug_barrier()  # every thread's adds before thread 0's release
    tl.atomic_add(done_ptr, 1, sem="release")


@triton.jit
def _scores(p2, h_ptr, done_ptr, NS1, B, R, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
            DOT_FP32: tl.constexpr):
    """Wait for the first factor, then max over batch rows (the first B) of h @ p2
    ([BLOCK_R, BLOCK_N] tile, already loaded): [BLOCK_N] fp32. The hidden vector is rounded
    to the model dtype, as x @ p1 in that dtype would be."""
    seen = tl.atomic_add(done_ptr, 0, sem="acquire")
    while seen < NS1:
        seen = tl.atomic_add(done_ptr, 0, sem="acquire")
    tl.debug_barrier()
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_r = tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + offs_b[:, None] * R + offs_r[None, :],
                mask=b_mask[:, None] & (offs_r < R)[None, :], other=0.0, cache_modifier=".cg")
    h = h.to(p2.dtype)
    if DOT_FP32:
        s = tl.dot(h.to(tl.float32), p2.to(tl.float32))
    else:
        s = tl.dot(h, p2)  # [BLOCK_B, BLOCK_N]
    return tl.max(tl.where(b_mask[:, None], s, float("-inf")), axis=0)


@triton.jit
def _lowrank_select_kernel(
    x_ptr,  # [B, C] input rows, model dtype
    p1_ptr,  # [C, R] first factor, rows contiguous
    p2_ptr,  # [R, N] second factor, rows contiguous
    bias_ptr,  # [N] fp32 score bias (read only with HAS_BIAS)
    live_ptr,  # [1] int32: rows [0, live) score, the rest pad the batch (HAS_LIVE)
    h_ptr,  # [B, R] fp32 hidden sums (zeroed)
    done_ptr,  # [1] int32 (zeroed): first-factor programs finished
    idx_ptr,  # [capacity] int32 out: selected ids
    count_ptr,  # [1] int32 (zeroed): number selected (not clamped)
    B, C, R, N, capacity,
    threshold,  # fp32
    stride_xb, stride_p1, stride_p2,
    NS1,  # first-factor programs: cdiv(C, SPLIT_C); the rest score BLOCK_N rows each
    BLOCK_B: tl.constexpr,  # 16 (dot rows)
    BLOCK_R: tl.constexpr,  # R padded to a power of two
    SPLIT_C: tl.constexpr,  # columns of x per first-factor program
    BLOCK_N: tl.constexpr,  # rows scored per second-factor program
    DOT_FP32: tl.constexpr,  # upcast dot operands (the CPU interpreter's bf16 dot is wrong)
    HAS_BIAS: tl.constexpr,
    HAS_LIVE: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < NS1:
        _hidden_part(pid, x_ptr, p1_ptr, h_ptr, done_ptr, B, C, R, stride_xb, stride_p1,
                     BLOCK_B, BLOCK_R, SPLIT_C, DOT_FP32)
    else:
        offs_n = (pid - NS1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_r = tl.arange(0, BLOCK_R)
        p2 = tl.load(p2_ptr + offs_r[:, None] * stride_p2 + offs_n[None, :],
                     mask=(offs_r < R)[:, None] & n_mask[None, :], other=0.0)  # in flight
        rows = B
        if HAS_LIVE:
            rows = tl.minimum(tl.load(live_ptr), B)
        best = _scores(p2, h_ptr, done_ptr, NS1, rows, R, BLOCK_B, BLOCK_R, DOT_FP32)
        if HAS_BIAS:
            best += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        sel = ((best > threshold) & n_mask).to(tl.int32)
        total = tl.sum(sel, axis=0)
        base = tl.atomic_add(count_ptr, total)
        pos = base + tl.cumsum(sel, axis=0) - sel
        tl.store(idx_ptr + pos, offs_n.to(tl.int32), mask=(sel > 0) & (pos < capacity))


@triton.jit
def _lowrank_topk_kernel(
    x_ptr, p1_ptr, p2_ptr, h_ptr, done_ptr,  # as in _lowrank_select_kernel
    idx_ptr,  # [k] int32 out: the k best rows, best first
    B, C, R, N, k,
    stride_xb, stride_p1, stride_p2,
    NS1,  # first-factor programs; one more program scores all N rows
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_C: tl.constexpr,
    BLOCK_N: tl.constexpr,  # N padded to a power of two (one program)
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < NS1:
        _hidden_part(pid, x_ptr, p1_ptr, h_ptr, done_ptr, B, C, R, stride_xb, stride_p1,
                     BLOCK_B, BLOCK_R, SPLIT_C, DOT_FP32)
    else:
        offs_n = tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_r = tl.arange(0, BLOCK_R)
        p2 = tl.load(p2_ptr + offs_r[:, None] * stride_p2 + offs_n[None, :],
                     mask=(offs_r < R)[:, None] & n_mask[None, :], other=0.0)
        best = tl.where(n_mask, _scores(p2, h_ptr, done_ptr, NS1, B, R, BLOCK_B, BLOCK_R,
                                        DOT_FP32), float("-inf"))
        # Sort (score, -id) pairs as one int64 key: fp32 bits made order-preserving as
        # signed ints, id in the low word inverted so that ties keep the smaller id first.
        bits = best.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        packed = (key << 32) | (BLOCK_N - 1 - offs_n).to(tl.int64)
        top = tl.sort(packed, descending=True)
        ids = BLOCK_N - 1 - top.to(tl.int32)  # the low word
        tl.store(idx_ptr + offs_n, ids, mask=offs_n < k)


def _check_lowrank(x: Tensor, p1: Tensor, p2: Tensor) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= 16 or x.stride(1) != 1:
        raise ValueError(f"x: expected [B, C] with 1 <= B <= 16 and contiguous rows, got "
                         f"{tuple(x.shape)}")
    c = x.shape[1]
    if p1.dim() != 2 or p1.shape[0] != c or p1.stride(1) != 1:
        raise ValueError(f"p1: expected [{c}, R] with contiguous rows, got {tuple(p1.shape)}")
    r = p1.shape[1]
    if p2.dim() != 2 or p2.shape[0] != r or p2.stride(1) != 1:
        raise ValueError(f"p2: expected [{r}, N] with contiguous rows, got {tuple(p2.shape)}")
    if not x.dtype == p1.dtype == p2.dtype or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x, p1, p2: one dtype of float16/bfloat16, got {x.dtype}, "
                         f"{p1.dtype}, {p2.dtype}")
    if r > MAX_RANK:
        raise ValueError(f"rank {r} > {MAX_RANK} is not supported")


def lowrank_topk(x: Tensor, p1: Tensor, p2: Tensor, k: int, *, split_c: int = 128,
                 num_warps: int = 4) -> Tensor:
    """[k] int32: the k rows n of the largest max_b ((x @ p1) @ p2)[b, n], best first (ties:
    smaller id first), hidden rounded to x's dtype; one launch plus a memset. For small N
    (heads: N <= 1024), all scored by one program."""
    _check_lowrank(x, p1, p2)
    b, c = x.shape
    r, n = p2.shape
    if not 1 <= k <= n or n > 1024:
        raise ValueError(f"k={k} must be in [1, N={n}], N <= 1024")
    scratch = torch.zeros(scratch_numel(b, r), dtype=torch.int32, device=x.device)
    idx = torch.empty(k, dtype=torch.int32, device=x.device)
    ns1 = triton.cdiv(c, split_c)
    _lowrank_topk_kernel[(ns1 + 1,)](
        x, p1, p2, scratch[SCRATCH_HEAD:].view(torch.float32), scratch[0:1], idx, b, c, r, n, k,
        x.stride(0), p1.stride(0), p2.stride(0), ns1,
        BLOCK_B=16, BLOCK_R=max(16, triton.next_power_of_2(r)), SPLIT_C=split_c,
        BLOCK_N=max(16, triton.next_power_of_2(n)), DOT_FP32=interpreting(),
        num_warps=num_warps)
    return idx


def scratch_numel(rows: int, rank: int) -> int:
    """int32 elements of ``lowrank_threshold_select``'s scratch for B <= rows, R <= rank:
    [done, count, pad..., hidden sums (B x R fp32)]."""
    return SCRATCH_HEAD + rows * rank


def lowrank_threshold_select(x: Tensor, p1: Tensor, p2: Tensor, threshold: float,
                             capacity: int, *, bias: Tensor | None = None,
                             live: Tensor | None = None, scratch: Tensor | None = None,
                             split_c: int = 64, block_n: int = 128,
                             num_warps: int = 4) -> tuple[Tensor, Tensor]:
    """(ids [capacity] int32, count [1] int32) of the rows n with
    max_b ((x @ p1) @ p2)[b, n] + bias[n] above the threshold, the hidden x @ p1 rounded to
    x's dtype. x: [B, C] fp16/bf16, B <= 16; p1: [C, R]; p2: [R, N] (same dtype, rows
    contiguous, R <= 256); bias: [N] fp32 or None. ``live``: [1] int32 on the device, the
    number of leading rows of x that count (the rest pad a captured batch), None for all.
    ``scratch``: a zeroed int32 tensor of at least ``scratch_numel(B, R)`` elements the
    kernel sums into (the count is at ``SCRATCH_COUNT``), so that a caller zeroing many at
    once (a captured step, once for every layer) saves this call's memset; None: one is
    made here."""
    _check_lowrank(x, p1, p2)
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    b, c = x.shape
    r = p1.shape[1]
    n = p2.shape[1]
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32
                             or bias.stride(0) != 1):
        raise ValueError(f"bias: expected [{n}] contiguous float32, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    if live is not None and (live.shape != (1,) or live.dtype != torch.int32):
        raise ValueError(f"live: expected [1] int32, got {live.dtype} {tuple(live.shape)}")
    need = scratch_numel(b, r)
    if scratch is None:  # one memset: [done, count, pad..., h (B x R fp32)]
        scratch = torch.zeros(need, dtype=torch.int32, device=x.device)
    elif (scratch.dtype != torch.int32 or scratch.dim() != 1 or scratch.numel() < need
          or scratch.device != x.device):
        raise ValueError(f"scratch: expected a zeroed 1-D int32 tensor of >= {need} elements "
                         f"on {x.device}, got {scratch.dtype} {tuple(scratch.shape)} on "
                         f"{scratch.device}")
    h = scratch[SCRATCH_HEAD: need].view(torch.float32)
    count = scratch[SCRATCH_COUNT: SCRATCH_COUNT + 1]
    idx = torch.empty(capacity, dtype=torch.int32, device=x.device)
    ns1 = triton.cdiv(c, split_c)
    _lowrank_select_kernel[(ns1 + triton.cdiv(n, block_n),)](
        x, p1, p2, h if bias is None else bias, scratch[2:3] if live is None else live, h,
        scratch[0:1], idx, count, b, c, r, n, capacity,
        float(threshold), x.stride(0), p1.stride(0), p2.stride(0), ns1,
        BLOCK_B=16, BLOCK_R=max(16, triton.next_power_of_2(r)), SPLIT_C=split_c,
        BLOCK_N=block_n, DOT_FP32=interpreting(), HAS_BIAS=bias is not None,
        HAS_LIVE=live is not None, num_warps=num_warps)
    return idx, count


def lowrank_scores_reference(x: Tensor, p1: Tensor, p2: Tensor,
                             bias: Tensor | None = None) -> Tensor:
    """[B, N] fp32 scores of the low-rank predictor, hidden rounded to x's dtype."""
    scores = (x.float() @ p1.float()).to(x.dtype).float() @ p2.float()
    return scores if bias is None else scores + bias.float()
