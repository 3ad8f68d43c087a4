"""Perplexity and bits per byte of text, by the standard sliding-window method.

Each document is tokenised on its own and prefixed with the BOS id (OPT's ``</s>``). A
window of ``window`` ids slides by ``stride`` (the Hugging Face perplexity guide's loop);
every window after the first scores only the ``stride`` ids the earlier ones did not, so
each id but BOS is scored exactly once, with at least ``window - stride - 1`` ids of
context after the first window. The
result is the summed negative log-likelihood in nats, the number of scored tokens and the
number of UTF-8 bytes of the documents:

    perplexity    = exp(nll / tokens)
    bits_per_byte = nll / ln(2) / bytes

What this module does not know: how logits are computed. Scoring takes a ``LogitsFn``
(token ids [B, T] -> logits [B, T, V]); ``dense_logits_fn`` wraps an ``OPTModel``, and
sparse execution passes its own function through the same seam.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..runtime.model import Batch, OPTModel, full_positions
from .progress import progress
from .textdata import TextDataError, iter_documents

# Token ids [B, T] (on the scoring device) -> logits [B, T, V].
LogitsFn = Callable[[Tensor], Tensor]


class EvalDataError(TextDataError):
    """An evaluation file that cannot be read as text or JSON lines with a "text" field."""


def dense_logits_fn(model: OPTModel) -> LogitsFn:
    """The plain dense forward pass of a whole model, windows starting at position 0."""

    def logits(ids: Tensor) -> Tensor:
        return model(ids, Batch(full_positions(ids.shape[0], ids.shape[1], ids.device)))

    return logits


def read_documents(path: str | Path) -> list[str]:
    """A .txt file is one document (read as is); .jsonl / .jsonl.xz give one document per
    line, its "text" field."""
    return list(iter_documents(path))


@dataclass(frozen=True)
class Window:
    """One scoring window: inputs ids[doc][start:end], labels ids[doc][start+1:end+1], of
    which only labels at offset >= first are scored."""

    doc: int
    start: int
    end: int
    first: int


def sliding_windows(lengths: Sequence[int], window: int, stride: int) -> list[Window]:
    """Windows over documents of ``lengths`` ids (BOS included), exactly as the Hugging
    Face perplexity guide slides them: window k spans ids [k*stride, k*stride + window)
    (its last id is only a label, so the model sees window - 1 inputs) and scores the ids
    no earlier window reached. With stride < window every id but BOS is scored exactly
    once; with stride == window (non-overlapping) each window's first id is context only,
    as in that loop, and ``tokens`` counts what was scored."""
    if not 0 < stride <= window:
        raise ValueError(f"stride={stride} must be in [1, window={window}]")
    if window < 2:
        raise ValueError(f"window={window}: needs at least one input and one label")
    out = []
    for doc, n_ids in enumerate(lengths):
        begin, prev_end = 0, 0
        while n_ids > 1:
            end = min(begin + window, n_ids)
            first_target = max(prev_end, begin + 1)
            out.append(Window(doc, begin, end - 1, first_target - (begin + 1)))
            prev_end = end
            if end == n_ids:
                break
            begin += stride
    return out


@dataclass
class TextScore:
    nll: float  # summed negative log-likelihood, nats
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2) / self.tokens

    def metrics(self) -> dict[str, float | int]:
        return {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "bits_per_token": self.bits_per_token, "tokens": self.tokens,
                "bytes": self.bytes}


@torch.no_grad()
def score_token_ids(logits_fn: LogitsFn, docs: Sequence[Sequence[int]], *, window: int,
                    stride: int, batch_size: int, device: torch.device | str,
                    show_progress: bool = False, desc: str = "ppl") -> tuple[float, int]:
    """Summed NLL (nats) and number of targets over documents of token ids (BOS first)."""
    windows = sliding_windows([len(d) for d in docs], window, stride)
    tensors = [torch.as_tensor(list(d), dtype=torch.long) for d in docs]
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for group in progress(batches, len(batches), desc, show_progress):
        width = max(w.end - w.start for w in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.bool)
        for r, w in enumerate(group):
            n = w.end - w.start
            ids[r, :n] = tensors[w.doc][w.start:w.end]
            labels[r, :n] = tensors[w.doc][w.start + 1:w.end + 1]
            mask[r, w.first:n] = True  # padding beyond n stays unscored
            count += n - w.first
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        logits = logits_fn(ids).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None])[..., 0]
        nll -= (logp * mask).sum(dtype=torch.float64)
    return float(nll), count


def score_documents(logits_fn: LogitsFn, encode: Callable[[str], list[int]],
                    documents: Sequence[str], *, bos_id: int, window: int = 1024,
                    stride: int = 512, batch_size: int = 8, device: torch.device | str = "cpu",
                    show_progress: bool = False, desc: str = "ppl") -> TextScore:
    """Perplexity / bits per byte of ``documents`` (each scored on its own, BOS first)."""
    docs = [[bos_id, *encode(text)] for text in documents]
    docs = [d for d in docs if len(d) > 1]
    if not docs:
        raise EvalDataError("no text to score (every document is empty)")
    nll, tokens = score_token_ids(logits_fn, docs, window=window, stride=stride,
                                  batch_size=batch_size, device=device,
                                  show_progress=show_progress, desc=desc)
    n_bytes = sum(len(t.encode("utf-8")) for t in documents)
    return TextScore(nll=nll, tokens=tokens, bytes=n_bytes)


def wikitext_documents(path: str | Path, limit: int | None = None) -> list[str]:
    """WikiText-2 raw test as one document, by the standard recipe: the rows (lines kept
    with their trailing newline; the first ``limit`` of them) joined with blank lines,
    ``"\\n\\n".join(rows)``."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    rows = path.read_text(encoding="utf-8").splitlines(keepends=True)[:limit]
    return ["\n\n".join(rows)]
