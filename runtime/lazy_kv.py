"""Lazy K/V, the torch reference: the q/k/v rows of selected heads, and the K/V of heads
skipped earlier recomputed from the attention inputs the cache keeps (runtime/sparse.py
explains the scheme; runtime/sparse_backend.py's kernels path calls the same recompute).

What this module does not know: which heads are selected or how the cache is batched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.env import interpreting

if TYPE_CHECKING:
    from .model import OPTAttention


def flag(value: bool, like: Tensor) -> Tensor:
    """``value`` as a bool scalar on ``like``'s device, for writes into K/V-valid bits. A
    Python bool written into a CUDA tensor is first copied from pageable host memory, and
    that copy waits for the stream: every op queued before it, an offloaded layer's
    transfers included, so the host could no longer run ahead of the device (graph capture
    refuses the copy too)."""
    return torch.full((), value, dtype=torch.bool, device=like.device)


def head_rows(proj: torch.nn.Linear, heads: Tensor, head_dim: int) -> tuple[Tensor,
                                                                             Tensor | None]:
    """The output rows (and bias entries) of q/k/v_proj that produce ``heads``."""
    c = proj.weight.shape[1]
    w = proj.weight.view(-1, head_dim, c).index_select(0, heads).reshape(-1, c)
    b = None
    if proj.bias is not None:
        b = proj.bias.view(-1, head_dim).index_select(0, heads).reshape(-1)
    return w, b


def fill_missing_kv(attn: OPTAttention, cache_k: Tensor, cache_v: Tensor, xs: Tensor,
                     valid: Tensor, idx: Tensor, slots: Tensor, pos: Tensor) -> int:
    """Recompute K/V of the selected heads at every visible position where they were
    skipped, from the stored inputs. Returns how many (position, head) pairs it computed."""
    length = int(pos.max()) + 1
    last = pos.max(dim=1).values  # [B]: each row sees positions 0..last
    need = torch.arange(length, device=pos.device)[None, None, :] <= last[:, None, None]
    missing = need & ~valid[slots[:, None], idx[None, :], :length]  # [B, h, L]
    if not bool(missing.any()):
        return 0
    bi, hi, pi = missing.nonzero(as_tuple=True)
    d = attn.head_dim
    for j in hi.unique().tolist():
        head = idx[j : j + 1]
        sel = hi == j
        s, p = slots[bi[sel]], pi[sel]
        xin = xs[s, p]  # [M, C]
        k = F.linear(xin.to(attn.k_proj.weight.dtype), *head_rows(attn.k_proj, head, d))
        v = F.linear(xin.to(attn.v_proj.weight.dtype), *head_rows(attn.v_proj, head, d))
        h = int(head)
        cache_k[s, h, p] = k.to(cache_k.dtype)
        cache_v[s, h, p] = v.to(cache_v.dtype)
        valid[s, h, p] = flag(True, valid)
    return int(bi.numel())


# How skipped heads' K/V are completed (``complete_missing_kv``): "auto" batches on a GPU up
# to BATCHED_KV_POSITIONS row-positions (no host read) and loops per head otherwise;
# "batched" or "loop" force one (benches count what a GPU runs; tests compare the two).
COMPLETION = "auto"

# Up to this many (row, prefix position) pairs, ``fill_missing_kv_batched`` recomputes the
# whole prefix of every selected head rather than looping over the missing ones: at OPT-13B's
# width that is 2 x 1024 x 5120 x h x 128 multiply-adds (27 G at 20 heads: about 0.1 ms per
# layer at an H100's dense float16 rate, an estimate, not measured), against several host
# reads (synchronisations) per head in the loop.
BATCHED_KV_POSITIONS = 1024


def fill_missing_kv_batched(attn: OPTAttention, cache_k: Tensor, cache_v: Tensor, xs: Tensor,
                            valid: Tensor, idx: Tensor, slots: Tensor, pos: Tensor,
                            length: int, live: Tensor | None = None) -> Tensor:
    """``fill_missing_kv`` in one pass and without a host synchronisation: K/V of every
    selected head at every position up to each row's last (``length``: the host's bound on
    the attended prefix, ``Batch.attended_length()``) are computed and kept where they were
    missing. Compute grows with the prefix instead of with the missing pairs. ``live`` [h]
    bool: which entries of ``idx`` are selected (a padded union's; the others are left as
    they are). Returns the (position, head) pairs filled, [1] on the device."""
    b, h, d = slots.numel(), idx.numel(), attn.head_dim
    xin = xs[slots, :length].to(attn.k_proj.weight.dtype)  # [B, L, C]
    k = F.linear(xin, *head_rows(attn.k_proj, idx, d)).view(b, length, h, d)
    v = F.linear(xin, *head_rows(attn.v_proj, idx, d)).view(b, length, h, d)
    return keep_recomputed(cache_k, cache_v, valid, idx, slots, pos, k, v, live)


# Where ``keep_recomputed`` runs: "auto" the one-launch kernel (kernels/kv_fill.py) on a GPU
# or under Triton's interpreter, the torch reference elsewhere; "kernel" or "torch" force
# one (tests compare the two).
KEEP = "auto"


def keep_recomputed(cache_k: Tensor, cache_v: Tensor, valid: Tensor, heads: Tensor,
                    slots: Tensor, positions: Tensor, k: Tensor, v: Tensor,
                    live: Tensor | None = None) -> Tensor:
    """Keep ``k``/``v`` [B, L, h, D] (``heads`` at every prefix position 0..L-1 of rows
    ``slots``) where the cache's K/V were missing up to each row's last position
    (``positions`` [B, T]), and mark those valid; ``live`` [h] bool: only those heads.
    Returns the pairs written, [1] on the device: nothing is read by the host."""
    if KEEP == "kernel" or (KEEP == "auto" and (valid.is_cuda or interpreting())):
        from ..kernels.kv_fill import keep_missing_kv  # imports triton: on use
        return keep_missing_kv(cache_k, cache_v, valid, heads, slots, positions, k, v, live)
    missing = missing_pairs(valid, heads, slots, positions, k.shape[1], live)
    return keep_missing(cache_k, cache_v, valid, heads, slots, missing, k.transpose(1, 2),
                        v.transpose(1, 2)).reshape(1)


def missing_pairs(valid: Tensor, heads: Tensor, slots: Tensor, positions: Tensor, length: int,
                  live: Tensor | None = None) -> Tensor:
    """[B, h, length] bool: the (row, head, position) triples up to each row's last position
    where ``heads`` have no valid K/V; ``live`` [h] bool: which heads count (a padded
    union's). Read on the device only."""
    p = torch.arange(length, device=valid.device)
    need = p[None, None, :] <= positions.max(dim=1).values[:, None, None]
    if live is not None:
        need = need & live[None, :, None]
    return need & ~valid[slots[:, None, None], heads[None, :, None], p[None, None, :]]


def keep_missing(cache_k: Tensor, cache_v: Tensor, valid: Tensor, heads: Tensor, slots: Tensor,
                 missing: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Write ``k``/``v`` [B, h, L, D] (every prefix position of ``heads``) into the cache where
    ``missing`` [B, h, L] and mark those valid; elsewhere the cache keeps what it had.
    Returns the pairs written, a device scalar."""
    s3, h3 = slots[:, None, None], heads[None, :, None]
    p3 = torch.arange(missing.shape[-1], device=missing.device)[None, None, :]
    m = missing[..., None]
    cache_k[s3, h3, p3] = torch.where(m, k.to(cache_k.dtype), cache_k[s3, h3, p3])
    cache_v[s3, h3, p3] = torch.where(m, v.to(cache_v.dtype), cache_v[s3, h3, p3])
    valid[s3, h3, p3] = valid[s3, h3, p3] | missing
    return missing.sum()


def complete_missing_kv(attn: OPTAttention, cache_k: Tensor, cache_v: Tensor, xs: Tensor,
                        valid: Tensor, idx: Tensor, slots: Tensor, pos: Tensor,
                        length: int) -> int | Tensor:
    """The selected heads' missing K/V by the pass ``COMPLETION`` picks; the pairs filled,
    an int (loop) or [1] on the device (batched: reading it would synchronise)."""
    batched = COMPLETION == "batched" or (
        COMPLETION == "auto" and xs.is_cuda and slots.numel() * length <= BATCHED_KV_POSITIONS)
    if batched:
        return fill_missing_kv_batched(attn, cache_k, cache_v, xs, valid, idx, slots, pos,
                                       length)
    return fill_missing_kv(attn, cache_k, cache_v, xs, valid, idx, slots, pos)
