"""Attention over cached keys and values, the three ways the model runs it.

- ``gathered_attention``: each row's prefix copied out of the cache up to the step's
  longest one, then ``masked_attention`` with a visibility mask (eager GPU steps), on the
  fastest backend that does not cost host time per new key length;
- ``prefix_attention``: each row over its own prefix read in place, as views of the cache
  (CPU steps). The gathered copy is the reference; on a CPU it cost more than the
  attention itself (a decode step at 300 cached positions: 245 us against 50 us per
  layer, the copy growing with the transcript);
- ``decode_attention_in_place``: one query per row over the cache itself, each row up to
  its own position read on the device (CUDA-graph decode, runtime/graphs.py).

What this module does not know: slots' owners or sparsity; callers write the cache and
build the mask (runtime/model.py, runtime/sparse.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# Every backend but cuDNN's: its fused attention builds an execution plan per new key
# length, which a decode step changes every time; that cost 2-3.5 ms of host time per call
# on an H100 (torch 2.11), 60-85 ms per step of a 24-layer model (bench/profile_step.py).
_MASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Scaled dot-product attention (q already scaled) with a boolean ``mask`` (True =
    visible), broadcast over [B, H, T, L]."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    with sdpa_kernel(_MASKED_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def decode_attention_in_place(q: Tensor, cache_k: Tensor, cache_v: Tensor, slots: Tensor,
                              positions: Tensor) -> Tensor:
    """q [B, H, 1, D] (scaled), caches [S, H, L, D], slots [B], positions [B, 1]: every head's
    attention over positions 0..position of its row's slot, [B, H, 1, D]. Runs the decode
    kernel (float16/bfloat16), whose grid depends only on the cache's shape."""
    from ..kernels.sparse_attention import decode_attention  # imports triton: load on use

    heads = torch.arange(q.shape[1], device=q.device)
    return decode_attention(q[:, :, 0], heads, cache_k, cache_v, slots, positions[:, 0])[:, :, None]


def gathered_attention(q: Tensor, cache_k: Tensor, cache_v: Tensor, slots: Tensor,
                       positions: Tensor, length: int) -> Tensor:
    """q [B, H, T, D] (scaled), caches [S, H, L, D], slots [B], positions [B, T]; ``length``
    is the step's longest attended prefix (max position + 1). Returns [B, H, T, D]."""
    keys = cache_k[slots, :, :length]  # [B, H, L, D]: a copy
    values = cache_v[slots, :, :length]
    # Key j is visible to a query at position p iff j <= p: causal within the step and
    # blind to whatever a slot's previous owner left beyond this sequence's length.
    visible = torch.arange(length, device=positions.device)[None, None, :] <= positions[:, :, None]
    return masked_attention(q, keys.to(q.dtype), values.to(q.dtype), visible[:, None])


def prefix_attention(q: Tensor, cache_k: Tensor, cache_v: Tensor, slots: list[int],
                     lengths: list[int], positions: Tensor) -> Tensor:
    """``gathered_attention`` with each row's prefix read in place: ``slots`` and ``lengths``
    (last position + 1) per row on the host. Rows run one by one, each over exactly its
    own prefix, so a lone query needs no mask. Returns [B, H, T, D]."""
    b, _, t, _ = q.shape
    outs = []
    for row in range(b):
        keys = cache_k[slots[row], :, : lengths[row]][None]  # [1, H, L, D]: a view
        values = cache_v[slots[row], :, : lengths[row]][None]
        mask = None
        if t > 1:  # causal within the step: key j is visible to the query at p iff j <= p
            steps = torch.arange(lengths[row], device=positions.device)
            mask = (steps[None, :] <= positions[row, :, None])[None, None]  # [1, 1, T, L]
        outs.append(F.scaled_dot_product_attention(
            q[row : row + 1], keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=1.0))
    return outs[0] if b == 1 else torch.cat(outs)
