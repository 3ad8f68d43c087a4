"""Keep recomputed K/V where they were missing, and mark them valid, in one launch.

Lazy K/V (runtime/lazy_kv.py) recomputes, in one pass, the K and V of every selected head at
every prefix position of each batch row, then keeps them only where the cache had none:

    need[b, i, p]    = p <= max(positions[b]) and live[i]
    missing[b, i, p] = need and not valid[slots[b], heads[i], p]
    cache_k[slots[b], heads[i], p] = k[b, p, i]   where missing   (V alike)
    valid[slots[b], heads[i], p]   = True         where missing

The torch reference (``lazy_kv.missing_pairs`` then ``lazy_kv.keep_missing``) is about twenty
small launches per layer: index grids, gathers of the cache region, ``where``, scatters back,
a sum. At batch 1 each costs more host time than the device spends on it, on every layer
of every decode step that skips heads. Here one program per (row, head, block of positions)
reads the valid bits, copies the missing K/V rows and sets their bits, and adds how many it
wrote to a device counter: nothing is read back by the host.

What this module does not know: how K and V were computed, or which heads are selected.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_POSITIONS = 32


# ``L`` and the row stride grow with every decode step: specialized (Triton specializes
# integers on divisibility by 16), each new residue would compile the kernel again inside a
# step, a few hundred milliseconds.
@triton.jit(do_not_specialize=["L", "s_kb"])
def _keep_missing_kernel(
    k_ptr, v_ptr,  # [B, L, h, D] recomputed K and V (D contiguous; any other strides)
    ck_ptr, cv_ptr,  # [S, H, Lmax, D] the layer's cache (D contiguous)
    valid_ptr,  # [S, H, Lmax] uint8 view of the valid bits (Lmax contiguous)
    heads_ptr,  # [h] int64 head ids
    slots_ptr,  # [B] int64 cache slots
    last_ptr,  # [B] int64 each row's last position
    live_ptr,  # [h] uint8: which heads count (read when HAS_LIVE)
    count_ptr,  # [1] int64: pairs written, added to
    L,
    s_kb, s_kl, s_kh,
    s_cs, s_ch, s_cl,
    s_vs, s_vh,
    D: tl.constexpr,
    HAS_LIVE: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0)
    i = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    last = tl.load(last_ptr + b)
    slot = tl.load(slots_ptr + b)
    head = tl.load(heads_ptr + i)
    need = (p < L) & (p <= last)
    if HAS_LIVE:
        need = need & (tl.load(live_ptr + i + 0 * p) != 0)  # a vector: bool & bool
    bits = valid_ptr + slot * s_vs + head * s_vh + p
    missing = need & (tl.load(bits, mask=need, other=1) == 0)
    d = tl.arange(0, D)
    src = b * s_kb + p[:, None] * s_kl + i * s_kh + d[None, :]
    dst = slot * s_cs + head * s_ch + p[:, None] * s_cl + d[None, :]
    m2 = missing[:, None]
    k = tl.load(k_ptr + src, mask=m2, other=0.0)
    tl.store(ck_ptr + dst, k.to(ck_ptr.dtype.element_ty), mask=m2)
    v = tl.load(v_ptr + src, mask=m2, other=0.0)
    tl.store(cv_ptr + dst, v.to(cv_ptr.dtype.element_ty), mask=m2)
    tl.store(bits, tl.full((BLOCK_L,), 1, tl.uint8), mask=missing)
    tl.atomic_add(count_ptr, tl.sum(missing.to(tl.int64), axis=0))


def keep_missing_kv(cache_k: Tensor, cache_v: Tensor, valid: Tensor, heads: Tensor,
                    slots: Tensor, positions: Tensor, k: Tensor, v: Tensor,
                    live: Tensor | None = None) -> Tensor:
    """Write ``k``/``v`` [B, L, h, D] (heads ``heads`` [h] at prefix positions 0..L-1 of
    rows ``slots`` [B]) into ``cache_k``/``cache_v`` [S, H, Lmax, D] where ``valid`` [S, H,
    Lmax] (bool) is False up to each row's last position (``positions`` [B, T]), and mark
    them valid; ``live`` [h] bool: only those heads (a padded union's). Returns the pairs
    written, [1] int64 on the device. The module text gives the rule."""
    bsz, length, h, d = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k and v must match: {tuple(k.shape)} vs {tuple(v.shape)}")
    if cache_k.shape != cache_v.shape or cache_k.dim() != 4 or cache_k.shape[-1] != d:
        raise ValueError(f"caches [S, H, L, {d}] alike expected, got {tuple(cache_k.shape)} "
                         f"and {tuple(cache_v.shape)}")
    if valid.dtype != torch.bool or valid.shape != cache_k.shape[:3]:
        raise ValueError(f"valid must be bool {tuple(cache_k.shape[:3])}, got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    if length > cache_k.shape[2]:
        raise ValueError(f"{length} positions do not fit the cache's {cache_k.shape[2]}")
    if d & (d - 1):
        raise ValueError(f"head dim {d}: expected a power of two")
    if positions.dim() != 2 or positions.shape[0] != bsz:
        raise ValueError(f"positions must be [{bsz}, T], got {tuple(positions.shape)}")
    if heads.shape != (h,) or slots.shape != (bsz,) or (live is not None and live.shape != (h,)):
        raise ValueError(f"heads [{h}], slots [{bsz}] and live [{h}] expected, got "
                         f"{tuple(heads.shape)}, {tuple(slots.shape)}, "
                         f"{None if live is None else tuple(live.shape)}")
    if k.stride(-1) != 1 or v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    if cache_v.stride() != cache_k.stride() or cache_k.stride(-1) != 1 or valid.stride(-1) != 1:
        raise ValueError("cache_k and cache_v must share strides, their last dimension and "
                         "valid's contiguous")
    count = torch.zeros(1, dtype=torch.int64, device=k.device)
    if bsz == 0 or h == 0 or length == 0:
        return count
    # each row's last position: a decode step's one (a view), a chunk's largest (one launch)
    last = positions[:, 0] if positions.shape[1] == 1 else positions.amax(dim=1)
    grid = (bsz, h, triton.cdiv(length, BLOCK_POSITIONS))
    _keep_missing_kernel[grid](
        k, v, cache_k, cache_v, valid.view(torch.uint8), heads.to(torch.int64),
        slots.to(torch.int64), last.to(torch.int64).contiguous(),
        count if live is None else live.view(torch.uint8), count,
        length,
        k.stride(0), k.stride(1), k.stride(2),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        valid.stride(0), valid.stride(1),
        D=d, HAS_LIVE=live is not None, BLOCK_L=BLOCK_POSITIONS, num_warps=4)
    return count
