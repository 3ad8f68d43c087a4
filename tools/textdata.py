"""Text corpora as documents: a .txt file is one document; .jsonl and .jsonl.xz give one
document per line, its "text" field. The one reader behind tokenizer training, model
training, predictor calibration and `eval` on a text file."""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterator
from pathlib import Path


class TextDataError(ValueError):
    """A text file that cannot be read as documents; the message names the path (and line)."""


def open_text(path: Path):
    """Open a plain or xz-compressed UTF-8 file for reading text."""
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def check_text_file(path: str | Path) -> Path:
    """``path`` if it is a file ``iter_documents`` reads (.txt, .jsonl, .jsonl.xz), else
    ``TextDataError``: a check that runs before any work, where reading comes later."""
    path = Path(path)
    if not path.is_file():
        raise TextDataError(f"{path}: no such file")
    if not path.name.removesuffix(".xz").endswith((".txt", ".jsonl")):
        raise TextDataError(f"{path}: expected a .txt, .jsonl or .jsonl.xz file")
    return path


def iter_documents(path: str | Path, *, max_bytes: int | None = None) -> Iterator[str]:
    """Stream the documents of ``path``, stopping once ``max_bytes`` UTF-8 bytes of text have
    been yielded (None: all of it). The document that crosses the limit is yielded whole, so
    a sample is a prefix of whole documents."""
    path = check_text_file(path)
    if path.name.removesuffix(".xz").endswith(".txt"):
        with open_text(path) as f:
            yield f.read()
        return
    seen = 0
    for lineno, row in json_lines(path):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise TextDataError(f'{path}:{lineno}: expected an object with a "text" string')
        yield text
        seen += len(text.encode("utf-8"))
        if max_bytes is not None and seen >= max_bytes:
            return


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) for each non-blank line of a .jsonl(.xz) file."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise TextDataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
