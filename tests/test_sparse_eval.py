"""`dejavu-run eval --sparse/--dense` and `train-predictors` end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from opt_fixtures import CORPUS, train_tokenizer
from typer.testing import CliRunner

from dejavu.runtime.checkpoint import save_model
from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.tools.cli import app

CFG = OPTConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse_eval")
    torch.manual_seed(0)
    model = OPTModel(CFG)
    model.init_weights(std=0.1)
    save_model(model, path / "model")
    train_tokenizer(path / "model")
    text = path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(CORPUS[i:] + CORPUS[:i])}) + "\n"
                            for i in range(5)) * 4)
    return path


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout  # progress bars go to stderr


def test_train_predictors_then_eval_sparse_and_dense(checkpoint, tmp_path):
    model, text = checkpoint / "model", checkpoint / "text.jsonl"
    out = model / "predictors"
    run("train-predictors", "--model", str(model), "--data", str(text), "--out", str(out),
        "--tokens", "1200", "--window", "24", "--rank", "8", "--head-rank", "4",
        "--epochs", "2", "--head-point", "0.5")
    assert (out / "predictors.safetensors").is_file() and (out / "report.md").is_file()
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 2
    common = ["eval", "--model", str(model), "--data", str(text), "--window", "32",
              "--stride", "16", "--json"]
    sparse = json.loads(run(*common, "--sparse"))
    dense = json.loads(run(*common, "--dense"))
    assert "mlp_density" not in dense["metrics"]
    assert 0 < sparse["metrics"]["mlp_density"] < 1
    assert sparse["metrics"]["head_density"] == pytest.approx(0.5)
    assert sparse["metrics"]["bits_per_byte"] != dense["metrics"]["bits_per_byte"]
    # Predictors trained for this model; another model with the same shapes refuses them.
    torch.manual_seed(1)
    other = OPTModel(CFG)
    other.init_weights(std=0.1)
    save_model(other, tmp_path / "other")
    train_tokenizer(tmp_path / "other")
    shutil.copytree(out, tmp_path / "other" / "predictors")
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "other"), "--data",
                                      str(text), "--sparse", "--json"])
    assert result.exit_code == 2 and "another model" in result.output
