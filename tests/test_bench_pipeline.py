"""bench/bench_pipeline.py's streamed random checkpoint: one shard per layer plus one for the
embeddings, OPT's initialisation in the requested dtype, readable span by span by the
loader (which opens only the span's shards), and reused only when it is the same shape."""

from __future__ import annotations

import json

import pytest
import torch

from dejavu.bench.bench_pipeline import SHAPES, parse_select, random_checkpoint, shape_config
from dejavu.runtime.checkpoint import INDEX_NAME, inspect_checkpoint, load_model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_checkpoint_is_sharded_per_layer_and_initialised_like_opt(tmp_path, dtype):
    out, seconds = random_checkpoint("tiny", tmp_path / "ckpt", dtype, log=lambda m: None)
    config = shape_config("tiny")
    assert seconds > 0 and inspect_checkpoint(out).dtype == dtype
    weight_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) == config.num_hidden_layers + 1
    for i in range(config.num_hidden_layers):  # each layer alone in its own shard
        files = {f for k, f in weight_map.items() if f".layers.{i}." in k}
        assert len(files) == 1 and not any(
            weight_map[k] in files for k in weight_map if f".layers.{i}." not in k)
    model = load_model(out, layers=range(3, 6), dtype=dtype)
    layer = model.layers()[0]
    assert layer.fc1.weight.dtype == dtype
    assert float(layer.fc1.weight.float().std()) == pytest.approx(0.02, rel=0.05)
    assert not layer.fc1.bias.any() and bool((layer.final_layer_norm.weight == 1).all())
    # Reused when it is the same checkpoint, rewritten for another dtype.
    assert random_checkpoint("tiny", out, dtype, log=lambda m: None)[1] == 0.0
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    assert random_checkpoint("tiny", out, other, log=lambda m: None)[1] > 0


def test_shapes_are_the_published_opt_configs_and_select_is_checked():
    for name, (c, layers, f, h) in {"opt-13b": (5120, 40, 20480, 40),
                                    "opt-30b": (7168, 48, 28672, 56),
                                    "opt-66b": (9216, 64, 36864, 72)}.items():
        cfg = shape_config(name)
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.ffn_dim,
                cfg.num_attention_heads, cfg.vocab_size) == (c, layers, f, h, 50272), name
    assert set(SHAPES) >= {"tiny", "opt-1.3b", "opt-13b", "opt-30b", "opt-66b"}
    assert parse_select("random:0.1") == {
        "sparsity.enabled": True, "sparsity.selector": "random", "sparsity.mlp_density": 0.1,
        "sparsity.head_density": 1.0}
    assert parse_select("random:0.1:0.5")["sparsity.head_density"] == 0.5
    assert parse_select("dense") == {"sparsity.enabled": False}
    for bad in ("random:0", "random:x", "topk:0.5", "random:0.1:2", "random:0.1:0.5:1"):
        with pytest.raises(SystemExit, match="--select"):
            parse_select(bad)
