"""MLP activation sparsity of a trained model: how many ReLU outputs are exactly zero, per
layer, and how unevenly the firings spread over neurons.

A neuron "fires" on a token when its ReLU output is non-zero, i.e. its fc1 pre-activation
is > 0. Counts are taken with forward hooks on every layer's fc1 over whole windows of
real text, so they see exactly what the dense model computes.

What this module does not know: predictors or sparse execution (they consume these numbers
to plan caches of hot rows). Reported per layer:
- ``zero_fraction``: share of (token, neuron) ReLU outputs that are exactly zero;
- ``top10_share``: share of all firings taken by the 10% most frequently firing neurons;
- ``dead``: neurons that never fired; quantiles of per-neuron firing frequency.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..runtime.model import OPTModel
from .eval_text import LogitsFn, dense_logits_fn


@torch.no_grad()
def firing_counts(model: OPTModel, windows: Tensor, *, batch_size: int = 16,
                  logits_fn: LogitsFn | None = None) -> tuple[Tensor, int]:
    """Per-layer, per-neuron firing counts [L, F] (int64, CPU) over ``windows`` [N, T] of
    token ids (every position counted), and the number of tokens seen."""
    layers = model.layers()
    device = next(model.parameters()).device
    counts = torch.zeros(len(layers), model.config.ffn_dim, dtype=torch.int64, device=device)
    handles = []
    for i, layer in enumerate(layers):
        def hook(_module, _inputs, output, i=i):
            counts[i] += (output > 0).reshape(-1, output.shape[-1]).sum(0)
        handles.append(layer.fc1.register_forward_hook(hook))
    forward = logits_fn or dense_logits_fn(model)
    try:
        for b in range(0, windows.shape[0], batch_size):
            forward(windows[b:b + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return counts.cpu(), windows.numel()


def summarize(counts: Tensor, tokens: int) -> list[dict]:
    """Per-layer summary of firing counts [L, F] over ``tokens`` tokens."""
    out = []
    for layer, c in enumerate(counts):
        freq = c.double() / tokens
        ordered = torch.sort(c, descending=True).values
        top = max(1, round(0.1 * c.numel()))
        total = int(c.sum())
        q = torch.quantile(freq.float(), torch.tensor([0.5, 0.9, 0.99]))
        out.append({
            "layer": layer,
            "zero_fraction": 1.0 - total / (tokens * c.numel()),
            "top10_share": int(ordered[:top].sum()) / total if total else 0.0,
            "dead": int((c == 0).sum()),
            "freq_p50": float(q[0]), "freq_p90": float(q[1]), "freq_p99": float(q[2]),
            "freq_max": float(freq.max()),
        })
    return out


def stream_windows(docs: Sequence[Sequence[int]], length: int, max_tokens: int) -> Tensor:
    """Non-overlapping windows [N, length] of the concatenated documents, at most
    ``max_tokens`` tokens in all (a partial tail is dropped)."""
    flat = torch.as_tensor([t for d in docs for t in d], dtype=torch.long)
    n = min(flat.numel(), max_tokens) // length
    if n == 0:
        raise ValueError(f"fewer than {length} tokens of text for activation statistics")
    return flat[: n * length].view(n, length)
