"""`dejavu-run convert`: .bin checkpoints (single, sharded, tied head) become safetensors that
load to the same model; a pickle that would run code is refused, and the code never runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dejavu.runtime.checkpoint import CheckpointError, load_model
from dejavu.runtime.model import Batch, OPTModel, full_positions
from dejavu.runtime.opt_config import OPTConfig
from dejavu.tools.cli import app
from dejavu.tools.convert import convert

SMALL = dict(vocab_size=61, hidden_size=16, num_hidden_layers=2, ffn_dim=24,
             num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16,
             torch_dtype="float32")


def bin_checkpoint(path: Path, *, tied: bool = True, shards: int = 1) -> OPTModel:
    """A checkpoint as old transformers wrote it: HF key names, the tied head stored and
    sharing the embedding's storage."""
    model = OPTModel(OPTConfig(**SMALL, tie_word_embeddings=tied))
    model.init_weights(torch.Generator().manual_seed(0), std=0.3)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    state = {(k if k.startswith("lm_head") else f"model.{k}"): v
             for k, v in model.state_dict().items()}
    if tied:
        assert state["lm_head.weight"].data_ptr() == state["model.decoder.embed_tokens.weight"
                                                           ].data_ptr()
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
    else:
        keys = sorted(state)
        weight_map = {}
        for i in range(shards):
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            part = {k: state[k] for k in keys[i::shards]}
            torch.save(part, path / name)
            weight_map.update(dict.fromkeys(part, name))
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model


def same_logits(a: OPTModel, b: OPTModel) -> bool:
    ids = torch.randint(0, SMALL["vocab_size"], (2, 6))
    batch = Batch(full_positions(2, 6, "cpu"))
    with torch.no_grad():
        return torch.equal(a(ids, batch), b(ids, batch))


@pytest.mark.parametrize("tied, shards", [(True, 1), (False, 1), (True, 3)])
def test_convert_round_trip(tmp_path, tied, shards):
    model = bin_checkpoint(tmp_path / "src", tied=tied, shards=shards)
    with pytest.raises(CheckpointError, match="dejavu-run convert"):
        load_model(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst")
    if shards > 1:
        index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == shards
    assert same_logits(model.eval(), load_model(tmp_path / "dst"))


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_pickle_is_refused_and_never_runs(tmp_path):
    bin_checkpoint(tmp_path / "src")
    marker = tmp_path / "pwned"
    torch.save({"model.decoder.embed_tokens.weight": torch.zeros(1), "x": RunsCode(marker)},
               tmp_path / "src" / "pytorch_model.bin")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "weights-only" in err, err
    assert not marker.exists()


def test_convert_cli_refuses_existing_destination(tmp_path):
    bin_checkpoint(tmp_path / "src")
    runner = CliRunner()
    ok = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert again.exit_code == 2 and "already holds safetensors" in again.stderr


def test_a_converted_checkpoint_has_the_usual_file_modes(tmp_path):
    bin_checkpoint(tmp_path / "src")
    old = os.umask(0o022)
    try:
        ok = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    finally:
        os.umask(old)
    assert ok.exit_code == 0, ok.output
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "dst").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("content", [b"garbage text, not a checkpoint", bytes(range(256)) * 8])
def test_a_garbage_bin_is_named_as_such_and_nothing_is_left_behind(tmp_path, content):
    bin_checkpoint(tmp_path / "src")
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(content)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "not a PyTorch checkpoint" in err, err
    assert "mmap" not in err
    assert not (tmp_path / "dst").exists()


def test_a_failed_convert_into_an_existing_directory_removes_only_what_it_wrote(tmp_path):
    bin_checkpoint(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["hidden_size"] = 48  # the tensors no longer match: the final check fails
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert result.exit_code == 2, result.output
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["notes.txt"]
