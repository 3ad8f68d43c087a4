"""Hot rows placed at start-up from the model's own firing statistics
(``frequencies.safetensors`` beside the predictors): the file is read and checked against the
weights, the most frequently firing neurons of offloaded layers land in the spare budget, and
the engine still computes what the resident one does while reading fewer host bytes.
"""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from safetensors.torch import save_file  # noqa: E402
from test_offload import layer_bytes, other_bytes  # noqa: E402
from test_sparse_backend import CFG, DEVICE, selector, tiny_model  # noqa: E402

from dejavu.runtime import sparse_backend  # noqa: E402
from dejavu.runtime.offload import OffloadSelector, fit_gib, host_bytes_read  # noqa: E402
from dejavu.runtime.placement_stats import find_frequencies, read_frequencies  # noqa: E402
from dejavu.runtime.predictors import FREQUENCIES_FORMAT as FORMAT  # noqa: E402
from dejavu.runtime.predictors import fingerprint  # noqa: E402
from dejavu.runtime.sampling import SamplingParams  # noqa: E402
from dejavu.runtime.weight_store import GIB, PlacementError  # noqa: E402
from dejavu.scheduler.engine import Engine  # noqa: E402
from dejavu.scheduler.planner import offload_reserved_bytes  # noqa: E402


def write_frequencies(model_dir, model, *, seed=0, fmt=FORMAT):
    """A frequencies file as train-predictors writes it; returns the per-layer tensors."""
    g = torch.Generator().manual_seed(seed)
    fp = fingerprint(model)
    tensors = {}
    for lid in model.layer_ids:
        tensors[f"layers.{lid}.mlp"] = torch.rand(CFG.ffn_dim, generator=g)
        tensors[f"layers.{lid}.heads"] = torch.rand(CFG.num_attention_heads, generator=g)
    meta = {"format": fmt, "model_hash": fp.model_hash, "config_hash": fp.config_hash,
            "layer_hashes": json.dumps({str(k): v for k, v in fp.layer_hashes.items()}),
            "tokens": "1000", "head_k": "1"}
    (model_dir / "predictors").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(model_dir / "predictors" / "frequencies.safetensors"), metadata=meta)
    return tensors


def test_read_frequencies_checks_the_weights(tmp_path):
    model = tiny_model(torch.float16, "cpu")
    tensors = write_frequencies(tmp_path, model)
    path = find_frequencies(tmp_path)
    assert path is not None and find_frequencies(tmp_path / "nothing") is None
    freqs = read_frequencies(path, model)
    assert sorted(freqs) == [0, 1]
    assert torch.equal(freqs[1].neurons, tensors["layers.1.mlp"])
    with pytest.raises(PlacementError, match="another model: layer 0"):
        read_frequencies(path, tiny_model(torch.float16, "cpu", seed=1))
    write_frequencies(tmp_path, model, fmt="something/2")
    with pytest.raises(PlacementError, match="format"):
        read_frequencies(path, model)


def budget_gib(model, slots, max_len):
    """Every layer but one fits, plus half a layer of spare for hot rows; no room for the
    prefill buffer (so that the spare goes to rows)."""
    reserved = offload_reserved_bytes(CFG, CFG.num_hidden_layers, slots, max_len, 2)
    return (other_bytes(model) + reserved + layer_bytes(model) * 3 // 2) / GIB


def test_hot_neurons_from_the_file_equal_tokens_and_fewer_host_bytes(tmp_path):
    """fit_gib with the checkpoint's statistics: the offloaded layer keeps its most frequent
    neurons on the device (static rows, no dynamic slots, no heads), the engine's greedy
    tokens equal the resident engine's, and the host reads fewer bytes than without."""
    prompts, params = [[2, 9, 4, 7], [2, 13]], SamplingParams(max_new_tokens=4, temperature=0.0)
    resident = tiny_model(torch.float16)
    sparse_backend.use_backend(resident, "torch")
    ref = [c.tokens for c in Engine(resident, max_batch=2, max_len=16,
                                    selector=selector()).run(prompts, params)]
    tensors = write_frequencies(tmp_path, tiny_model(torch.float16, "cpu"))
    read = {}
    for with_stats in (False, True):
        model = tiny_model(torch.float16, "cpu")
        layers, _ = fit_gib(model, budget_gib(model, 2, 16), device=DEVICE, slots=2,
                            max_len=16, model_dir=tmp_path if with_stats else None)
        assert layers == [1]
        rows = model.layers()[1].offloaded.rows
        if with_stats:
            hot = torch.nonzero(rows.neuron_loc.cpu() >= 0).flatten()
            assert 0 < hot.numel() < CFG.ffn_dim and rows.cache_heads.shape[0] == 0
            assert rows.cache_neurons.shape[0] == hot.numel()  # static only
            freq = tensors["layers.1.mlp"]
            assert float(freq[hot].min()) >= float(freq.sort(descending=True).values[
                hot.numel() - 1])  # the most frequent ones
        else:
            assert rows.cache_neurons.shape[0] == 0
        engine = Engine(model, max_batch=2, max_len=16,
                        selector=OffloadSelector(selector(), layers, CFG))
        assert [c.tokens for c in engine.run(prompts, params)] == ref
        read[with_stats] = host_bytes_read(model)
    assert read[True] < read[False]
