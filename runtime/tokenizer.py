"""Text <-> token ids for OPT checkpoints, and streaming detokenisation.

Loads ``tokenizer.json`` (any tokenizer the ``tokenizers`` library can read) or, as real
OPT checkpoints ship it, GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``. Like
Hugging Face's OPT tokenizer, ``encode`` puts the BOS token (``</s>``, id 2 for OPT) in
front of every prompt.

``StreamDecoder`` turns generated ids into text piece by piece and never emits part of a
UTF-8 character: byte-level tokens are mapped back to their bytes and an incremental UTF-8
decoder holds back an incomplete tail until the token that completes it arrives.

What this module does not know: the model, chat templates, or stop strings (the sampler
and scheduler own those).
"""

from __future__ import annotations

import codecs
import json
from functools import cache, cached_property
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

# Special tokens as OPT's vocab.json holds them; added as specials so that text containing
# them encodes to their single ids (as transformers does).
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


class TokenizerError(Exception):
    """A tokenizer that cannot be loaded, or ids it cannot decode. One line."""


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE spells each byte as one printable character: bytes that are
    printable (in Latin-1) stand for themselves, the other 68 are moved to code points 256
    and up in byte order. Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if chr(b) not in table:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class Tokenizer:
    """``encode(text) -> ids`` (BOS first), ``decode(ids) -> text``, and streaming."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int, eos_id: int,
                 source: str) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.source = source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self.special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special_ids |= {bos_id, eos_id}
        self.byte_level = isinstance(backend.decoder, decoders.ByteLevel)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        # The backend's own post-processor is bypassed so that BOS is added exactly once,
        # whatever tokenizer.json says. encode_batch, not encode: it releases the GIL while
        # it works (encode holds it, tokenizers 0.23), so a thread tokenising a long text
        # leaves the other threads (an HTTP server's event loop) running.
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        return [self.bos_id, *ids] if add_bos else ids

    @cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for: a text of more than ``n *
        max_token_bytes`` bytes has more than n tokens, known without tokenising it."""
        return max((len(self.token_bytes(i)) for i in range(self.vocab_size)), default=1)

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        self._check_ids(ids)
        # Ids past the tokenizer's vocabulary are the model's padding rows (OPT: 50265 ..
        # 50271): they have no text.
        known = [i for i in ids if i < self.vocab_size]
        return self.backend.decode(known, skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (byte-level BPE), or its UTF-8 text."""
        self._check_ids([token_id])
        if token_id >= self.vocab_size:
            return b""
        piece = self.backend.id_to_token(token_id)
        added = self._added.get(token_id)
        if added is not None:
            return added.encode("utf-8")
        if piece is None or not self.byte_level:
            return self.backend.decode([token_id]).encode("utf-8")
        table = byte_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.encode("utf-8")

    def stream(self, *, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    def detokenizer(self) -> StreamDecoder:
        """A fresh streaming decoder (the factory the scheduler calls per request)."""
        return StreamDecoder(self)

    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise TokenizerError(f"token id {i!r} is not a token id (expected an integer "
                                     f">= 0; the tokenizer knows [0, {self.vocab_size}))")


class StreamDecoder:
    """Feed generated ids one at a time; get back the text they complete.

    The pieces joined equal ``tokenizer.decode(all_ids)`` for byte-level tokenizers. For
    other tokenizers the text is re-decoded over the ids so far and only the new, complete
    suffix is emitted (a trailing U+FFFD means "more bytes to come" and is held back)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        if self.skip_special and token_id in tok.special_ids:
            tok._check_ids([token_id])
            return ""
        if tok.byte_level:
            return self._utf8.decode(tok.token_bytes(token_id), final=False)
        self._ids.append(token_id)
        text = tok.decode(self._ids, skip_special=self.skip_special)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return ""
        new, self._emitted = text[len(self._emitted):], text
        return new

    def finish(self) -> str:
        """Whatever was held back (an incomplete character becomes U+FFFD)."""
        if self.tokenizer.byte_level:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self._ids, skip_special=self.skip_special)
        new = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return new


def _byte_level_bpe(vocab: Path, merges: Path) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer from its two files: byte-level pre-tokenisation with GPT-2's
    splitting regex, no prefix space, BPE, byte-level decoding."""
    try:
        backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:  # tokenizers raises plain Exceptions with multi-line text
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(f"{vocab.parent}: cannot read vocab.json/merges.txt: "
                             f"{first}") from None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    present = [t for t in OPT_SPECIAL_TOKENS if backend.token_to_id(t) is not None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in present])
    return backend


def _special_ids(model_dir: Path, backend: tokenizers.Tokenizer) -> tuple[int, int]:
    """BOS/EOS: config.json's ids when the checkpoint has one (the model's truth), else the
    tokenizer's ``</s>`` (OPT uses it for both)."""
    config = model_dir / "config.json"
    if config.is_file():
        try:
            raw = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"{config}: cannot read bos/eos ids: {exc}") from None
        bos, eos = raw.get("bos_token_id"), raw.get("eos_token_id")
        if isinstance(bos, int) and isinstance(eos, int):
            return bos, eos
    end = backend.token_to_id("</s>")
    if end is None:
        raise TokenizerError(f"{model_dir}: no config.json with bos/eos ids and no '</s>' "
                             "token in the vocabulary")
    return end, end


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json, else vocab.json +
    merges.txt)."""
    model_dir = Path(model_dir)
    tokenizer_json = model_dir / "tokenizer.json"
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if tokenizer_json.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TokenizerError(f"{tokenizer_json}: cannot load: {first}") from None
        source = str(tokenizer_json)
    elif vocab.is_file() and merges.is_file():
        backend = _byte_level_bpe(vocab, merges)
        source = str(vocab)
    else:
        raise TokenizerError(f"{model_dir}: no tokenizer (expected tokenizer.json, or "
                             "vocab.json and merges.txt)")
    bos, eos = _special_ids(model_dir, backend)
    tok = Tokenizer(backend, bos_id=bos, eos_id=eos, source=source)
    for name, value in (("bos_token_id", bos), ("eos_token_id", eos)):
        if not 0 <= value < tok.vocab_size:
            raise TokenizerError(f"{model_dir}: {name}={value} is outside the tokenizer's "
                                 f"vocabulary [0, {tok.vocab_size})")
    return tok
