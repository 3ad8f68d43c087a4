"""Attention over cached keys and values, the two ways the model runs it.

- ``masked_attention``: over a gathered prefix with a visibility mask (eager steps), on
  the fastest backend that does not cost host time per new key length;
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
