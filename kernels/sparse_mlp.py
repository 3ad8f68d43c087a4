"""Sparse OPT MLP for decode: only the selected neurons' rows are read.

    out[b, :] = residual[b, :] + bias2 + sum_{n in selected} relu(x[b] . W1[n] + b1[n]) * W2t[n]

W1 is fc1.weight [F, C]; W2t is fc2.weight transposed [F, C], so that a neuron's fc2
column is a contiguous row. Two layouts use the same kernel through strides:
  - split: W1 [F, C], W2t [F, C], b1 [F] in three tensors (row stride C, bias stride 1);
  - record: one row per neuron [fc1 row | fc2 column | fc1 bias | pad] (design.md), so
    that a neuron is one contiguous read; W1, W2t, b1 are strided views of it.

Rows may sit in two tables: a resident one (GPU memory, e.g. a hot-row cache) and a host
one (pinned host memory seen through ``host_memory.device_view``). ``locs[k]`` says where
the k-th selected neuron lives: ``locs >= 0`` is a row of the resident table, ``locs < 0``
is row ``-locs - 1`` of the host table. With one table, ``locs`` is just the neuron ids.

The kernel sums partial products of neuron blocks into an fp32 accumulator with atomic
adds (order-dependent rounding at the last fp32 bit; fine for inference, not bitwise
reproducible). What this module does not know: which neurons are selected (predictors) or
where rows are placed (``runtime.weight_store``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .env import interpreting
from .mlp_chained import launch_chained
from .rows import check_ids_on_cpu, rows_of

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_BATCH = 16


class NeuronRows(NamedTuple):
    """One table of neuron rows: fc1 rows [N, C], fc2 columns as rows [N, C], fc1 bias [N]
    (views; w1 and w2t share a row stride, their last dim is contiguous)."""

    w1: Tensor
    w2t: Tensor
    b1: Tensor


@triton.jit
def _sparse_mlp_kernel(
    x_ptr,  # [B, C] input rows (after the layer norm), model dtype
    locs_ptr,  # [K] int32/int64: >= 0 row of the resident table, < 0 row (-loc-1) of the host table
    w1_dev_ptr,  # resident table: fc1 rows, row stride stride_w
    w2_dev_ptr,  # resident table: fc2 columns stored as rows, row stride stride_w
    b1_dev_ptr,  # resident table: fc1 bias, stride stride_b1
    w1_host_ptr,  # host table (mapped pinned memory), same strides as the resident one
    w2_host_ptr,
    b1_host_ptr,
    acc_ptr,  # [B, C] fp32 accumulator, updated with atomic adds
    B,  # batch rows (<= BLOCK_B)
    C,  # hidden size
    K,  # number of selected neurons
    stride_xb,  # row stride of x (elements)
    stride_w,  # row stride of a table (elements; C for split, the record length for records)
    stride_b1,  # stride of the fc1 bias (1 for split, the record length for records)
    stride_accb,  # row stride of the accumulator
    HAS_HOST: tl.constexpr,  # whether negative locs may occur (two tables)
    BLOCK_B: tl.constexpr,  # batch rows, padded to 16 for the dot (1 without it)
    BLOCK_N: tl.constexpr,  # neurons per program
    USE_DOT: tl.constexpr,  # tensor-core dots (BLOCK_B, BLOCK_N >= 16) or multiply-reduce
    BLOCK_C: tl.constexpr,  # hidden columns per step
    DOT_FP32: tl.constexpr,  # upcast dot operands (the CPU interpreter's bf16 dot is wrong)
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < K
    loc = tl.load(locs_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    if HAS_HOST:
        on_host = loc < 0
        row = tl.where(on_host, -loc - 1, loc)
        w1_rows = tl.where(on_host, w1_host_ptr + row * stride_w, w1_dev_ptr + row * stride_w)
        w2_rows = tl.where(on_host, w2_host_ptr + row * stride_w, w2_dev_ptr + row * stride_w)
        b1_rows = tl.where(on_host, b1_host_ptr + row * stride_b1, b1_dev_ptr + row * stride_b1)
    else:
        w1_rows = w1_dev_ptr + loc * stride_w
        w2_rows = w2_dev_ptr + loc * stride_w
        b1_rows = b1_dev_ptr + loc * stride_b1
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B

    # Phase 1: pre-activations of this block's neurons for every batch row.
    pre = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_c[None, :],
                     mask=b_mask[:, None] & c_mask[None, :], other=0.0)
        w = tl.load(w1_rows[:, None] + offs_c[None, :],
                    mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        if USE_DOT:
            if DOT_FP32:
                xt = xt.to(tl.float32)
                w = w.to(tl.float32)
            pre = tl.dot(xt, tl.trans(w), pre)
        else:  # small blocks (batch 1): more programs in flight, no padding to 16
            prod = xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            pre += tl.sum(prod, axis=2)
    bias = tl.load(b1_rows, mask=n_mask, other=0.0).to(tl.float32)
    # Masked (padding) neurons have zero weights and bias, so their activation is 0.
    # The activation is rounded to the model dtype, as the dense fp16/bf16 model does
    # before fc2.
    act = tl.maximum(pre + bias[None, :], 0.0).to(x_ptr.dtype.element_ty)

    # Phase 2: this block's share of fc2, added into the shared accumulator.
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        w = tl.load(w2_rows[:, None] + offs_c[None, :],
                    mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        if not USE_DOT:
            part = tl.sum(act.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        elif DOT_FP32:
            part = tl.dot(act.to(tl.float32), w.to(tl.float32))
        else:
            part = tl.dot(act, w)
        tl.atomic_add(acc_ptr + offs_b[:, None] * stride_accb + offs_c[None, :], part,
                      mask=b_mask[:, None] & c_mask[None, :])


@triton.jit
def _mlp_up_kernel(
    x_ptr,  # [B, C] input rows
    locs_ptr,  # [K] row locations, as in _sparse_mlp_kernel
    count_ptr,  # [1] int32: how many of locs are valid (read when HAS_COUNT)
    w1_dev_ptr, w1_host_ptr,  # fc1 rows in the resident / host table
    pre_ptr,  # [B, K] fp32 pre-activations (zeroed), updated with atomic adds
    B, C, K,
    stride_xb, stride_w, stride_preb,
    HAS_HOST: tl.constexpr,
    HAS_COUNT: tl.constexpr,  # the valid count lives on the device (no host sync)
    BLOCK_B: tl.constexpr,  # batch rows padded to 16
    BLOCK_N: tl.constexpr,  # neurons per program
    BLOCK_C: tl.constexpr,  # hidden columns per program: one tile, no loop
    DOT_FP32: tl.constexpr,
):
    # One tile per program, split over both neurons and columns: every program issues all
    # of its loads at once, so many tiles are in flight (the fused kernel's per-program
    # loop over C is latency-bound at small K).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_COUNT:  # K is then the capacity of locs; a larger count was truncated
        K = tl.minimum(tl.load(count_ptr), K)
    n_mask = offs_n < K
    w_rows = rows_of(locs_ptr, offs_n, n_mask, w1_dev_ptr, w1_host_ptr, stride_w, HAS_HOST)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_c[None, :],
                 mask=b_mask[:, None] & c_mask[None, :], other=0.0)
    w = tl.load(w_rows[:, None] + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :],
                other=0.0)
    if DOT_FP32:
        xt = xt.to(tl.float32)
        w = w.to(tl.float32)
    part = tl.dot(xt, tl.trans(w))
    tl.atomic_add(pre_ptr + offs_b[:, None] * stride_preb + offs_n[None, :], part,
                  mask=b_mask[:, None] & n_mask[None, :])


@triton.jit
def _mlp_down_kernel(
    pre_ptr,  # [B, K] fp32 pre-activations from _mlp_up_kernel (bias not yet added)
    locs_ptr, count_ptr,
    w2_dev_ptr, b1_dev_ptr, w2_host_ptr, b1_host_ptr,  # fc2 rows and fc1 bias, both tables
    acc_ptr,  # [B, C] fp32 accumulator, updated with atomic adds
    B, C, K,
    stride_w, stride_b1, stride_preb, stride_accb,
    HAS_HOST: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_COUNT:  # K is then the capacity of locs; a larger count was truncated
        K = tl.minimum(tl.load(count_ptr), K)
    n_mask = offs_n < K
    w_rows = rows_of(locs_ptr, offs_n, n_mask, w2_dev_ptr, w2_host_ptr, stride_w, HAS_HOST)
    b_rows = rows_of(locs_ptr, offs_n, n_mask, b1_dev_ptr, b1_host_ptr, stride_b1, HAS_HOST)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    pre = tl.load(pre_ptr + offs_b[:, None] * stride_preb + offs_n[None, :],
                  mask=b_mask[:, None] & n_mask[None, :], other=0.0)
    bias = tl.load(b_rows, mask=n_mask, other=0.0).to(tl.float32)
    act = tl.maximum(pre + bias[None, :], 0.0).to(w2_dev_ptr.dtype.element_ty)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    w = tl.load(w_rows[:, None] + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :],
                other=0.0)
    if DOT_FP32:
        part = tl.dot(act.to(tl.float32), w.to(tl.float32))
    else:
        part = tl.dot(act, w)
    tl.atomic_add(acc_ptr + offs_b[:, None] * stride_accb + offs_c[None, :], part,
                  mask=b_mask[:, None] & c_mask[None, :])


@triton.jit
def _finalize_kernel(
    acc_ptr,  # [B, C] fp32 sums from the row kernels (contiguous)
    bias_ptr,  # [C] bias (HAS_BIAS)
    res_ptr,  # [B, C] residual (HAS_RESIDUAL), row stride stride_rb
    out_ptr,  # [B, C] out, model dtype (contiguous)
    B, C, stride_rb,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One pass instead of torch's add, add, cast: fewer launches per layer.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B * C
    out = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    col = offs % C
    if HAS_BIAS:
        out += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + (offs // C) * stride_rb + col, mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def finalize(acc: Tensor, bias: Tensor | None, residual: Tensor | None,
             dtype: torch.dtype) -> Tensor:
    """acc [B, C] fp32 (contiguous) + bias [C] + residual [B, C] -> [B, C] in dtype."""
    b, c = acc.shape
    if bias is not None and (bias.shape != (c,) or bias.stride(0) != 1):
        raise ValueError(f"bias: expected a contiguous [{c}], got {tuple(bias.shape)}")
    if residual is not None and (residual.shape != (b, c) or residual.stride(1) != 1):
        raise ValueError(f"residual: expected [{b}, {c}] with contiguous rows, got "
                         f"{tuple(residual.shape)}")
    out = torch.empty((b, c), dtype=dtype, device=acc.device)
    block = 1024
    _finalize_kernel[(triton.cdiv(b * c, block),)](
        acc, bias if bias is not None else acc, residual if residual is not None else acc, out,
        b, c, residual.stride(0) if residual is not None else 0,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCK=block)
    return out


def _check_table(name: str, t: NeuronRows, c: int, dtype: torch.dtype) -> None:
    for part in ("w1", "w2t"):
        w = getattr(t, part)
        if w.dim() != 2 or w.shape[1] != c or w.stride(1) != 1:
            raise ValueError(f"{name}.{part}: expected [N, {c}] with contiguous rows, got "
                             f"shape {tuple(w.shape)} strides {w.stride()}")
        if w.dtype != dtype:
            raise ValueError(f"{name}.{part}: dtype {w.dtype} differs from x's {dtype}")
    if t.w1.stride(0) != t.w2t.stride(0) or t.w1.shape[0] != t.w2t.shape[0]:
        raise ValueError(f"{name}: w1 and w2t must have the same rows and row stride")
    if t.b1.dim() != 1 or t.b1.shape[0] != t.w1.shape[0] or t.b1.dtype != dtype:
        raise ValueError(f"{name}.b1: expected [{t.w1.shape[0]}] of {dtype}, got "
                         f"{tuple(t.b1.shape)} of {t.b1.dtype}")


def sparse_mlp(x: Tensor, rows: NeuronRows, locs: Tensor, *, host: NeuronRows | None = None,
               bias2: Tensor | None = None, residual: Tensor | None = None,
               block_n: int = 16, block_c: int = 256, num_warps: int = 4,
               num_stages: int = 3, split_c: int = 0, count: Tensor | None = None,
               chained: bool = False, block_n2: int | None = None,
               split_c2: int | None = None, workspace: Tensor | None = None,
               prefetch: bool = True, clean: bool = True) -> Tensor:
    """``residual + bias2 + sum_n relu(x W1[n] + b1[n]) W2t[n]`` over the selected neurons.

    Three schedules of the same math:
      - chained=True (the fast one, mlp_chained.py): one launch; fc1 tiles of
        [block_n, split_c], fc2 tiles of [block_n2, split_c2] (defaults: the fc1 sizes)
        chained on them by device counters, the epilogue done by the last fc2 tile of each
        column chunk. ``workspace`` (mlp_chained.mlp_workspace) saves the per-call memset
        (zero on entry; ``clean`` False leaves it used, for a caller that zeroes it again);
        ``prefetch`` lets fc2 tiles load their rows before fc1 is done;
      - split_c > 0: fc1 and fc2 as two kernels of one [block_n, split_c] tile per program,
        then a finalize kernel (four launches with the memset);
      - otherwise one kernel whose programs loop over C (fc1, then fc2) for block_n neurons.
    count: [1] int32 on the device, the number of valid entries at the front of locs
    (selections compacted on the GPU, no host sync); requires split_c or chained.

    x: [B, C] fp16/bf16, 1 <= B <= 16. rows: the resident table; host: the optional host
    table (same strides; mapped pinned memory on a GPU). locs: [K] int32/int64 on x's
    device (see the module docstring; not range-checked on the GPU, which would
    synchronise). Returns [B, C] in x's dtype. K = 0 returns residual + bias2.
    """
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH or x.stride(1) != 1:
        raise ValueError(f"x: expected [B, C] with 1 <= B <= {MAX_BATCH} and contiguous rows, "
                         f"got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported, use float16 or bfloat16")
    b, c = x.shape
    _check_table("rows", rows, c, x.dtype)
    if host is not None:
        _check_table("host", host, c, x.dtype)
        # The kernel applies one set of strides to both tables; a table of fewer than two
        # rows has arbitrary (normalised) strides that are never used.
        if rows.w1.shape[0] > 1 and host.w1.shape[0] > 1 and (
                host.w1.stride(0) != rows.w1.stride(0) or host.b1.stride(0) != rows.b1.stride(0)):
            raise ValueError("host and resident tables must share strides (same layout)")
    if locs.dim() != 1 or locs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"locs: expected a 1-D int32/int64 tensor, got {locs.dtype} "
                         f"{tuple(locs.shape)}")
    if locs.device != x.device or rows.w1.device != x.device:
        raise ValueError("x, locs and the resident table must be on the same device")
    if count is not None and not (split_c or chained):
        raise ValueError("count needs the split or chained kernels (split_c > 0 or chained)")
    if workspace is not None and not chained:
        raise ValueError("workspace is for the chained kernel (chained=True)")
    # Range check only where it is cheap (CPU); on a GPU it would synchronise.
    check_ids_on_cpu(locs, -host.w1.shape[0] if host is not None else 0, rows.w1.shape[0],
                     "locs", count)

    k = locs.numel()
    if chained and k:
        sc = split_c or block_c
        return launch_chained(x, rows, locs, host, bias2, residual, count, block_n=block_n,
                              split_c=sc, block_n2=block_n2 or block_n,
                              split_c2=split_c2 or sc, num_warps=num_warps,
                              workspace=workspace, dot_fp32=interpreting(),
                              prefetch=prefetch, clean=clean)
    # One zeroed buffer for the output sums and (split path) the pre-activations: one
    # memset, not two.
    scratch = torch.zeros(b * c + (b * k if split_c else 0), dtype=torch.float32,
                          device=x.device)
    acc = scratch[: b * c].view(b, c)
    if k and split_c:
        h = host if host is not None else rows
        st = host if host is not None and host.w1.shape[0] > rows.w1.shape[0] else rows
        if block_n < 16:
            raise ValueError(f"split kernels need block_n >= 16, got {block_n}")
        pre = scratch[b * c:].view(b, k)
        cnt = count if count is not None else locs  # placeholder pointer when unused
        grid = (triton.cdiv(k, block_n), triton.cdiv(c, split_c))
        meta = dict(HAS_HOST=host is not None, HAS_COUNT=count is not None, BLOCK_B=16,
                    BLOCK_N=block_n, BLOCK_C=split_c, DOT_FP32=interpreting(),
                    num_warps=num_warps)
        _mlp_up_kernel[grid](x, locs, cnt, rows.w1, h.w1, pre, b, c, k, x.stride(0),
                             st.w1.stride(0), pre.stride(0), **meta)
        _mlp_down_kernel[grid](pre, locs, cnt, rows.w2t, rows.b1, h.w2t, h.b1, acc, b, c, k,
                               st.w1.stride(0), st.b1.stride(0), pre.stride(0), acc.stride(0),
                               **meta)
    elif k:
        h = host if host is not None else rows
        st = host if host is not None and host.w1.shape[0] > rows.w1.shape[0] else rows
        # Tensor-core dots need 16 rows on each side; batch-1 blocks of fewer neurons use a
        # multiply-reduce instead (more, smaller programs: more loads in flight).
        use_dot = block_n >= 16 or b > 1
        if use_dot and block_n < 16:
            raise ValueError(f"block_n={block_n} < 16 needs batch 1")
        grid = (triton.cdiv(k, block_n),)
        _sparse_mlp_kernel[grid](
            x, locs, rows.w1, rows.w2t, rows.b1, h.w1, h.w2t, h.b1, acc,
            b, c, k, x.stride(0), st.w1.stride(0), st.b1.stride(0), acc.stride(0),
            HAS_HOST=host is not None, BLOCK_B=16 if use_dot else 1, BLOCK_N=block_n,
            USE_DOT=use_dot, BLOCK_C=block_c,
            DOT_FP32=interpreting(),
            num_warps=num_warps, num_stages=num_stages,
        )
    return finalize(acc, bias2, residual, x.dtype)


def sparse_mlp_reference(x: Tensor, w1: Tensor, b1: Tensor, w2t: Tensor, neurons: Tensor,
                         bias2: Tensor | None = None,
                         residual: Tensor | None = None) -> Tensor:
    """Plain PyTorch twin in float32: neuron ids index W1 [F, C], b1 [F], W2t [F, C]."""
    xf = x.float()
    ids = neurons.long()
    act = torch.relu(xf @ w1[ids].float().T + b1[ids].float())
    act = act.to(x.dtype).float()  # the dense model feeds fc2 activations in its dtype
    out = act @ w2t[ids].float()
    if bias2 is not None:
        out = out + bias2.float()
    if residual is not None:
        out = out + residual.float()
    return out.to(x.dtype)


def dense_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2t: Tensor, bias2: Tensor | None = None,
              residual: Tensor | None = None) -> Tensor:
    """The dense baseline through the vendor library (cuBLAS on a GPU): every row read."""
    out = torch.relu(torch.nn.functional.linear(x, w1, b1)) @ w2t
    if bias2 is not None:
        out = out + bias2
    if residual is not None:
        out = out + residual
    return out
