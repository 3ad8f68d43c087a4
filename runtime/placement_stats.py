"""The model's own firing statistics, for placing hot rows of offloaded layers at start-up.

``train-predictors`` writes ``frequencies.safetensors`` beside the predictors: float32
``layers.{i}.mlp`` [F] and ``layers.{i}.heads`` [H], the fraction of calibration tokens on
which each neuron fires and each head is among the selected ones, and in its metadata the
format, the model's hash and one hash per layer (runtime/predictors.py's ``Fingerprint``).
``read_frequencies`` turns the file into weight_store's ``LayerFrequencies`` for a span of
layers, refusing a file made for other weights; ``find_frequencies`` says where a
checkpoint's file would be. The file is read and checked by runtime/predictors.py's
``load_frequencies``, the one reader of its format.

What this module does not know: how rows are placed (weight_store.plan_placement) or how
the statistics are measured (tools/train_predictors.py).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .predictors import FREQUENCIES_FILE as FILE_NAME
from .predictors import PredictorError, load_frequencies
from .weight_store import LayerFrequencies, PlacementError


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
    lacks one of the layers, or was measured on other weights (runtime/predictors.py's
    ``load_frequencies`` reads and checks it: one reader of the format)."""
    try:
        freqs = load_frequencies(path, model)
    except PredictorError as exc:
        raise PlacementError(str(exc)) from None
    return {lid: LayerFrequencies(freqs.mlp[lid].float(), freqs.heads[lid].float())
            for lid in freqs.mlp}
