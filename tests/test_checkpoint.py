"""Checkpoint loading: round trips, key prefixes, tied heads, span loading that reads only the
span, and every bad-weights case giving one CheckpointError line that names the problem."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dejavu.runtime import checkpoint
from dejavu.runtime.checkpoint import (
    CheckpointError,
    inspect_checkpoint,
    load_model,
    resolve_model_dir,
    save_model,
)
from dejavu.runtime.model import Batch, OPTModel, full_positions
from dejavu.runtime.opt_config import OPTConfig

SMALL = dict(vocab_size=97, hidden_size=24, num_hidden_layers=3, ffn_dim=40,
             num_attention_heads=3, max_position_embeddings=32, word_embed_proj_dim=24,
             torch_dtype="float32")


def make_model(seed: int = 0, **overrides) -> OPTModel:
    model = OPTModel(OPTConfig(**{**SMALL, **overrides}))
    model.init_weights(torch.Generator().manual_seed(seed), std=0.2)
    return model.eval()


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_model(make_model(), tmp_path / "ckpt")


def logits(model: OPTModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, Batch(full_positions(ids.shape[0], ids.shape[1], "cpu")))


def rewrite(path: Path, edit) -> None:
    """Load model.safetensors, let ``edit`` change the dict, write it back."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def expect_error(path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# --- what loads -------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False},
                                       {"do_layer_norm_before": False, "word_embed_proj_dim": 16}])
@pytest.mark.parametrize("shard_bytes", [None, 6000])
def test_round_trip_single_and_sharded(tmp_path, overrides, shard_bytes):
    model = make_model(**overrides)
    save_model(model, tmp_path, shard_bytes=shard_bytes)
    if shard_bytes:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    loaded = load_model(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9))
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.decoder.embed_tokens.weight


def test_decoder_prefix_and_stored_tied_head(ckpt):
    ref = load_model(ckpt)

    def strip_prefix_and_store_head(t):
        for key in list(t):
            t[key.removeprefix("model.")] = t.pop(key)
        t["lm_head.weight"] = t["decoder.embed_tokens.weight"].clone()

    rewrite(ckpt, strip_prefix_and_store_head)
    assert set(load_file(ckpt / "model.safetensors")) >= {"decoder.layers.0.fc1.weight",
                                                          "lm_head.weight"}
    ids = torch.randint(0, 97, (1, 5))
    assert torch.equal(logits(ref, ids), logits(load_model(ckpt), ids))


def test_dtype_conversion_on_load(tmp_path):
    model = make_model()
    save_model(model, tmp_path, dtype=torch.float16)
    assert inspect_checkpoint(tmp_path).dtype == torch.float16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float16"
    loaded = load_model(tmp_path, dtype="bfloat16")
    assert loaded.decoder.layers["1"].fc1.weight.dtype == torch.bfloat16
    expected = model.decoder.layers["1"].fc1.weight.half().to(torch.bfloat16)
    assert torch.equal(loaded.decoder.layers["1"].fc1.weight, expected)


def test_span_loading_reads_only_the_span(ckpt, monkeypatch):
    read: list[str] = []
    real_open = checkpoint.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(checkpoint, "safe_open", Recording)
    middle = load_model(ckpt, layers=range(1, 2))
    assert read and all(k.startswith("model.decoder.layers.1.") for k in read), read
    assert len(read) == len(middle.state_dict())

    read.clear()
    last = load_model(ckpt, layers=range(2, 3))
    # The tied head of the last stage is the token embedding: that one tensor, no other.
    assert set(read) - {k for k in read if k.startswith("model.decoder.layers.2.")} == {
        "model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias",
        "model.decoder.embed_tokens.weight"}

    read.clear()
    first = load_model(ckpt, layers=range(0, 1))
    assert not any(k.startswith(("model.decoder.layers.1.", "model.decoder.layers.2.",
                                 "model.decoder.final")) for k in read)

    # The three spans chained give the whole model's logits.
    full = load_model(ckpt)
    ids = torch.randint(0, 97, (2, 7))
    batch = Batch(full_positions(2, 7, "cpu"))
    with torch.no_grad():
        chained = last(middle(first(ids, batch), batch), batch)
    torch.testing.assert_close(chained, logits(full, ids), rtol=0, atol=0)


# --- what is refused --------------------------------------------------------------------------


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.decoder.layers.1.fc1.weight"))
    expect_error(ckpt, "missing tensor", "decoder.layers.1.fc1.weight", "[40, 24]")


def test_missing_untied_head(tmp_path):
    save_model(make_model(tie_word_embeddings=False), tmp_path)
    rewrite(tmp_path, lambda t: t.pop("lm_head.weight"))
    expect_error(tmp_path, "missing tensor", "lm_head.weight")


def test_unexpected_tensor(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.decoder.layers.7.fc1.weight": torch.zeros(2)}))
    expect_error(ckpt, "unexpected tensor", "model.decoder.layers.7.fc1.weight")


def test_wrong_shape_names_tensor_expected_and_actual(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.decoder.layers.2.fc2.weight": torch.zeros(24, 41)}))
    expect_error(ckpt, "model.decoder.layers.2.fc2.weight", "[24, 41]", "[24, 40]")


def test_dtype_disagreeing_with_config(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.decoder.layers.0.fc1.bias":
                                      t["model.decoder.layers.0.fc1.bias"].half()}))
    expect_error(ckpt, "model.decoder.layers.0.fc1.bias", "F16", "float32")


def test_integer_tensor_refused(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.decoder.layers.0.fc1.bias":
                                      torch.zeros(40, dtype=torch.int32)}))
    expect_error(ckpt, "model.decoder.layers.0.fc1.bias", "I32")


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    expect_error(ckpt, "truncated", "model.safetensors")


def test_header_longer_than_file(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b'{"a":')
    expect_error(ckpt, "truncated or corrupt", "header claims 1000000 bytes")


def test_header_not_json(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"\x00{garbage" + data[8 + 9:])
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] == n
    expect_error(ckpt, "corrupt safetensors header", "not valid JSON")


def test_bad_byte_range(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = "model.decoder.layers.0.fc1.bias"
    begin, _ = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, begin + 4]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    expect_error(ckpt, "corrupt safetensors", key)


def test_index_naming_missing_file(tmp_path):
    save_model(make_model(), tmp_path, shard_bytes=6000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    expect_error(tmp_path, "model.safetensors.index.json", shard.name, "missing")


def test_duplicate_keys_across_shards(tmp_path):
    save_model(make_model(), tmp_path, shard_bytes=6000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    first = load_file(shards[0])
    last = load_file(shards[-1])
    key = next(iter(first))
    last[key] = first[key]
    save_file(last, shards[-1], metadata={"format": "pt"})
    expect_error(tmp_path, "duplicate tensor", key.removeprefix("model."))


def test_both_prefixes_of_one_tensor_are_duplicates(ckpt):
    rewrite(ckpt, lambda t: t.update({"decoder.layers.0.fc1.bias":
                                      t["model.decoder.layers.0.fc1.bias"].clone()}))
    expect_error(ckpt, "duplicate tensor", "decoder.layers.0.fc1.bias")


def test_bin_only_checkpoint_names_convert(tmp_path):
    model = make_model()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    expect_error(tmp_path, "dejavu-run convert", str(tmp_path))


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    expect_error(ckpt, "config.json", "no such file")


def test_config_that_is_not_opt(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(raw))
    expect_error(ckpt, "model_type='llama'")


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_model_dir(tmp_path / "nope" / "deeper")
    # A missing folder inside an existing one is a missing path, not a Hugging Face id.
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_model_dir(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_dir(tmp_path / "file")


def test_hf_id_from_offline_cache(tmp_path, monkeypatch, ckpt):
    """A Hugging Face id resolves through the hub cache without network."""
    import huggingface_hub.constants as hub_constants

    repo = tmp_path / "hub" / "models--someone--tiny-opt"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in ckpt.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_dir("someone/tiny-opt") == snapshot
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights.*dejavu-run convert"):
        resolve_model_dir("someone/tiny-opt")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_model_dir("someone/absent-model")
