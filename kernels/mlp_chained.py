"""The sparse MLP in one launch: fc1 tiles, then fc2 tiles chained on them by device counters,
then the epilogue (fc2 bias + residual + cast) by whichever fc2 tile finishes a column last.

Same math as ``sparse_mlp`` (see sparse_mlp.py for the layouts and ``locs``); this module
only changes how the work is scheduled, so that a batch-1 call is one kernel (plus one
memset, or none with a self-cleaning workspace) instead of memset, fc1, fc2 and finalize.

Tiles, in program order:
  1. fc1: [BLOCK_N neurons x SPLIT_C columns] partial pre-activations, added atomically
     into ``pre`` [B, K] fp32; then the counter of its fc2 group is incremented.
  2. fc2: [BLOCK_N2 neurons x SPLIT_C2 columns]: waits until every fc1 tile of its neurons
     has counted in, applies bias + ReLU (rounded to the model dtype, as the dense model
     does), multiplies by the fc2 rows and adds atomically into ``acc`` [B, C] fp32; then
     the column chunk's counter is incremented, and the tile that brings it to the number
     of neuron groups writes ``out = acc + bias2 + residual`` for that chunk.
A program only ever waits for programs of smaller id, which never wait themselves. That is
deadlock-free because NVIDIA GPUs dispatch the blocks of a 1-D grid in increasing order
(relied on by single-pass scans and stream-K GEMMs, though CUDA does not promise it), so a
waiting block's producers are running or done. A ticket counter handing out tile ids would
not need that, but it was measured slower: every program's atomic on one address
serialises in L2 (~2.5 ns each, 2,560 programs at OPT-13B). The Triton interpreter runs
programs one by one in order, so there every wait is already satisfied.

The workspace holds the counters, ``pre`` and ``acc``, and must be zero on entry. Given one
by the caller (``workspace=``), the kernel leaves it zero again on exit (each region is
reset by its last user), so no memset is needed per call; such a workspace must not be
used by two calls at once (one stream). The reset costs a round trip per fc2 tile (measured
no faster than the memset it saves), so a caller that zeroes many calls' workspaces at
once (a captured step: every layer's in one memset) passes ``clean=False``: the kernel
then leaves the workspace as it is. What this module does not know: which neurons are
selected or where rows live.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .rows import rows_of

SYNC_ALIGN = 32  # int32 slots; keeps pre/acc 128-byte aligned behind the counters
MIN_BLOCK = 16  # smallest block the sizing below allows (also tl.dot's minimum)


@triton.jit
def _spin_until(ptr, target):
    """Wait until the int32 at ptr reaches target (acquire: later reads see what the
    incrementing programs wrote before their release)."""
    seen = tl.atomic_add(ptr, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(ptr, 0, sem="acquire")


@triton.jit
def _fc1_tile(t, x_ptr, locs_ptr, w1_dev_ptr, w1_host_ptr, grp_ptr, pre_ptr, B, C, K, KCAP,
              stride_xb, stride_w, NC1, HAS_HOST: tl.constexpr, USE_DOT: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_C: tl.constexpr,
              BLOCK_N2: tl.constexpr, DOT_FP32: tl.constexpr):
    """Tile t of fc1: partial pre-activations of BLOCK_N neurons over SPLIT_C columns."""
    nb = t // NC1
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < K
    rows = rows_of(locs_ptr, offs_n, n_mask, w1_dev_ptr, w1_host_ptr, stride_w, HAS_HOST)
    offs_c = (t % NC1) * SPLIT_C + tl.arange(0, SPLIT_C)
    c_mask = offs_c < C
    w = tl.load(rows[:, None] + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :],
                other=0.0)
    if USE_DOT:
        offs_b = tl.arange(0, BLOCK_B)
        b_mask = offs_b < B
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_c[None, :],
                     mask=b_mask[:, None] & c_mask[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            w = w.to(tl.float32)
        part = tl.dot(xt, tl.trans(w))  # [BLOCK_B, BLOCK_N]
        tl.atomic_add(pre_ptr + offs_b[:, None] * KCAP + offs_n[None, :], part,
                      mask=b_mask[:, None] & n_mask[None, :], sem="relaxed")
    else:
        xv = tl.load(x_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        part = tl.sum(w.to(tl.float32) * xv[None, :], axis=1)  # [BLOCK_N]
        tl.atomic_add(pre_ptr + offs_n, part, mask=n_mask, sem="relaxed")
    # The data adds are relaxed (fire and forget); the barrier puts every thread's adds
    # before thread 0's release below, which publishes them all (as a grid sync's
    # __syncthreads + __threadfence + atomicAdd does).
    tl.debug_barrier()
    tl.atomic_add(grp_ptr + nb // (BLOCK_N2 // BLOCK_N), 1, sem="release")


@triton.jit
def _fc2_tile(u, locs_ptr, w2_dev_ptr, b1_dev_ptr, w2_host_ptr, b1_host_ptr, bias2_ptr,
              res_ptr, out_ptr, grp_ptr, rd_ptr, col_ptr, pre_ptr, acc_ptr, B, C, K, KCAP,
              stride_w, stride_b1, stride_rb, NB1, NC1, NG, NC2,
              HAS_HOST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              CLEAN: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, SPLIT_C2: tl.constexpr,
              PREFETCH: tl.constexpr, DOT_FP32: tl.constexpr):
    """Tile u of fc2: BLOCK_N2 neurons' activations times their fc2 rows over SPLIT_C2
    columns, added into acc; the column chunk's last tile writes out."""
    g = u // NC2  # group-major: the first groups' inputs are the first to finish
    cc = u % NC2
    offs_n = g * BLOCK_N2 + tl.arange(0, BLOCK_N2)
    n_mask = offs_n < K
    w_rows = rows_of(locs_ptr, offs_n, n_mask, w2_dev_ptr, w2_host_ptr, stride_w, HAS_HOST)
    b_rows = rows_of(locs_ptr, offs_n, n_mask, b1_dev_ptr, b1_host_ptr, stride_b1, HAS_HOST)
    bias = tl.load(b_rows, mask=n_mask, other=0.0).to(tl.float32)
    offs_c = cc * SPLIT_C2 + tl.arange(0, SPLIT_C2)
    c_mask = offs_c < C
    # Wait for NC1 tiles of each fc1 block in the group (the last group may hold fewer).
    # PREFETCH issues the fc2 rows first, so they stream while fc1 finishes; without it
    # they queue behind, and fc1's rows (the critical path) get the memory system first.
    ratio: tl.constexpr = BLOCK_N2 // BLOCK_N
    w_ptrs = w_rows[:, None] + offs_c[None, :]
    w_mask = n_mask[:, None] & c_mask[None, :]
    if PREFETCH:
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        _spin_until(grp_ptr + g, NC1 * tl.minimum(ratio, NB1 - g * ratio))
    else:
        _spin_until(grp_ptr + g, NC1 * tl.minimum(ratio, NB1 - g * ratio))
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    tl.debug_barrier()  # every thread's reads of pre come after the acquire
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    # Masked (padding) neurons have zero weights and bias, so their activation is 0.
    if USE_DOT:
        pre = tl.load(pre_ptr + offs_b[:, None] * KCAP + offs_n[None, :],
                      mask=b_mask[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg")
        act = tl.maximum(pre + bias[None, :], 0.0).to(w2_dev_ptr.dtype.element_ty)
        if DOT_FP32:
            part = tl.dot(act.to(tl.float32), w.to(tl.float32))
        else:
            part = tl.dot(act, w)  # [BLOCK_B, SPLIT_C2]
        tl.atomic_add(acc_ptr + offs_b[:, None] * C + offs_c[None, :], part,
                      mask=b_mask[:, None] & c_mask[None, :], sem="relaxed")
    else:
        pre = tl.load(pre_ptr + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
        act = tl.maximum(pre + bias, 0.0).to(w2_dev_ptr.dtype.element_ty)
        part = tl.sum(act.to(tl.float32)[:, None] * w.to(tl.float32), axis=0)  # [SPLIT_C2]
        tl.atomic_add(acc_ptr + offs_c, part, mask=c_mask, sem="relaxed")
    tl.debug_barrier()
    arrived = tl.atomic_add(col_ptr + cc, 1, sem="acq_rel")
    if arrived == NG - 1:  # the last group for this column chunk: the epilogue
        out_mask = b_mask[:, None] & c_mask[None, :]
        acc_tile = acc_ptr + offs_b[:, None] * C + offs_c[None, :]
        o = tl.load(acc_tile, mask=out_mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            o += tl.load(bias2_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            o += tl.load(res_ptr + offs_b[:, None] * stride_rb + offs_c[None, :],
                         mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_b[:, None] * C + offs_c[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
        if CLEAN:
            tl.store(acc_tile, tl.zeros((BLOCK_B, SPLIT_C2), tl.float32), mask=out_mask)
            tl.atomic_xchg(col_ptr + cc, 0)
    if CLEAN:
        readers = tl.atomic_add(rd_ptr + g, 1, sem="acq_rel")
        if readers == NC2 - 1:  # every fc2 tile of this group has read its pre
            pmask = b_mask[:, None] & (offs_n < KCAP)[None, :]
            tl.store(pre_ptr + offs_b[:, None] * KCAP + offs_n[None, :],
                     tl.zeros((BLOCK_B, BLOCK_N2), tl.float32), mask=pmask)
            tl.atomic_xchg(grp_ptr + g, 0)
            tl.atomic_xchg(rd_ptr + g, 0)


@triton.jit
def _mlp_chained_kernel(
    x_ptr,  # [B, C] input rows (after the layer norm), model dtype
    locs_ptr,  # [KCAP] row locations (>= 0 resident table, < 0 host row -loc-1)
    count_ptr,  # [1] int32: valid entries at the front of locs (read when HAS_COUNT)
    w1_dev_ptr, w2_dev_ptr, b1_dev_ptr,  # resident table: fc1 rows, fc2 columns, fc1 bias
    w1_host_ptr, w2_host_ptr, b1_host_ptr,  # host table (same strides)
    bias2_ptr,  # [C] fc2 bias (HAS_BIAS)
    res_ptr,  # [B, C] residual (HAS_RESIDUAL), row stride stride_rb
    out_ptr,  # [B, C] out, model dtype, contiguous
    sync_ptr,  # int32 counters, see below
    pre_ptr,  # [B, KCAP] fp32 pre-activation sums (zero on entry)
    acc_ptr,  # [B, C] fp32 output sums (zero on entry)
    B, C, KCAP,
    stride_xb, stride_w, stride_b1, stride_rb,
    NB1,  # fc1 neuron blocks: cdiv(KCAP, BLOCK_N)
    NC1,  # fc1 column chunks: cdiv(C, SPLIT_C)
    NG,  # fc2 neuron groups: cdiv(KCAP, BLOCK_N2)
    NC2,  # fc2 column chunks: cdiv(C, SPLIT_C2)
    HAS_HOST: tl.constexpr,
    HAS_COUNT: tl.constexpr,  # the valid count lives on the device (no host sync)
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    CLEAN: tl.constexpr,  # leave the workspace zero on exit (caller-owned workspace)
    USE_DOT: tl.constexpr,  # tensor-core dots over 16 padded batch rows; else batch-1 FMAs
    BLOCK_B: tl.constexpr,  # 16 with USE_DOT, else 1
    BLOCK_N: tl.constexpr,  # fc1 tile: neurons
    SPLIT_C: tl.constexpr,  # fc1 tile: columns
    BLOCK_N2: tl.constexpr,  # fc2 tile: neurons (a multiple of BLOCK_N)
    SPLIT_C2: tl.constexpr,  # fc2 tile: columns
    PREFETCH: tl.constexpr,  # fc2 tiles load their rows before waiting for fc1
    DOT_FP32: tl.constexpr,  # upcast dot operands (the CPU interpreter's bf16 dot is wrong)
):
    # Counter slots: [0, NG) fc1 tiles done per fc2 group, [NG, 2 NG) fc2 tiles that
    # have read each group's pre (CLEAN), then NC2 column arrivals.
    grp_ptr = sync_ptr
    rd_ptr = grp_ptr + NG
    col_ptr = rd_ptr + NG
    t = tl.program_id(0)
    K = KCAP
    NB1E = NB1  # fc1 blocks and fc2 groups that hold selected neurons
    NGE = NG
    if HAS_COUNT:  # a count above the capacity was truncated by the selector
        K = tl.minimum(tl.load(count_ptr), KCAP)
        # Tiles past the count return at once, without bookkeeping: a capacity of every
        # neuron then costs little more than one sized to the selection. (At least one
        # block and group run, so that an empty selection still writes the epilogue.)
        NB1E = tl.maximum(tl.cdiv(K, BLOCK_N), 1)
        NGE = tl.maximum(tl.cdiv(K, BLOCK_N2), 1)
    T1 = NB1 * NC1
    if t < T1:
        if t // NC1 >= NB1E:
            return
        _fc1_tile(t, x_ptr, locs_ptr, w1_dev_ptr, w1_host_ptr, grp_ptr, pre_ptr, B, C, K, KCAP,
                  stride_xb, stride_w, NC1, HAS_HOST, USE_DOT, BLOCK_B, BLOCK_N, SPLIT_C,
                  BLOCK_N2, DOT_FP32)
    else:
        if (t - T1) // NC2 >= NGE:
            return
        _fc2_tile(t - T1, locs_ptr, w2_dev_ptr, b1_dev_ptr, w2_host_ptr, b1_host_ptr,
                  bias2_ptr, res_ptr, out_ptr, grp_ptr, rd_ptr, col_ptr, pre_ptr, acc_ptr,
                  B, C, K, KCAP, stride_w, stride_b1, stride_rb, NB1E, NC1, NGE, NC2,
                  HAS_HOST, HAS_BIAS, HAS_RESIDUAL, CLEAN, USE_DOT, BLOCK_B, BLOCK_N,
                  BLOCK_N2, SPLIT_C2, PREFETCH, DOT_FP32)


def _sync_len(k: int, c: int) -> int:
    """int32 slots for the counters at the smallest blocks (16)."""
    n = 2 * triton.cdiv(k, MIN_BLOCK) + triton.cdiv(c, MIN_BLOCK)
    return triton.cdiv(n, SYNC_ALIGN) * SYNC_ALIGN


def workspace_numel(batch: int, hidden: int, capacity: int) -> int:
    """int32 elements of a workspace that serves any call with B <= batch and K <= capacity."""
    return _sync_len(capacity, hidden) + batch * capacity + batch * hidden


def mlp_workspace(batch: int, hidden: int, capacity: int, device) -> Tensor:
    """A zeroed workspace for ``sparse_mlp(..., chained=True, workspace=...)``: reused across
    calls on one stream (the kernel leaves it zero), never by two calls at once."""
    return torch.zeros(workspace_numel(batch, hidden, capacity), dtype=torch.int32,
                       device=device)


def launch_chained(x: Tensor, rows, locs: Tensor, host, bias2: Tensor | None,
                   residual: Tensor | None, count: Tensor | None, *, block_n: int,
                   split_c: int, block_n2: int, split_c2: int, num_warps: int,
                   workspace: Tensor | None, dot_fp32: bool, prefetch: bool = True,
                   clean: bool = True) -> Tensor:
    """Launch the chained kernel on validated inputs (see sparse_mlp); returns [B, C].
    ``clean``: leave a given workspace zero on exit (False: the caller zeroes it again)."""
    b, c = x.shape
    k = locs.numel()
    for name, v in (("block_n", block_n), ("split_c", split_c), ("block_n2", block_n2),
                    ("split_c2", split_c2)):
        if v < MIN_BLOCK or v & (v - 1):
            raise ValueError(f"{name}={v}: the chained kernel needs a power of two >= 16")
    if block_n2 % block_n:
        raise ValueError(f"block_n2={block_n2} must be a multiple of block_n={block_n}")
    need = workspace_numel(b, c, k)
    if workspace is None:
        ws, clean = torch.zeros(need, dtype=torch.int32, device=x.device), False
    else:
        if workspace.dtype != torch.int32 or workspace.dim() != 1 or workspace.numel() < need:
            raise ValueError(f"workspace: expected a zeroed 1-D int32 tensor of >= {need} "
                             f"elements (mlp_workspace), got {workspace.dtype} "
                             f"{tuple(workspace.shape)}")
        if workspace.device != x.device:
            raise ValueError("workspace must be on x's device")
        ws = workspace
    s = _sync_len(k, c)
    pre = ws[s: s + b * k].view(torch.float32)
    acc = ws[s + b * k: s + b * k + b * c].view(torch.float32)
    out = torch.empty((b, c), dtype=x.dtype, device=x.device)
    h = host if host is not None else rows
    st = host if host is not None and host.w1.shape[0] > rows.w1.shape[0] else rows
    nb1, nc1 = triton.cdiv(k, block_n), triton.cdiv(c, split_c)
    ng, nc2 = triton.cdiv(k, block_n2), triton.cdiv(c, split_c2)
    use_dot = b > 1
    _mlp_chained_kernel[(nb1 * nc1 + ng * nc2,)](
        x, locs, count if count is not None else locs,
        rows.w1, rows.w2t, rows.b1, h.w1, h.w2t, h.b1,
        bias2 if bias2 is not None else x, residual if residual is not None else x, out,
        ws, pre, acc, b, c, k,
        x.stride(0), st.w1.stride(0), st.b1.stride(0),
        residual.stride(0) if residual is not None else 0,
        nb1, nc1, ng, nc2,
        HAS_HOST=host is not None, HAS_COUNT=count is not None, HAS_BIAS=bias2 is not None,
        HAS_RESIDUAL=residual is not None, CLEAN=clean, USE_DOT=use_dot,
        BLOCK_B=16 if use_dot else 1, BLOCK_N=block_n, SPLIT_C=split_c, BLOCK_N2=block_n2,
        SPLIT_C2=split_c2, PREFETCH=prefetch, DOT_FP32=dot_fp32, num_warps=num_warps)
    return out
