"""A residual add and the LayerNorm after it in one launch, for a captured decode step.

    s = h + delta          (rounded to h's dtype, exactly what ``h + delta`` gives)
    y = LayerNorm(s)       (statistics in fp32 over the rounded s, as torch's kernel)

A pre-LN OPT layer adds its attention output to the residual stream and normalizes the sum
for its MLP block; at batch 1 on an OPT-13B shape both are a few microseconds of launch for
10 KB of data, so one kernel does both: one program per row, the row held whole.

What this module does not know: which norm it is (the caller passes its weight, bias and
eps) or where the rows come from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

MAX_HIDDEN = 32768  # a row is held in one program's registers


@triton.jit
def _add_layer_norm_kernel(
    h_ptr,  # [M, C] residual rows, contiguous
    d_ptr,  # [M, C] what is added to them, contiguous
    w_ptr, b_ptr,  # [C] the norm's weight and bias (read when AFFINE)
    s_ptr,  # [M, C] out: h + delta, h's dtype
    y_ptr,  # [M, C] out: the normalized sum, h's dtype
    C,
    eps,  # fp32
    AFFINE: tl.constexpr,
    BLOCK: tl.constexpr,  # C padded to a power of two
):
    row = tl.program_id(0).to(tl.int64) * C
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    h = tl.load(h_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    s = (h + d).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + row + offs, s, mask=mask)
    x = s.to(tl.float32)  # the statistics read the sum as stored
    mean = tl.sum(x, axis=0) / C
    centered = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / C
    y = centered * (1.0 / tl.sqrt(var + eps))
    if AFFINE:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_layer_norm(h: Tensor, delta: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor]:
    """(h + delta, layer_norm(h + delta)) in h's dtype, one launch. h, delta: [..., C]
    alike; weight, bias: [C] or both None (a norm without affine parameters)."""
    if h.shape != delta.shape or h.dtype != delta.dtype or h.device != delta.device:
        raise ValueError(f"h and delta must match: {h.dtype} {tuple(h.shape)} on {h.device} "
                         f"vs {delta.dtype} {tuple(delta.shape)} on {delta.device}")
    c = h.shape[-1]
    if not 1 <= c <= MAX_HIDDEN:
        raise ValueError(f"hidden size {c}: expected 1..{MAX_HIDDEN}")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias: both or neither")
    if weight is not None and (weight.shape != (c,) or bias.shape != (c,)):
        raise ValueError(f"weight and bias: expected [{c}], got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    h2 = h.reshape(-1, c).contiguous()
    d2 = delta.reshape(-1, c).contiguous()
    s = torch.empty_like(h2)
    y = torch.empty_like(h2)
    if h2.shape[0]:
        affine = weight is not None
        block = triton.next_power_of_2(c)
        _add_layer_norm_kernel[(h2.shape[0],)](
            h2, d2, weight.contiguous() if affine else h2, bias.contiguous() if affine else h2,
            s, y, c, float(eps), AFFINE=affine, BLOCK=block,
            num_warps=min(16, max(1, block // 512)))
    return s.view(h.shape), y.view(h.shape)


def add_layer_norm_reference(h: Tensor, delta: Tensor, weight: Tensor | None,
                             bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Plain PyTorch twin: the sum as the model's add rounds it, the norm in float32."""
    s = h + delta
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(s.float(), (h.shape[-1],), w, b, eps)
    return s, y.to(h.dtype)
