"""Training that makes attention heads selectable, while the trained model stays OPT.

Two per-token head policies, used only while a model trains:

- ``drop``: each chosen token loses a random ``fraction`` of its heads (exactly
  round(fraction * H), uniformly), optionally rescaling the kept ones by H / kept, as
  dropout does;
- ``gate``: a learned linear gate scores the heads from the attention input; each chosen
  token keeps its top (1 - fraction) * H heads. The forward value is the hard 0/1 mask; its
  gradient flows through sigmoid(score) (straight-through), so the gate learns which heads
  the loss needs.

``tokens`` is the share of tokens that get the policy; the others run every head, so the
model also learns the dense computation it runs at inference.

``attach`` wraps every layer's attention in ``HeadMaskedAttention``; ``detach`` puts the
original modules back, gate dropped, so the saved checkpoint has exactly OPT's tensors and
transformers' OPTForCausalLM loads it. In eval mode the wrapper is the plain attention.

What this module does not know: the optimiser, the data, or how heads are skipped at
inference (runtime/sparse.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..runtime.model import Batch, OPTAttention, OPTModel
from ..runtime.selection import count, topk_mask

MODES = ("none", "drop", "gate")


@dataclass(frozen=True)
class HeadPolicy:
    mode: str = "none"
    fraction: float = 0.5  # share of a chosen token's heads that are skipped
    tokens: float = 0.5  # share of tokens the policy applies to (the rest: every head)
    rescale: bool = False  # drop only: kept heads x H / kept

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"head policy mode={self.mode!r}: expected one of {MODES}")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"head policy fraction={self.fraction}: expected a share of the "
                             "heads in (0, 1)")
        if not 0.0 < self.tokens <= 1.0:
            raise ValueError(f"head policy tokens={self.tokens}: expected a share in (0, 1]")
        if self.rescale and self.mode != "drop":
            raise ValueError("head policy rescale applies to mode 'drop' only")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def kept(self, heads: int) -> int:
        """Heads a chosen token keeps (at least one, at most H - 1)."""
        return min(heads - 1, count(1.0 - self.fraction, heads))


def random_head_mask(shape: tuple[int, int, int], keep: int, device) -> Tensor:
    """[B, T, H] bool, exactly ``keep`` True per token, uniformly at random."""
    return topk_mask(torch.rand(shape, device=device), keep)


def apply_head_mask(attn: OPTAttention, x: Tensor, layer_id: int, batch: Batch,
                    scale: Tensor) -> Tensor:
    """Attention output [B, T, C] with each head's output multiplied by ``scale`` [B, T, H]
    before out_proj: 0 skips a head for that token, as the engine's mask mode does."""
    o = attn.head_outputs(x, layer_id, batch)  # [B, H, T, D]
    return attn.merge_heads(o * scale.transpose(1, 2).unsqueeze(-1).to(o.dtype))


class HeadMaskedAttention(nn.Module):
    """An ``OPTAttention`` (``inner``) plus the training-time head policy; called exactly
    as the attention it wraps. Only whole windows without a cache (training)."""

    def __init__(self, inner: OPTAttention, policy: HeadPolicy, hidden: int) -> None:
        super().__init__()
        self.inner, self.policy = inner, policy
        self.gate = nn.Linear(hidden, inner.num_heads) if policy.mode == "gate" else None
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02)
            nn.init.zeros_(self.gate.bias)

    def forward(self, x: Tensor, layer_id: int, batch: Batch,
                heads: Tensor | None = None) -> Tensor:
        if not self.training or heads is not None:
            return self.inner(x, layer_id, batch, heads)
        if batch.cache is not None:
            raise ValueError("head-policy training runs whole windows without a KV cache")
        return apply_head_mask(self.inner, x, layer_id, batch, self.scale(x))

    def scale(self, x: Tensor) -> Tensor:
        """Per-token head multipliers [B, T, H] for this training step."""
        b, t, _ = x.shape
        h = self.inner.num_heads
        keep = self.policy.kept(h)
        chosen = torch.rand((b, t, 1), device=x.device) < self.policy.tokens
        if self.gate is None:
            mask = random_head_mask((b, t, h), keep, x.device).to(x.dtype)
            if self.policy.rescale:
                mask = mask * (h / keep)
        else:
            score = self.gate(x).float()
            soft = torch.sigmoid(score)
            hard = topk_mask(score, keep).to(soft.dtype)
            mask = (hard + (soft - soft.detach())).to(x.dtype)  # value: exactly hard; grad: soft
        return torch.where(chosen, mask, torch.ones_like(mask))


def attach(model: OPTModel, policy: HeadPolicy) -> None:
    """Wrap every layer's attention (no-op for mode 'none')."""
    if not policy.active:
        return
    for layer in model.decoder.layers.values():
        if isinstance(layer.self_attn, HeadMaskedAttention):
            raise ValueError(f"layer {layer.layer_id} already has a head policy")
        layer.self_attn = HeadMaskedAttention(layer.self_attn, policy,
                                              model.config.hidden_size)


def detach(model: OPTModel) -> None:
    """Put every layer's original attention back (the gate, a training aid, is dropped)."""
    for layer in model.decoder.layers.values():
        if isinstance(layer.self_attn, HeadMaskedAttention):
            layer.self_attn = layer.self_attn.inner
