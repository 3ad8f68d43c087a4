"""Sparse OPT attention for decode (one new token per batch row): only selected heads.

Three steps, each a Triton kernel with a launcher, plus one launcher running them all:
  1. ``qkv_projection``: q, k, v of the selected heads from x [B, C]; q (scaled by
     D^-0.5, as runtime/model.py does) goes to a [B, Hs, D] buffer, k and v straight into
     the KV cache ([S, H, L, D] per layer, runtime/model.py's KVCache) at each row's slot
     and position;
  2. ``decode_attention``: each row's query against its cached keys 0..position
     (split over the sequence, flash-decoding style, then combined);
  3. ``out_projection``: sum over the selected heads of attn[b, h] @ Wo_h, where Wo_h is
     head h's columns of out_proj.weight stored as D rows of C (so a head is contiguous).

Weights come as ``HeadRows`` views. The split layout packs q/k/v into [3, H, D, C]; the
record layout (design.md: one record per head = q rows | k rows | v rows | out_proj
columns | q/k/v biases) gives the same views with other strides. As in sparse_mlp, rows
may sit in a resident table and a host table; ``locs`` (>= 0 resident row, < 0 host row
-loc-1) says where each selected head lives, ``heads`` says which head it is (for the
cache).

What this module does not know: keys and values of heads *not* selected at this step are
not computed here; keeping the cache complete for them (compute K/V for all heads, or
recompute lazily) is the caller's policy (design.md, "KV cache").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .env import interpreting
from .rows import check_ids_on_cpu
from .sparse_mlp import MAX_BATCH, SUPPORTED_DTYPES, finalize


class HeadRows(NamedTuple):
    """One table of head rows: wqkv [3, N, D, C], bqkv [3, N, D], wo [N, D, C] (views whose
    last dim is contiguous; a head's wo rows are its out_proj columns)."""

    wqkv: Tensor
    bqkv: Tensor
    wo: Tensor


@triton.jit
def _head_base(locs_ptr, pid_h, dev_ptr, host_ptr, HAS_HOST: tl.constexpr):
    """(row, table base pointer) of the pid_h-th selected head."""
    loc = tl.load(locs_ptr + pid_h).to(tl.int64)
    if HAS_HOST:
        on_host = loc < 0
        return tl.where(on_host, -loc - 1, loc), tl.where(on_host, host_ptr, dev_ptr)
    return loc, dev_ptr


@triton.jit
def _qkv_epilogue(acc, which, pid_h, row, b_base, offs_b, b_mask, offs_d, d_mask, heads_ptr,
                  q_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, pos_ptr, scale,
                  stride_b_which, stride_b_head, stride_qb, stride_qh,
                  stride_cs, stride_ch, stride_cl):
    """Bias, then q (scaled) to its buffer or k / v into the cache at each row's slot."""
    bias = tl.load(b_base + which * stride_b_which + row * stride_b_head + offs_d,
                   mask=d_mask, other=0.0).to(tl.float32)
    acc += bias[None, :]
    mask = b_mask[:, None] & d_mask[None, :]
    if which == 0:
        q = (acc * scale).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + offs_b[:, None] * stride_qb + pid_h * stride_qh + offs_d[None, :], q,
                 mask=mask)
    else:
        head = tl.load(heads_ptr + pid_h).to(tl.int64)
        slot = tl.load(slots_ptr + offs_b, mask=b_mask, other=0).to(tl.int64)
        pos = tl.load(pos_ptr + offs_b, mask=b_mask, other=0).to(tl.int64)
        dst = (slot * stride_cs + head * stride_ch + pos * stride_cl)[:, None] + offs_d[None, :]
        if which == 1:
            tl.store(k_cache_ptr + dst, acc.to(k_cache_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(v_cache_ptr + dst, acc.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_kernel(
    x_ptr,  # [B, C] input rows (after the layer norm)
    heads_ptr,  # [Hs] int: head ids (where k/v go in the cache)
    locs_ptr,  # [Hs] int: >= 0 resident table row, < 0 host table row (-loc-1)
    w_dev_ptr, b_dev_ptr,  # resident wqkv / bqkv
    w_host_ptr, b_host_ptr,  # host wqkv / bqkv (same strides)
    q_ptr,  # [B, Hs, D] out: scaled queries, model dtype
    k_cache_ptr, v_cache_ptr,  # [S, H, L, D] this layer's cache
    slots_ptr, pos_ptr,  # [B] int: cache slot and position of each row's new token
    part_ptr,  # [3, Hs, B, D] fp32 partial sums (SPLIT only; zeroed)
    B, C, D, Hs,
    scale,  # D ** -0.5, applied to q after the bias
    stride_xb,
    stride_w_which, stride_w_head, stride_w_row,  # wqkv strides (elements)
    stride_b_which, stride_b_head,  # bqkv strides
    stride_qb, stride_qh,  # q buffer strides
    stride_cs, stride_ch, stride_cl,  # cache strides (slot, head, position); D contiguous
    HAS_HOST: tl.constexpr,
    SPLIT: tl.constexpr,  # one [BLOCK_D, BLOCK_C] tile per program, summed atomically into
                          # part (then _qkv_finalize_kernel), instead of a loop over C
    BLOCK_B: tl.constexpr,  # batch rows padded to the dot's minimum (16)
    BLOCK_D: tl.constexpr,  # head-dim rows per program
    BLOCK_C: tl.constexpr,  # hidden columns per step (per program when SPLIT)
    DOT_FP32: tl.constexpr,  # upcast dot operands (the CPU interpreter's bf16 dot is wrong)
):
    pid_h = tl.program_id(0)
    which = tl.program_id(1)  # 0 q, 1 k, 2 v
    n_dblk = tl.cdiv(D, BLOCK_D)
    offs_d = (tl.program_id(2) % n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row, w_base = _head_base(locs_ptr, pid_h, w_dev_ptr, w_host_ptr, HAS_HOST)
    w_rows = w_base + which * stride_w_which + row * stride_w_head + offs_d * stride_w_row
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B

    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    if SPLIT:
        c_lo = (tl.program_id(2) // n_dblk) * BLOCK_C
        c_hi = c_lo + BLOCK_C
    else:
        c_lo = 0
        c_hi = C
    for c0 in range(c_lo, c_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_c[None, :],
                     mask=b_mask[:, None] & c_mask[None, :], other=0.0)
        w = tl.load(w_rows[:, None] + offs_c[None, :],
                    mask=d_mask[:, None] & c_mask[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(xt, tl.trans(w), acc)
    if SPLIT:
        dst = part_ptr + ((which * Hs + pid_h) * B + offs_b[:, None]) * D + offs_d[None, :]
        tl.atomic_add(dst, acc, mask=b_mask[:, None] & d_mask[None, :])
    else:
        _, b_base = _head_base(locs_ptr, pid_h, b_dev_ptr, b_host_ptr, HAS_HOST)
        _qkv_epilogue(acc, which, pid_h, row, b_base, offs_b, b_mask, offs_d, d_mask,
                      heads_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, pos_ptr, scale,
                      stride_b_which, stride_b_head, stride_qb, stride_qh,
                      stride_cs, stride_ch, stride_cl)


@triton.jit
def _qkv_finalize_kernel(
    part_ptr,  # [3, Hs, B, D] fp32 sums from _qkv_kernel (SPLIT)
    heads_ptr, locs_ptr, b_dev_ptr, b_host_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, pos_ptr,
    B, D, Hs, scale,
    stride_b_which, stride_b_head, stride_qb, stride_qh, stride_cs, stride_ch, stride_cl,
    HAS_HOST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
):
    pid_h = tl.program_id(0)
    which = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.load(part_ptr + ((which * Hs + pid_h) * B + offs_b[:, None]) * D + offs_d[None, :],
                  mask=b_mask[:, None] & d_mask[None, :], other=0.0)
    row, b_base = _head_base(locs_ptr, pid_h, b_dev_ptr, b_host_ptr, HAS_HOST)
    _qkv_epilogue(acc, which, pid_h, row, b_base, offs_b, b_mask, offs_d, d_mask,
                  heads_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, pos_ptr, scale,
                  stride_b_which, stride_b_head, stride_qb, stride_qh,
                  stride_cs, stride_ch, stride_cl)


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # [B, Hs, D] queries (scaled, unless by `scale` here)
    heads_ptr,  # [Hs] head ids
    k_cache_ptr, v_cache_ptr,  # [S, H, L, D]
    slots_ptr, pos_ptr,  # [B] slot and position of each row (keys 0..pos are visible)
    m_ptr, l_ptr,  # [B, Hs, SPLITS] fp32 out: running max and denominator per split
    acc_ptr,  # [B, Hs, SPLITS, D] fp32 out: unnormalised weighted values per split
    k_new_ptr, v_new_ptr,  # [B, Hs, D] this step's keys and values (WRITE_KV)
    Hs, D, SPLITS,
    scale,  # multiplies q as it is loaded (1.0 for queries scaled already)
    stride_qb, stride_qh,
    stride_nb, stride_nh,  # k_new / v_new strides (alike)
    stride_cs, stride_ch, stride_cl,
    CHUNK: tl.constexpr,  # positions per split (a multiple of BLOCK_L)
    BLOCK_L: tl.constexpr,  # positions per step
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
    WRITE_KV: tl.constexpr,  # write k_new / v_new into the cache at each row's position
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    slot = tl.load(slots_ptr + pid_b).to(tl.int64)
    last = tl.load(pos_ptr + pid_b).to(tl.int64)
    length = last + 1
    head = tl.load(heads_ptr + pid_h).to(tl.int64)
    q = tl.load(q_ptr + pid_b * stride_qb + pid_h * stride_qh + offs_d, mask=d_mask,
                other=0.0).to(tl.float32) * scale
    base = slot * stride_cs + head * stride_ch
    start = (pid_s * CHUNK).to(tl.int64)
    end = tl.minimum(start + CHUNK, length)
    if WRITE_KV:
        # Position `last` is read by this split alone, which takes this step's key and
        # value from the inputs (as the cache will hold them) and writes them there: no
        # program of this launch reads that cache entry.
        new = pid_b * stride_nb + pid_h * stride_nh + offs_d
        k_new = tl.load(k_new_ptr + new, mask=d_mask, other=0.0).to(k_cache_ptr.dtype.element_ty)
        v_new = tl.load(v_new_ptr + new, mask=d_mask, other=0.0).to(v_cache_ptr.dtype.element_ty)
        if (last >= start) & (last < end):
            tl.store(k_cache_ptr + base + last * stride_cl + offs_d, k_new, mask=d_mask)
            tl.store(v_cache_ptr + base + last * stride_cl + offs_d, v_new, mask=d_mask)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    # Every step starts below `end`, so it holds at least one visible key and m_i stays
    # finite after the first step; a split past the row's length runs no step at all.
    for l0 in range(start, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < end
        ptrs = base + offs_l[:, None] * stride_cl + offs_d[None, :]
        kv_mask = l_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + ptrs, mask=kv_mask, other=0.0)
        if WRITE_KV:  # the entry at `last` is stale: this step's key replaces it
            k = tl.where((offs_l == last)[:, None], k_new[None, :], k)
        k = k.to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(l_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_cache_ptr + ptrs, mask=kv_mask, other=0.0)
        if WRITE_KV:
            v = tl.where((offs_l == last)[:, None], v_new[None, :], v)
        v = v.to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    row = (pid_b * Hs + pid_h) * SPLITS + pid_s
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)
    tl.store(acc_ptr + row * D + offs_d, acc, mask=d_mask)


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr,  # per-split partials from _decode_attention_kernel
    out_ptr,  # [B, Hs, D] attention output, model dtype (contiguous)
    D, SPLITS,
    BLOCK_S: tl.constexpr,  # splits padded to a power of two
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # b * Hs + h
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m = tl.load(m_ptr + row * SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    lsum = tl.load(l_ptr + row * SPLITS + offs_s, mask=s_mask, other=0.0)
    acc = tl.load(acc_ptr + (row * SPLITS + offs_s)[:, None] * D + offs_d[None, :],
                  mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    m_max = tl.max(m, axis=0)  # split 0 always holds key 0, so this is finite
    w = tl.exp(m - m_max)  # empty splits (m = -inf) weigh 0
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * lsum, axis=0)
    tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _out_proj_kernel(
    a_ptr,  # [B, Hs, D] attention output of the selected heads
    locs_ptr,  # [Hs] int: >= 0 resident row, < 0 host row (-loc-1)
    wo_dev_ptr, wo_host_ptr,  # [N, D, C] out_proj columns per head, same strides
    acc_ptr,  # [B, C] fp32 accumulator, updated with atomic adds
    B, C, D, Hs,
    stride_ab, stride_ah,
    stride_wo_head, stride_wo_row,
    stride_accb,
    HAS_HOST: tl.constexpr,
    SPLIT_H: tl.constexpr,  # programs sharing the heads of one column block
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
    BLOCK_C: tl.constexpr,  # output columns per program
    DOT_FP32: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for h in range(tl.program_id(1), Hs, SPLIT_H):
        loc = tl.load(locs_ptr + h).to(tl.int64)
        if HAS_HOST:
            on_host = loc < 0
            row = tl.where(on_host, -loc - 1, loc)
            w_base = tl.where(on_host, wo_host_ptr, wo_dev_ptr)
        else:
            row = loc
            w_base = wo_dev_ptr
        a = tl.load(a_ptr + offs_b[:, None] * stride_ab + h * stride_ah + offs_d[None, :],
                    mask=b_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_base + row * stride_wo_head + offs_d[:, None] * stride_wo_row
                    + offs_c[None, :], mask=d_mask[:, None] & c_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc)
    tl.atomic_add(acc_ptr + offs_b[:, None] * stride_accb + offs_c[None, :], acc,
                  mask=b_mask[:, None] & c_mask[None, :])


# --- launchers ------------------------------------------------------------------------------


def _check_rows(name: str, t: HeadRows, c: int, dtype: torch.dtype) -> None:
    n, d = t.wo.shape[0], t.wo.shape[1]
    if t.wqkv.dim() != 4 or tuple(t.wqkv.shape) != (3, n, d, c) or t.wqkv.stride(3) != 1:
        raise ValueError(f"{name}.wqkv: expected [3, {n}, {d}, {c}] with contiguous rows, "
                         f"got {tuple(t.wqkv.shape)} strides {t.wqkv.stride()}")
    if t.bqkv.dim() != 3 or tuple(t.bqkv.shape) != (3, n, d) or t.bqkv.stride(2) != 1:
        raise ValueError(f"{name}.bqkv: expected [3, {n}, {d}], got {tuple(t.bqkv.shape)}")
    if t.wo.dim() != 3 or t.wo.shape[2] != c or t.wo.stride(2) != 1:
        raise ValueError(f"{name}.wo: expected [{n}, {d}, {c}], got {tuple(t.wo.shape)}")
    for part in t:
        if part.dtype != dtype:
            raise ValueError(f"{name}: dtype {part.dtype} differs from x's {dtype}")


def _check_common(x: Tensor, rows: HeadRows, host: HeadRows | None, locs: Tensor) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH or x.stride(1) != 1:
        raise ValueError(f"x: expected [B, C] with 1 <= B <= {MAX_BATCH} and contiguous rows, "
                         f"got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported, use float16 or bfloat16")
    _check_rows("rows", rows, x.shape[1], x.dtype)
    if host is not None:
        _check_rows("host", host, x.shape[1], x.dtype)
        # The kernel applies one set of strides to both tables. Strides of a table with
        # fewer than two rows are arbitrary (torch normalises them) and never used.
        if rows.wo.shape[0] > 1 and host.wo.shape[0] > 1 and any(
                a.stride() != b.stride() for a, b in zip(rows, host, strict=True)):
            raise ValueError("host and resident tables must share strides (same layout)")
    if locs.dim() != 1 or locs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"locs: expected a 1-D int32/int64 tensor, got {locs.dtype}")
    if locs.device != x.device or rows.wo.device != x.device:
        raise ValueError("x, locs and the resident table must be on the same device")
    check_ids_on_cpu(locs, -host.wo.shape[0] if host is not None else 0, rows.wo.shape[0],
                     "locs")


def _strided(rows: HeadRows, host: HeadRows | None) -> HeadRows:
    """The table whose strides the kernels use: the one with more rows (see _check_common)."""
    return host if host is not None and host.wo.shape[0] > rows.wo.shape[0] else rows


def qkv_projection(x: Tensor, rows: HeadRows, heads: Tensor, locs: Tensor, cache_k: Tensor,
                   cache_v: Tensor, slots: Tensor, positions: Tensor, *,
                   host: HeadRows | None = None, block_d: int = 16, block_c: int = 256,
                   num_warps: int = 4, num_stages: int = 3, split_c: int = 512,
                   part: Tensor | None = None) -> Tensor:
    """q [B, Hs, D] (scaled) for the selected heads; writes their k, v into the cache.

    split_c > 0: each program reads one [block_d, split_c] tile and partial sums meet in
    an fp32 buffer (many loads in flight; then a small finalize kernel); 0: one program
    per [block_d] rows loops over C (fewer launches, latency-bound at small selections).

    cache_k, cache_v: [S, H, L, D] (one layer). slots, positions: [B] int, the row's cache
    slot and the new token's position (< L).
    """
    _check_common(x, rows, host, locs)
    b, c = x.shape
    d = rows.wo.shape[1]
    hs = heads.numel()
    if heads.shape != locs.shape:
        raise ValueError(f"heads {tuple(heads.shape)} and locs {tuple(locs.shape)} differ")
    if cache_k.dim() != 4 or cache_k.shape[3] != d or cache_k.stride(3) != 1 \
            or cache_v.shape != cache_k.shape or cache_v.stride() != cache_k.stride():
        raise ValueError(f"cache: expected k and v [S, H, L, {d}] alike, got "
                         f"{tuple(cache_k.shape)} and {tuple(cache_v.shape)}")
    if slots.shape != (b,) or positions.shape != (b,):
        raise ValueError(f"slots and positions: expected [{b}], got {tuple(slots.shape)} and "
                         f"{tuple(positions.shape)}")
    q = torch.empty((b, hs, d), dtype=x.dtype, device=x.device)
    if hs == 0:
        return q
    h = host if host is not None else rows
    st = _strided(rows, host)
    n_split = triton.cdiv(c, split_c) if split_c else 1
    if part is None or not split_c:  # part: a zeroed [3 * Hs * B * D] fp32 buffer, if given
        part = torch.zeros(3 * hs * b * d if split_c else 1, dtype=torch.float32,
                           device=x.device)
    grid = (hs, 3, triton.cdiv(d, block_d) * n_split)
    common = (st.bqkv.stride(0), st.bqkv.stride(1), q.stride(0), q.stride(1),
              cache_k.stride(0), cache_k.stride(1), cache_k.stride(2))
    _qkv_kernel[grid](
        x, heads, locs, rows.wqkv, rows.bqkv, h.wqkv, h.bqkv, q, cache_k, cache_v,
        slots, positions, part, b, c, d, hs, d**-0.5, x.stride(0),
        st.wqkv.stride(0), st.wqkv.stride(1), st.wqkv.stride(2), *common,
        HAS_HOST=host is not None, SPLIT=bool(split_c), BLOCK_B=16, BLOCK_D=block_d,
        BLOCK_C=split_c or block_c, DOT_FP32=interpreting(), num_warps=num_warps,
        num_stages=num_stages,
    )
    if split_c:
        _qkv_finalize_kernel[(hs, 3)](
            part, heads, locs, rows.bqkv, h.bqkv, q, cache_k, cache_v, slots, positions,
            b, d, hs, d**-0.5, *common, HAS_HOST=host is not None, BLOCK_B=16,
            BLOCK_D=triton.next_power_of_2(d))
    return q


def decode_attention(q: Tensor, heads: Tensor, cache_k: Tensor, cache_v: Tensor,
                     slots: Tensor, positions: Tensor, *, chunk: int = 64,
                     block_l: int = 32, num_warps: int = 4, scale: float = 1.0,
                     new_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """softmax(scale * q . K[0..pos]) V[0..pos] per row and selected head: [B, Hs, D], q's
    dtype. ``scale`` 1.0 takes q scaled already; D ** -0.5 folds the scaling in (fp32, after
    the load), so a caller need not launch a multiply for it.

    ``new_kv``: this step's keys and values [B, Hs, D] (strided alike, D contiguous), written
    into the cache at each row's slot and position by this launch, as
    ``cache_k[slots, heads, positions] = k`` (and v) before it would, without launches of
    their own. Rows must not share a (slot, position) unless their keys and values are
    equal (a captured bucket's padding rows repeat row 0).

    The number of splits follows the cache length L (not the rows' positions), so the
    grid is fixed for a given cache, as CUDA graphs need.
    """
    b, hs, d = q.shape
    if q.stride(2) != 1:
        raise ValueError("q: the head dim must be contiguous")
    k_new, v_new = new_kv if new_kv is not None else (q, q)  # placeholders when unused
    if new_kv is not None and (k_new.shape != q.shape or v_new.shape != q.shape
                               or k_new.stride() != v_new.stride() or k_new.stride(2) != 1):
        raise ValueError(f"new_kv: expected k and v [{b}, {hs}, {d}] strided alike with the "
                         f"head dim contiguous, got {tuple(k_new.shape)} {k_new.stride()} and "
                         f"{tuple(v_new.shape)} {v_new.stride()}")
    block_l = min(block_l, chunk)
    if chunk % block_l:
        raise ValueError(f"chunk {chunk} must be a multiple of block_l {block_l}")
    length = cache_k.shape[2]
    splits = triton.cdiv(length, chunk)
    m = torch.empty((b, hs, splits), dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty((b, hs, splits, d), dtype=torch.float32, device=q.device)
    out = torch.empty((b, hs, d), dtype=q.dtype, device=q.device)
    if hs == 0:
        return out
    block_d = triton.next_power_of_2(d)
    _decode_attention_kernel[(b, hs, splits)](
        q, heads, cache_k, cache_v, slots, positions, m, lsum, acc, k_new, v_new, hs, d,
        splits, scale, q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        CHUNK=chunk, BLOCK_L=block_l, BLOCK_D=block_d, WRITE_KV=new_kv is not None,
        num_warps=num_warps,
    )
    _combine_kernel[(b * hs,)](m, lsum, acc, out, d, splits,
                               BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d)
    return out


def out_projection(attn: Tensor, rows: HeadRows, locs: Tensor, *, host: HeadRows | None = None,
                   bias: Tensor | None = None, residual: Tensor | None = None,
                   block_c: int = 64, split_h: int | None = None, num_warps: int = 4,
                   num_stages: int = 3, acc: Tensor | None = None) -> Tensor:
    """residual + bias + sum over selected heads of attn[:, h] @ Wo_h: [B, C], attn's dtype.

    split_h programs share each column block's heads (atomic adds); None picks enough to
    have about 512 programs, so that each loops over a few heads only.
    """
    b, hs, d = attn.shape
    c = rows.wo.shape[2]
    if attn.stride(2) != 1 or rows.wo.shape[1] != d:
        raise ValueError(f"attn: expected [B, Hs, {rows.wo.shape[1]}] with contiguous heads")
    if acc is None:  # acc: a zeroed [B, C] fp32 buffer, if given
        acc = torch.zeros((b, c), dtype=torch.float32, device=attn.device)
    if hs:
        wo_host = host.wo if host is not None else rows.wo
        if split_h is None:
            split_h = max(1, min(hs, 512 // triton.cdiv(c, block_c)))
        grid = (triton.cdiv(c, block_c), split_h)
        _out_proj_kernel[grid](
            attn, locs, rows.wo, wo_host, acc, b, c, d, hs, attn.stride(0), attn.stride(1),
            _strided(rows, host).wo.stride(0), _strided(rows, host).wo.stride(1), acc.stride(0),
            HAS_HOST=host is not None, SPLIT_H=split_h, BLOCK_B=16,
            # The dot needs at least 16 along its reduction; padding rows are masked.
            BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_C=block_c, DOT_FP32=interpreting(),
            num_warps=num_warps, num_stages=num_stages,
        )
    return finalize(acc, bias, residual, attn.dtype)


def sparse_attention(x: Tensor, rows: HeadRows, heads: Tensor, locs: Tensor, cache_k: Tensor,
                     cache_v: Tensor, slots: Tensor, positions: Tensor, *,
                     host: HeadRows | None = None, bias: Tensor | None = None,
                     residual: Tensor | None = None, qkv_split_c: int = 512,
                     chunk: int = 64, split_h: int | None = None) -> Tensor:
    """The whole attention block for the selected heads (norm excluded): [B, C]."""
    b, c = x.shape
    d = rows.wo.shape[1]
    n_part = 3 * heads.numel() * b * d if qkv_split_c else 0
    # One memset for both fp32 sum buffers: launches, not bytes, dominate at batch 1.
    scratch = torch.zeros(n_part + b * c, dtype=torch.float32, device=x.device)
    q = qkv_projection(x, rows, heads, locs, cache_k, cache_v, slots, positions, host=host,
                       split_c=qkv_split_c, part=scratch[:n_part])
    attn = decode_attention(q, heads, cache_k, cache_v, slots, positions, chunk=chunk)
    return out_projection(attn, rows, locs, host=host, bias=bias, residual=residual,
                          split_h=split_h, acc=scratch[n_part:].view(b, c))


# --- reference ------------------------------------------------------------------------------


def sparse_attention_reference(x: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor,
                               wv: Tensor, bv: Tensor, wo: Tensor, heads: Tensor,
                               cache_k: Tensor, cache_v: Tensor, slots: Tensor,
                               positions: Tensor, bias: Tensor | None = None,
                               residual: Tensor | None = None) -> Tensor:
    """Plain PyTorch twin in float32 from HF-layout weights (q_proj.weight [C, C], ...,
    out_proj.weight [C, C]). Writes the selected heads' k, v into cache_k/cache_v, as the
    kernels do, and returns [B, C] in x's dtype."""
    b, c = x.shape
    d = cache_k.shape[3]
    xf = x.float()
    out = torch.zeros((b, c), dtype=torch.float32, device=x.device)
    for h in heads.tolist():
        rows = slice(h * d, (h + 1) * d)
        q = (xf @ wq[rows].float().T + bq[rows].float()) * d**-0.5
        q = q.to(x.dtype).float()  # the model rounds q to its dtype before attention
        k = xf @ wk[rows].float().T + bk[rows].float()
        v = xf @ wv[rows].float().T + bv[rows].float()
        attn = torch.empty((b, d), dtype=torch.float32, device=x.device)
        for i in range(b):
            s, p = int(slots[i]), int(positions[i])
            cache_k[s, h, p] = k[i].to(cache_k.dtype)
            cache_v[s, h, p] = v[i].to(cache_v.dtype)
            keys = cache_k[s, h, : p + 1].float()
            values = cache_v[s, h, : p + 1].float()
            weights = torch.softmax(keys @ q[i], dim=0)
            attn[i] = weights @ values
        attn = attn.to(x.dtype).float()  # the model feeds out_proj in its dtype
        out += attn @ wo[:, rows].float().T
    if bias is not None:
        out = out + bias.float()
    if residual is not None:
        out = out + residual.float()
    return out.to(x.dtype)


def split_head_rows(wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor,
                    wo: Tensor, num_heads: int) -> HeadRows:
    """HeadRows in the split layout from HF-layout weights (copies: q/k/v stacked, out_proj
    transposed so that a head's columns are contiguous rows)."""
    c = wq.shape[1]
    d = c // num_heads
    wqkv = torch.stack([wq, wk, wv]).reshape(3, num_heads, d, c)
    bqkv = torch.stack([bq, bk, bv]).reshape(3, num_heads, d)
    return HeadRows(wqkv, bqkv, wo.T.reshape(num_heads, d, c).contiguous())
