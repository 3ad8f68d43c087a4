"""Training data for the default model: a book corpus as one token stream, and seeded
random windows over it.

Every book is tokenised on its own (``encode_batch_fast`` spreads books over all cores) and
the stream is ``</s> book_1 </s> book_2 ...``: OPT's BOS/EOS id separates documents, so a
window that straddles two books sees the separator, as OPT's own pretraining data did.

Project Gutenberg hard-wraps prose at ~70 characters; most other text (WikiText, LAMBADA,
prompts) does not. With ``unwrap_fraction`` a seeded share of the books is rewritten with
each paragraph on one line (``unwrap_lines``), so the model learns both layouts and infers
the one in front of it from context instead of expecting a newline every 70 characters.

What this module does not know: the model or the optimiser. Windows are drawn with
replacement from a ``torch.Generator`` seeded once, so the data order is a function of the
seed alone.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from .train_tokenizer import iter_documents


def unwrap_lines(text: str, min_len: int = 50) -> str:
    """Join hard-wrapped prose lines: a line break becomes a space when the line before it
    is at least ``min_len`` characters (a wrapped line, not verse or a heading) and the
    next line is non-empty and not indented. Blank lines (paragraphs) stay."""
    lines = text.split("\n")
    out = [lines[0]]
    for prev, line in zip(lines, lines[1:], strict=False):
        if len(prev) >= min_len and line and not line[0].isspace():
            out[-1] = out[-1].rstrip() + " " + line
        else:
            out.append(line)
    return "\n".join(out)


def tokenize_corpus(corpus: str | Path, tokenizer: Tokenizer, *, separator_id: int,
                    max_bytes: int | None = None, unwrap_fraction: float = 0.0,
                    seed: int = 0) -> tuple[np.ndarray, dict]:
    """The corpus as one uint16/int32 stream with ``separator_id`` before every document,
    a seeded ``unwrap_fraction`` of the documents unwrapped. Returns the stream and a
    summary (documents, unwrapped, bytes, tokens, seconds)."""
    start = time.perf_counter()
    texts = list(iter_documents(corpus, max_bytes=max_bytes))
    pick = random.Random(seed)
    chosen = [pick.random() < unwrap_fraction for _ in texts]
    texts = [unwrap_lines(t) if c else t for t, c in zip(texts, chosen, strict=True)]
    read_s = time.perf_counter() - start
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.int32
    parts = []
    for enc in encodings:
        parts.append(np.asarray([separator_id], dtype=dtype))
        parts.append(np.asarray(enc.ids, dtype=dtype))
    stream = np.concatenate(parts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    summary = {"documents": len(texts), "unwrapped": sum(chosen), "bytes": n_bytes,
               "tokens": int(stream.size),
               "bytes_per_token": n_bytes / max(1, stream.size - len(texts)),
               "read_seconds": round(read_s, 1),
               "seconds": round(time.perf_counter() - start, 1)}
    return stream, summary


class WindowSampler:
    """Draws ``batch`` windows of ``length + 1`` contiguous tokens (inputs and shifted
    labels) uniformly at random from a stream held on ``device``."""

    def __init__(self, stream: np.ndarray, length: int, *, seed: int,
                 device: torch.device | str) -> None:
        if stream.size < length + 2:
            raise ValueError(f"corpus has {stream.size} tokens, fewer than one window "
                             f"of {length + 1}")
        self.tokens = torch.from_numpy(stream.astype(np.int32)).to(device)
        self.length = length
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(length + 1, device=device)

    def sample(self, batch: int) -> tuple[Tensor, Tensor]:
        """inputs [batch, length] and labels [batch, length] (int64, on the device)."""
        high = self.tokens.numel() - self.length - 1
        starts = torch.randint(0, high + 1, (batch,), generator=self.generator)
        idx = starts.to(self.tokens.device)[:, None] + self.offsets
        window = self.tokens[idx].long()
        return window[:, :-1], window[:, 1:]
