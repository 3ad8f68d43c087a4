"""Find, validate, load and write OPT checkpoints in safetensors form.

A checkpoint is a directory holding config.json and either model.safetensors or shards
listed by model.safetensors.index.json (Hugging Face's layout). ``--model`` may also be a
Hugging Face id, resolved through huggingface_hub's cache.

Everything is validated from the safetensors headers before any tensor is read: every
tensor the config implies is present exactly once with the right shape and one float
dtype (the one config.json declares, when it declares one); nothing unexpected is there;
the files are whole. Then only the tensors of the requested layer span are read, one key at
a time through ``safe_open`` (memory-mapped), so a pipeline worker never touches the rest;
each tensor read is checked to hold only finite values (in the dtype it is loaded in).

What this module does not know: tokenizers (``tokenizer``), predictors, and how a model is
executed. ``.bin`` checkpoints are refused here; ``tools/convert.py`` turns them into
safetensors.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import OPTModel
from .opt_config import ConfigError, OPTConfig


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read or trusted. The message is one line that
    names the file, the tensor and what is wrong."""


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# What a Hugging Face snapshot needs for us: weights in safetensors, config and tokenizer.
HF_ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    INDEX_NAME,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
]
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")

# safetensors dtype tags <-> torch dtypes (only float weights make sense for OPT).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4,
                "U64": 8}
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# A header larger than this is not a real checkpoint (OPT-175B's headers are ~100 KiB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name in _DTYPE_NAMES.values():
            return name
        raise CheckpointError(f"dtype {name}: expected one of {', '.join(_DTYPE_NAMES)}")
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise CheckpointError(
            f"dtype {name!r}: expected one of {', '.join(_DTYPE_NAMES)}"
        ) from None


# --- finding the directory -------------------------------------------------------------------


def resolve_model_dir(model: str | Path) -> Path:
    """A local checkpoint directory as given, or a Hugging Face id downloaded (or found in
    the cache) with only the files this runtime reads."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; expected a checkpoint directory or a "
                              "Hugging Face id")
    text = str(model)
    # "models/x" whose parent folder exists here is a local path that is missing, not a
    # Hugging Face id: say so instead of asking the hub.
    if not _HF_ID.match(text) or (path.parent != Path(".") and path.parent.is_dir()):
        raise CheckpointError(f"{text}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{text}: no such directory (huggingface_hub is not installed "
                              "to resolve it as a Hugging Face id)") from None
    try:
        local = snapshot_download(repo_id=text, allow_patterns=HF_ALLOW_PATTERNS)
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{text}: not a local directory, and not in the Hugging Face cache "
            "(offline: HF_HUB_OFFLINE=1 or no network); download it with network access "
            "or pass a local checkpoint directory"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{text}: not a local directory, and no such Hugging Face "
                              "repository (or it needs a token)") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{text}: could not download from Hugging Face: {first}") from None
    local = Path(local)
    if not any(local.glob("*.safetensors")):
        # Only the files we read were fetched: a repository with .bin weights alone lands
        # here without weights.
        raise CheckpointError(
            f"{text}: the Hugging Face repository has no safetensors weights; download its "
            "pytorch_model.bin and convert it: dejavu-run convert SRC DST"
        )
    return local


# --- reading safetensors headers -------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its stored key, file, safetensors dtype tag and shape."""

    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check one safetensors header without reading tensor data.

    Checks what safetensors itself would find at load time, but up front and with a message
    that names the file: the header length fits, the JSON is an object of well-formed
    entries, every tensor's byte range matches its shape and lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file "
                                      f"({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors: header claims {n} bytes, "
                    f"the file has {size - 8} after the length field"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: "
                              f"{exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in _ST_ITEMSIZE
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) for o in info["data_offsets"])
        )
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {key!r}")
        begin, end = info["data_offsets"]
        want = math.prod(info["shape"]) * _ST_ITEMSIZE[info["dtype"]]
        if not 0 <= begin <= end or end - begin != want:
            raise CheckpointError(
                f"{path}: corrupt safetensors: tensor {key!r} has byte range [{begin}, {end}) "
                f"but its shape {info['shape']} and dtype {info['dtype']} need {want} bytes"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated safetensors: tensor {key!r} ends at data byte {end}, "
                f"the file holds only {data_len} data bytes"
            )
        entries[key] = TensorEntry(key, path, info["dtype"], tuple(info["shape"]))
    return entries


# --- the checkpoint as a whole ---------------------------------------------------------------


@dataclass
class CheckpointLayout:
    """A validated checkpoint: its config and, per parameter name of ``OPTModel``, where
    that tensor is stored. ``lm_head.weight`` is absent when the head is tied and not
    stored (it is then the token embedding)."""

    model_dir: Path
    config: OPTConfig
    tensors: dict[str, TensorEntry]
    dtype: torch.dtype


def _weight_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid index ({exc})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index_path}: expected a 'weight_map' object of "
                                  "tensor name -> file name")
        files: list[Path] = []
        for key, name in weight_map.items():
            # Shards live beside the index; a path that climbs out is not a shard.
            if Path(name).name != name:
                raise CheckpointError(f"{index_path}: tensor {key!r} maps to {name!r}, which "
                                      "is not a plain file name in the checkpoint directory")
            file = model_dir / name
            if not file.is_file():
                raise CheckpointError(f"{index_path}: tensor {key!r} is in {name}, but that "
                                      "file is missing")
            if file not in files:
                files.append(file)
        return files, weight_map
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return [single], None
    if list(model_dir.glob("*.bin")) or (model_dir / "pytorch_model.bin.index.json").exists():
        raise CheckpointError(
            f"{model_dir}: has only PyTorch .bin weights, which are not loaded (pickle); "
            f"convert them first: dejavu-run convert {model_dir} DST"
        )
    raise CheckpointError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME} found")


def _declared_dtype(model_dir: Path) -> torch.dtype | None:
    """The dtype config.json declares (``torch_dtype`` or transformers 5's ``dtype``)."""
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = raw.get("torch_dtype", raw.get("dtype")) if isinstance(raw, dict) else None
    return _DTYPE_NAMES.get(name) if isinstance(name, str) else None


def expected_shapes(config: OPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the full model with its shape, from a weightless (meta) build."""
    with torch.device("meta"):
        model = OPTModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def inspect_checkpoint(model_dir: str | Path) -> CheckpointLayout:
    """Validate a checkpoint directory from its config and headers; reads no tensor data."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such checkpoint directory")
    try:
        config = OPTConfig.from_file(model_dir / "config.json")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    files, weight_map = _weight_files(model_dir)

    stored: dict[str, TensorEntry] = {}  # canonical name -> entry
    for file in files:
        for key, entry in read_header(file).items():
            # transformers saves OPTForCausalLM as model.decoder.*; fairseq-era exports
            # and our own module use decoder.*. Both name the same parameter.
            name = key.removeprefix("model.")
            if name in stored:
                other = stored[name]
                raise CheckpointError(
                    f"duplicate tensor {name!r}: stored as {other.key!r} in {other.file.name} "
                    f"and as {key!r} in {file.name}"
                )
            if weight_map is not None and weight_map.get(key, file.name) != file.name:
                raise CheckpointError(
                    f"{file}: tensor {key!r} is here, but {INDEX_NAME} says it is in "
                    f"{weight_map[key]}"
                )
            stored[name] = entry
    if weight_map is not None:
        for key, name in weight_map.items():
            if key.removeprefix("model.") not in stored:
                raise CheckpointError(f"{model_dir / INDEX_NAME}: tensor {key!r} is listed "
                                      f"in {name}, but that file does not contain it")

    expected = expected_shapes(config)
    tied = config.tie_word_embeddings
    for name, shape in expected.items():
        if name not in stored:
            if name == "lm_head.weight" and tied:
                continue  # tied head: the token embedding serves as the head
            raise CheckpointError(f"{model_dir}: missing tensor {name!r} (expected shape "
                                  f"{list(shape)} from config.json)")
        got = stored[name].shape
        if got != shape:
            raise CheckpointError(
                f"{stored[name].file}: tensor {stored[name].key!r} has shape {list(got)}, "
                f"config.json implies {list(shape)}"
            )
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        e = stored[unexpected[0]]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{e.file}: unexpected tensor {e.key!r}{more}; it is not part of "
                              "the OPT model config.json describes")

    declared = _declared_dtype(model_dir)
    dtype: torch.dtype | None = None
    for name in sorted(stored):
        entry = stored[name]
        got = _ST_DTYPES.get(entry.dtype)
        if got is None:
            raise CheckpointError(f"{entry.file}: tensor {entry.key!r} has dtype {entry.dtype}, "
                                  "expected a float dtype (F32, F16 or BF16)")
        want = declared or dtype
        if want is not None and got != want:
            source = "config.json declares" if declared else "the other tensors have"
            raise CheckpointError(
                f"{entry.file}: tensor {entry.key!r} has dtype {entry.dtype}, {source} "
                f"{str(want).removeprefix('torch.')}"
            )
        dtype = got
    assert dtype is not None  # expected_shapes is never empty
    return CheckpointLayout(model_dir, config, stored, dtype)


# --- loading ---------------------------------------------------------------------------------


def load_model(
    model: str | Path,
    *,
    layers: range | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> OPTModel:
    """Build ``OPTModel(config, layers)`` and fill it from the checkpoint, reading only the
    tensors that span needs. The model is returned in eval mode without gradients.

    ``progress(done, total)`` is called after each tensor is read (for a progress bar)."""
    dtype = parse_dtype(dtype)
    layout = inspect_checkpoint(resolve_model_dir(model))
    config = layout.config
    with torch.device("meta"):
        module = OPTModel(config, layers)
    names = list(module.state_dict().keys())

    def source(name: str) -> TensorEntry:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            # Tied: the embedding is the head, whatever else the file holds (as in HF).
            return layout.tensors["decoder.embed_tokens.weight"]
        return layout.tensors[name]

    handles: dict[Path, Any] = {}
    loaded: dict[str, torch.Tensor] = {}
    by_entry: dict[tuple[Path, str], torch.Tensor] = {}
    try:
        for done, name in enumerate(names, 1):
            entry = source(name)
            where = (entry.file, entry.key)
            if where not in by_entry:
                if entry.file not in handles:
                    handles[entry.file] = safe_open(str(entry.file), framework="pt")
                tensor = handles[entry.file].get_tensor(entry.key)
                by_entry[where] = tensor.to(device=device, dtype=dtype)
                _check_finite(entry, tensor, by_entry[where])
            loaded[name] = by_entry[where]
            if progress is not None:
                progress(done, len(names))
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors' own errors: a file changed under us, I/O
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{layout.model_dir}: failed reading tensors: {first}") from None
    finally:
        handles.clear()
    module.load_state_dict(loaded, strict=True, assign=True)
    if module.is_first and module.is_last and config.tie_word_embeddings:
        module.lm_head.weight = module.decoder.embed_tokens.weight
    module.requires_grad_(False)
    return module.eval()


def _check_finite(entry: TensorEntry, stored: torch.Tensor, loaded: torch.Tensor) -> None:
    """One NaN or inf in a weight turns every output into NaN, silently: refuse it at load.
    One reduction over the tensor where it now lives: a NaN or inf anywhere makes the sum
    NaN or inf, and a float32 sum of finite weights cannot overflow (3e38); only a
    non-finite sum pays for the exact elementwise check."""
    if math.isfinite(loaded.sum(dtype=torch.float32).item()):
        return
    if bool(torch.isfinite(loaded).all()):
        return
    where = f"{entry.file.name}: tensor {entry.key!r}"
    if bool(torch.isfinite(stored).all()):  # fine as stored: too large for the dtype asked
        raise CheckpointError(f"{where} overflows {str(loaded.dtype).removeprefix('torch.')} "
                              "(values beyond its range become inf); load it in a wider "
                              "dtype")
    bad = int((~torch.isfinite(stored)).sum())
    raise CheckpointError(f"{where} holds {bad} NaN or infinite value(s); the checkpoint is "
                          "corrupt or was saved from a diverged run")


# --- writing ---------------------------------------------------------------------------------


def save_model(
    model: OPTModel,
    model_dir: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    shard_bytes: int | None = None,
) -> Path:
    """Write a whole model as a Hugging Face style checkpoint: config.json plus
    model.safetensors, or shards of at most ``shard_bytes`` and their index. Keys use
    transformers' ``model.decoder.*`` naming (so transformers can read it too); a tied head
    is not stored."""
    if not (model.is_first and model.is_last):
        raise CheckpointError("save_model needs the whole model, not a layer span")
    out_dtype = parse_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        key = name if name.startswith("lm_head.") else f"model.{name}"
        # safetensors refuses shared storage; a private contiguous copy per tensor.
        tensors[key] = tensor.detach().to("cpu", out_dtype).contiguous().clone()

    hf = config.to_hf_dict()
    dtype_name = str(out_dtype).removeprefix("torch.")
    hf["torch_dtype"] = dtype_name
    hf["tie_word_embeddings"] = config.tie_word_embeddings
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    for stale in [out / SINGLE_NAME, out / INDEX_NAME, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)

    metadata = {"format": "pt"}
    if shard_bytes is None:
        save_file(tensors, str(out / SINGLE_NAME), metadata=metadata)
        return out
    if shard_bytes <= 0:
        raise CheckpointError(f"shard_bytes={shard_bytes}: expected a positive byte count")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out

