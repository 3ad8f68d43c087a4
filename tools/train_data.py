"""Training data for the default model: a book corpus as one token stream, and seeded
random windows over it.

Every book is tokenised on its own (``encode_batch_fast`` spreads books over all cores) and
the stream is ``</s> book_1 </s> book_2 ...``: OPT's BOS/EOS id separates documents, so a
window that straddles two books sees the separator, as OPT's own pretraining data did.

What this module does not know: the model or the optimiser. Windows are drawn with
replacement from a ``torch.Generator`` seeded once, so the data order is a function of the
seed alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from dejavu.tools.train_tokenizer import iter_documents


def tokenize_corpus(corpus: str | Path, tokenizer: Tokenizer, *, separator_id: int,
                    max_bytes: int | None = None) -> tuple[np.ndarray, dict]:
    """The corpus as one uint16/int32 stream with ``separator_id`` before every document.
    Returns the stream and a summary (documents, bytes, tokens, seconds)."""
    start = time.perf_counter()
    texts = list(iter_documents(corpus, max_bytes=max_bytes))
    read_s = time.perf_counter() - start
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.int32
    parts = []
    for enc in encodings:
        parts.append(np.asarray([separator_id], dtype=dtype))
        parts.append(np.asarray(enc.ids, dtype=dtype))
    stream = np.concatenate(parts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    summary = {"documents": len(texts), "bytes": n_bytes, "tokens": int(stream.size),
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
