"""Train the default model's tokenizer: a byte-level BPE over a JSON-lines book corpus.

Byte-level means every UTF-8 byte has a token, so no text is ever unknown; the ids of OPT's
four special tokens are fixed in front (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3) so
the result drops into an OPT config unchanged. The output is one ``tokenizer.json`` that
the ``tokenizers`` library (and transformers' fast tokenizers) load directly.

What this module does not know: how the tokenizer is used at inference time
(``runtime.tokenizer``) or how documents are joined for training (``tools.train_model``).
No post-processor is attached: ``encode`` returns the text's tokens only, and callers that
want OPT's leading ``</s>`` add it themselves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .textdata import TextDataError as CorpusError  # noqa: F401 (re-exported)
from .textdata import iter_documents

# OPT's special tokens, in id order.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]


def new_byte_level_bpe() -> Tokenizer:
    """An untrained byte-level BPE: GPT-2's pre-tokenisation regex, no prefix space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(corpus: str | Path, out: str | Path, *, vocab_size: int = 16384,
                    max_bytes: int | None = None, min_frequency: int = 2) -> dict:
    """Train a byte-level BPE of ``vocab_size`` entries (specials included) on the corpus and
    write it to ``out`` (a tokenizer.json path). Returns a summary dict."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size}: must hold the 256 bytes and the specials")
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats = {"documents": 0, "bytes": 0}

    def counted() -> Iterator[str]:
        for text in iter_documents(corpus, max_bytes=max_bytes):
            stats["documents"] += 1
            stats["bytes"] += len(text.encode("utf-8"))
            yield text

    start = time.perf_counter()
    tok.train_from_iterator(counted(), trainer=trainer)
    seconds = time.perf_counter() - start
    for i, special in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(special) != i:
            raise AssertionError(f"special token {special} got id {tok.token_to_id(special)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return {"vocab_size": tok.get_vocab_size(), "seconds": round(seconds, 1), **stats,
            "corpus": str(corpus), "max_bytes": max_bytes}


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="JSON-lines (.jsonl or .jsonl.xz) corpus")
    p.add_argument("--out", required=True, help="where to write tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--max-bytes", type=int, default=None, help="train on a prefix of books")
    args = p.parse_args(argv)
    summary = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size,
                              max_bytes=args.max_bytes)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
