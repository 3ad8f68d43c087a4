"""Attention over a gathered KV prefix with a visibility mask, on the fastest backend
that does not cost host time per new key length.

What this module does not know: caches, slots or sparsity; callers gather keys and
values and build the mask (runtime/model.py, runtime/sparse.py).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# Every backend but cuDNN's: its fused attention builds an execution plan per new key
# length, which a decode step changes every time; that cost 2-3.5 ms of host time per call
# on an H100 (torch 2.11), 60-85 ms per step of a 24-layer model (tools/profile_step.py).
_MASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Scaled dot-product attention (q already scaled) with a boolean ``mask`` (True =
    visible), broadcast over [B, H, T, L]."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    with sdpa_kernel(_MASKED_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
