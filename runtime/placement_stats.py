"""The model's own firing statistics, for placing hot rows of offloaded layers at start-up.

``train-predictors`` writes ``frequencies.safetensors`` beside the predictors: float32
``layers.{i}.mlp`` [F] and ``layers.{i}.heads`` [H], the fraction of calibration tokens on
which each neuron fires and each head is among the selected ones, and in its metadata the
format, the model's hash and one hash per layer (runtime/predictors.py's ``Fingerprint``).
``read_frequencies`` turns the file into weight_store's ``LayerFrequencies`` for a span of
layers, refusing a file made for other weights; ``find_frequencies`` says where a
checkpoint's file would be. This small reader is the one seam: when runtime/predictors.py
grows its own loader, ``read_frequencies`` calls it.

What this module does not know: how rows are placed (weight_store.plan_placement) or how
the statistics are measured (tools/train_predictors.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .predictors import fingerprint
from .weight_store import LayerFrequencies, PlacementError

FORMAT = "dejavu-frequencies/1"
FILE_NAME = "frequencies.safetensors"


def find_frequencies(model_dir: str | Path | None) -> Path | None:
    """``<model>/predictors/frequencies.safetensors`` if that file exists (a Hugging Face id
    or a checkpoint without statistics: None)."""
    if model_dir is None:
        return None
    path = Path(model_dir) / "predictors" / FILE_NAME
    return path if path.is_file() else None


def read_frequencies(path: str | Path, model: nn.Module) -> dict[int, LayerFrequencies]:
    """Layer id -> frequencies for every layer ``model`` (a span of the checkpoint, its
    weights still loaded) holds. Raises PlacementError for a file that is not such a file,
    lacks one of the layers, or was measured on other weights."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise PlacementError(f"{path}: not a readable frequencies file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise PlacementError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    mine = fingerprint(model)
    theirs = json.loads(meta.get("layer_hashes", "{}"))
    # Per-layer hashes let a worker holding a span check its own layers; a file with only
    # the model hash can be checked by a model holding every layer.
    if theirs:
        bad = [lid for lid, h in mine.layer_hashes.items() if theirs.get(str(lid)) != h]
    else:
        bad = [] if meta.get("model_hash") == mine.model_hash else sorted(mine.layer_hashes)
    if bad:
        raise PlacementError(f"{path}: measured on other weights (layers {bad} differ from "
                             "this model's); run train-predictors for this model")
    config = model.config
    out = {}
    for lid in mine.layer_hashes:
        try:
            mlp, heads = tensors[f"layers.{lid}.mlp"], tensors[f"layers.{lid}.heads"]
        except KeyError as exc:
            raise PlacementError(f"{path}: no tensor {exc.args[0]}") from None
        if mlp.shape != (config.ffn_dim,) or heads.shape != (config.num_attention_heads,):
            raise PlacementError(f"{path}: layer {lid} has {tuple(mlp.shape)} neuron and "
                                 f"{tuple(heads.shape)} head frequencies, the model "
                                 f"({config.ffn_dim},) and ({config.num_attention_heads},)")
        out[lid] = LayerFrequencies(mlp.float(), heads.float())
    return out
