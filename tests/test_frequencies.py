"""Firing frequencies beside the predictors: the file placement reads, and its hash check."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from dejavu.runtime.model import OPTModel
from dejavu.runtime.predictors import (
    Frequencies,
    PredictorError,
    PredictorSet,
    fingerprint,
    load_frequencies,
)
from tests.test_predictors import CFG, tiny_model


def make(model: OPTModel) -> Frequencies:
    g = torch.Generator().manual_seed(0)
    return Frequencies(
        mlp={i: torch.rand(CFG.ffn_dim, generator=g) for i in model.layer_ids},
        heads={i: torch.rand(CFG.num_attention_heads, generator=g) for i in model.layer_ids},
        tokens=1234, head_k=2, fingerprint=fingerprint(model))


def test_round_trip_format_and_hash(tmp_path):
    model = tiny_model()
    freq = make(model)
    path = freq.save(tmp_path / "preds")
    assert path.name == "frequencies.safetensors"
    with safe_open(str(path), "pt") as f:  # the format placement reads, without this loader
        meta = f.metadata()
        assert set(f.keys()) == {f"layers.{i}.{k}" for i in range(3) for k in ("mlp", "heads")}
        assert f.get_tensor("layers.1.mlp").dtype == torch.float32
        assert f.get_tensor("layers.2.heads").shape == (CFG.num_attention_heads,)
    # The hash the predictors of the same model carry.
    assert meta["model_hash"] == PredictorSet.create(model, 4, 4).fingerprint.model_hash
    back = load_frequencies(tmp_path / "preds", model)
    assert back.tokens == 1234 and back.head_k == 2
    for i in range(3):
        assert torch.equal(back.mlp[i], freq.mlp[i]) and torch.equal(back.heads[i], freq.heads[i])
    by_hash = load_frequencies(path, model_hash=meta["model_hash"])
    assert sorted(by_hash.mlp) == [0, 1, 2]


def test_another_model_or_hash_is_refused(tmp_path):
    make(tiny_model(seed=0)).save(tmp_path)
    with pytest.raises(PredictorError, match="layer 0's weights differ"):
        load_frequencies(tmp_path, tiny_model(seed=1))
    with pytest.raises(PredictorError, match="another model"):
        load_frequencies(tmp_path, model_hash="0" * 64)
    with pytest.raises(PredictorError, match="pass the model or its hash"):
        load_frequencies(tmp_path)
    with pytest.raises(PredictorError, match="no such frequencies file"):
        load_frequencies(tmp_path / "nowhere", model_hash="0" * 64)


def test_a_span_gets_its_layers(tmp_path):
    model = tiny_model()
    make(model).save(tmp_path)
    span = OPTModel(CFG, range(1, 3))
    span.load_state_dict({k: v for k, v in model.state_dict().items()
                          if k in span.state_dict()})
    assert sorted(load_frequencies(tmp_path, span).mlp) == [1, 2]


def test_offloaded_layers_hash_as_before(tmp_path):
    """Offloading moves a layer's big weights into host records (meta on the module): the
    fingerprint reads them back, so predictors still load for it."""
    from dejavu.runtime.offload import offload_layers

    model = tiny_model().half()
    before = fingerprint(model)
    PredictorSet.create(model, 4, 4).save(tmp_path)
    offload_layers(model, [1], device="cpu")
    assert model.decoder.layers["1"].fc1.weight.is_meta
    assert fingerprint(model) == before
    assert PredictorSet.load(tmp_path, model).layer_ids == [0, 1, 2]


def test_layer_hash_samples_weights_larger_than_float32_counts_exactly():
    # 20.48M weights: float32 positions past 2**24 round up beyond the last one (an OPT-13B
    # fc1 has 1e8); the sample must stay inside the tensor.
    from torch import nn

    from dejavu.runtime.predictors import layer_hash

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(5120, 4000, bias=False)

    layer = Layer()
    first = layer_hash(layer)
    with torch.no_grad():
        layer.fc1.weight[-1, -1] += 1.0  # the last weight is in the sample
    assert layer_hash(layer) != first
