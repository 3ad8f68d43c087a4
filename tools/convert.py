"""`dejavu-run convert SRC DST`: a PyTorch .bin checkpoint -> safetensors.

The only place in the code base that calls ``torch.load``, and only with
``weights_only=True`` (tensors and plain containers; no code from the file runs). Reads
``pytorch_model.bin`` or shards listed by ``pytorch_model.bin.index.json``; writes
``model.safetensors`` or one safetensors shard per .bin shard plus
``model.safetensors.index.json``; copies config.json and the tokenizer files. The result is
then validated by the same loader every command uses.

Tied weights (OPT's lm_head is the token embedding) share storage in the .bin, which
safetensors refuses: the head is dropped when config.json ties it (the loader re-ties it),
and every other shared tensor is written as its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..runtime.checkpoint import INDEX_NAME, SINGLE_NAME, CheckpointError, inspect_checkpoint

BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.json", "merges.txt")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # torch.save writes a zip archive (mapped, not read, here); before PyTorch 1.6 a bare
    # pickle (protocol 2+, first byte 0x80). Anything else is no PyTorch file at all, and
    # torch.load's own message for it is about mmap.
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip "
                              f"archive; this file starts with {head!r})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True,
                           mmap=head == b"PK\x03\x04")
    except Exception as exc:  # a malicious or broken pickle: refused, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read as a weights-only PyTorch file: "
                              f"{first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors")
    return state


def _tied(src: Path) -> bool:
    try:
        raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{src / 'config.json'}: cannot read: {exc}") from None
    return bool(raw.get("tie_word_embeddings", True)) if isinstance(raw, dict) else True


def _prepare(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if tied and key.removeprefix("model.") == "lm_head.weight":
            continue
        # A private contiguous copy: no shared storage, no views into a larger buffer.
        out[key] = tensor.detach().contiguous().clone()
    return out


def convert(src: str | Path, dst: str | Path) -> Path:
    """Convert the .bin checkpoint in ``src`` into a safetensors checkpoint in ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint directory")
    if dst.exists() and any(dst.glob("*.safetensors")):
        raise CheckpointError(f"{dst}: already holds safetensors files; choose an empty "
                              "destination")
    tied = _tied(src)
    made = not dst.exists()
    before = set() if made else set(dst.iterdir())
    dst.mkdir(parents=True, exist_ok=True)
    try:
        _convert(src, dst, tied)
        inspect_checkpoint(dst)  # the result must pass the loader's own checks
    except BaseException:  # leave nothing half-written behind (Ctrl-C included)
        if made:
            shutil.rmtree(dst, ignore_errors=True)
        else:
            for path in set(dst.iterdir()) - before:
                path.unlink(missing_ok=True)
        raise
    return dst


def _convert(src: Path, dst: Path, tied: bool) -> None:
    metadata = {"format": "pt"}
    if (src / BIN_INDEX).is_file():
        try:
            weight_map = json.loads((src / BIN_INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{src / BIN_INDEX}: not a valid index ({exc})") from None
        shards = sorted(set(weight_map.values()))
        new_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards, 1):
            if Path(shard).name != shard or not (src / shard).is_file():
                raise CheckpointError(f"{src / BIN_INDEX}: shard {shard!r} is missing")
            tensors = _prepare(_load_bin(src / shard), tied)
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(dst / name), metadata=metadata)
            new_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": new_map}
        (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    elif (src / BIN_NAME).is_file():
        save_file(_prepare(_load_bin(src / BIN_NAME), tied), str(dst / SINGLE_NAME),
                  metadata=metadata)
    else:
        raise CheckpointError(f"{src}: no {BIN_NAME} or {BIN_INDEX} to convert")
    for name in COPIED:
        if (src / name).is_file() and src.resolve() != dst.resolve():
            shutil.copyfile(src / name, dst / name)
    # safetensors creates its files 0600; give them the modes any new file gets here.
    umask = os.umask(0)
    os.umask(umask)
    for path in dst.glob("*.safetensors"):
        path.chmod(0o666 & ~umask)
