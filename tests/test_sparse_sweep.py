"""The quality sweep's bookkeeping: measured densities and the dense reference."""

from __future__ import annotations

import torch

from dejavu.bench.sparsity_sweep import Point, markdown, run_sweep
from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.predictors import PredictorSet

CFG = OPTConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)


class CharTokenizer:
    bos_id = 2

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [4 + ord(ch) % 36 for ch in text]
        return [self.bos_id, *ids] if add_bos else ids


def test_sweep_rows_carry_measured_densities():
    torch.manual_seed(0)
    model = OPTModel(CFG)
    model.init_weights(std=0.2)
    model.eval()
    preds = PredictorSet.create(model, 4, 4)
    docs = ["the cat sat on the mat " * 4, "a quick brown fox jumps " * 3]
    points = [Point("dense", 1.0, 1.0), Point("predictor", 0.25, 1.0),
              Point("random", 0.25, 0.5), Point("predictor", 1.0, 1.0)]
    rows = run_sweep(model, CharTokenizer(), preds, docs, points=points, window=16, stride=8,
                     log=lambda *_: None)
    dense, pred, rnd, full = rows
    assert dense["mlp_density"] == 1.0 and pred["head_density"] == 1.0
    assert abs(pred["mlp_density"] - 16 / 64) < 1e-9
    assert abs(rnd["head_density"] - 0.5) < 1e-9
    assert full["bits_per_byte"] == dense["bits_per_byte"]  # density 1 is the dense model
    assert rnd["bits_per_byte"] != dense["bits_per_byte"]
    table = markdown(rows, "header")
    assert "| random mlp=0.25 heads=0.5 | 0.250 | 0.500 |" in table
