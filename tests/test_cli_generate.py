"""`dejavu-run generate` end to end: the real command as a subprocess gives transformers'
greedy tokens; text streams; stop strings cut; and every bad input or bad checkpoint is one
line on stderr naming the problem, a non-zero exit and no traceback."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from opt_fixtures import save_hf_model, train_tokenizer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dejavu.runtime.checkpoint import load_model, save_model
from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.tokenizer import load_tokenizer
from dejavu.tools.cli import app

PROMPT = [2, 133, 44, 509, 17, 881]


def dejavu_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The console script installed beside this interpreter (a venv's, not another one's
    found first on PATH), else the same app through python."""
    exe = shutil.which("dejavu-run", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).parent)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_pre_ln")
    return save_hf_model("pre_ln", path), path


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """A random model whose vocabulary is a tiny trained tokenizer's."""
    path = tmp_path_factory.mktemp("text_model")
    train_tokenizer(path)
    vocab = load_tokenizer(path).vocab_size
    config = OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=64,
                       word_embed_proj_dim=32, torch_dtype="float32")
    model = OPTModel(config)
    model.init_weights(torch.Generator().manual_seed(3), std=0.3)
    save_model(model, path)
    return path


def test_generate_json_subprocess_matches_transformers(hf_pair):
    hf, path = hf_pair
    proc = dejavu_run("generate", "--model", str(path), "--prompt-ids",
                      ",".join(map(str, PROMPT)), "--max-new-tokens", "24", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"prompt_tokens", "tokens", "text"}
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=24,
                          pad_token_id=1)[0, len(PROMPT):].tolist()
    assert result["prompt_tokens"] == PROMPT
    assert result["tokens"] == ref and len(ref) > 0


def test_generate_streams_text_and_json_agrees(text_model):
    tok = load_tokenizer(text_model)
    common = ["generate", "--model", str(text_model), "--prompt", "The quick brown fox",
              "--max-new-tokens", "20", "--temperature", "0.8", "--seed", "11"]
    as_json = cli(*common, "--json")
    assert as_json.exit_code == 0, as_json.output
    result = json.loads(as_json.stdout)
    assert result["prompt_tokens"] == tok.encode("The quick brown fox")
    assert result["text"] == tok.decode(result["tokens"]) and result["text"]
    streamed = cli(*common)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == result["text"] + "\n"  # same seed, same tokens, same text

    # A stop string from the middle of that text ends the output right before it.
    text = result["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = cli(*common, "--json", "--stop", stop)
    assert stopped.exit_code == 0, stopped.output
    cut = json.loads(stopped.stdout)
    assert cut["text"] == text[:text.index(stop)]
    # The tokens end there too: those wholly before the stop string, none of it (as the
    # OpenAI API leaves the stop out); the next token would reach into the stop.
    kept = cut["tokens"]
    assert kept == result["tokens"][:len(kept)]
    assert cut["text"].startswith(tok.decode(kept))
    assert stop[0] in tok.decode(result["tokens"][:len(kept) + 1])[len(tok.decode(kept)):]


@pytest.mark.parametrize("args, needle", [
    (["--prompt", ""], "--prompt: empty prompt"),
    (["--prompt-ids", ""], "--prompt-ids: empty prompt"),
    (["--prompt-ids", "2,x"], "--prompt-ids: 'x' is not an integer"),
    ([], "exactly one of --prompt"),
    (["--prompt", "hi", "--prompt-ids", "2"], "exactly one of --prompt"),
    (["--prompt-ids", "2,9999"], "token id 9999 is outside the vocabulary"),
    (["--prompt-ids", "2,5", "--max-new-tokens", "127"], "exceeds the model's 128 positions"),
    (["--prompt-ids", "2", "--max-new-tokens", "0"], "max_new_tokens = 0"),
    (["--prompt-ids", "2", "--temperature", "-1"], "temperature = -1.0"),
    (["--prompt-ids", "2", "--temperature", "nan"], "temperature = nan"),
    (["--prompt-ids", "2", "--top-p", "0"], "top_p = 0.0"),
    (["--prompt-ids", "2", "--top-p", "1.5"], "top_p = 1.5"),
    (["--prompt-ids", "2", "--top-k", "-3"], "top_k = -3"),
    (["--prompt-ids", "2", "--dtype", "int8"], "dtype = 'int8'"),
    (["--prompt-ids", "2", "--device", "tpu"], "device = 'tpu'"),
])
def test_bad_requests_one_line(hf_pair, args, needle):
    _, path = hf_pair
    result = cli("generate", "--model", str(path), *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_gpu(hf_pair):
    result = cli("generate", "--model", str(hf_pair[1]), "--prompt-ids", "2", "--device", "cuda")
    assert result.exit_code == 2 and "--device cuda: CUDA is not available" in result.stderr


# --- bad checkpoints: every weights case of reliability.md ----------------------------------


def _edit(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _truncate(path: Path) -> None:
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])


def _corrupt_header(path: Path) -> None:
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:8] + b"#" + data[9:])


def _huge_header(path: Path) -> None:
    f = path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 2**40) + f.read_bytes()[8:])


def _shard_then(edit):
    def apply(path: Path) -> None:
        model_file = path / "model.safetensors"
        tensors = load_file(model_file)
        model_file.unlink()
        keys = sorted(tensors)
        half = len(keys) // 2
        parts = {"model-00001-of-00002.safetensors": keys[:half],
                 "model-00002-of-00002.safetensors": keys[half:]}
        for name, ks in parts.items():
            save_file({k: tensors[k] for k in ks}, path / name, metadata={"format": "pt"})
        weight_map = {k: n for n, ks in parts.items() for k in ks}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        edit(path, parts)
    return apply


def _missing_shard(path, parts):
    (path / "model-00002-of-00002.safetensors").unlink()


def _duplicate_across_shards(path, parts):
    a = load_file(path / "model-00001-of-00002.safetensors")
    b = load_file(path / "model-00002-of-00002.safetensors")
    key = sorted(a)[0]
    b[key] = a[key]
    save_file(b, path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})


def _bin_only(path: Path) -> None:
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")


W1 = "model.decoder.layers.1.fc1.weight"
BAD_CHECKPOINTS = {
    "missing": (lambda p: _edit(p, lambda t: t.pop(W1)), ["missing tensor", W1[6:]]),
    "unexpected": (lambda p: _edit(p, lambda t: t.update(extra=torch.zeros(1))),
                   ["unexpected tensor 'extra'"]),
    "shape": (lambda p: _edit(p, lambda t: t.update({W1: torch.zeros(208, 81)})),
              [W1, "[208, 81]", "[208, 80]"]),
    "dtype": (lambda p: _edit(p, lambda t: t.update({W1: t[W1].half()})), [W1, "F16", "float32"]),
    "truncated": (_truncate, ["truncated"]),
    "corrupt": (_corrupt_header, ["corrupt safetensors header"]),
    "huge_header": (_huge_header, ["header claims 1099511627776 bytes"]),
    "missing_shard": (_shard_then(_missing_shard), ["model-00002-of-00002", "missing"]),
    "duplicate": (_shard_then(_duplicate_across_shards), ["duplicate tensor"]),
    "bin_only": (_bin_only, ["dejavu-run convert"]),
}


@pytest.fixture
def broken(hf_pair, tmp_path, request) -> tuple[Path, list[str]]:
    damage, needles = BAD_CHECKPOINTS[request.param]
    path = tmp_path / "ckpt"
    shutil.copytree(hf_pair[1], path)
    damage(path)
    return path, needles


@pytest.mark.parametrize("broken", sorted(BAD_CHECKPOINTS), indirect=True)
def test_bad_checkpoint_one_line(broken):
    path, needles = broken
    result = cli("generate", "--model", str(path), "--prompt-ids", "2,5")
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("broken", ["truncated", "bin_only"], indirect=True)
def test_bad_checkpoint_subprocess_no_traceback(broken):
    path, needles = broken
    proc = dejavu_run("generate", "--model", str(path), "--prompt-ids", "2,5")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), proc.stderr


def test_hf_id_offline_without_cache_subprocess(tmp_path):
    proc = dejavu_run("generate", "--model", "facebook/opt-125m", "--prompt-ids", "2",
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "facebook/opt-125m" in lines[0]
    assert "not in the Hugging Face cache" in lines[0], lines[0]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(hf_pair):
    from dejavu.runtime.settings import load_settings
    from dejavu.tools.generate import GenerateRequest, run_generate

    settings = load_settings(None, {"model.path": str(hf_pair[1]),
                                    "generation.max_new_tokens": 2})
    request = GenerateRequest(prompt=None, prompt_ids="2,5")
    term, pipe, out = _Terminal(), io.StringIO(), io.StringIO()
    run_generate(settings, request, as_json=True, out=out, err=term)
    run_generate(settings, request, as_json=True, out=out, err=pipe)
    total = len(load_model(hf_pair[1]).state_dict())
    assert "loading weights" in term.getvalue()
    assert re.search(rf"{total}/{total} [\d.]+ tensors/s \d+s$", term.getvalue().rstrip())
    assert pipe.getvalue() == ""
    assert [json.loads(line)["prompt_tokens"] for line in out.getvalue().splitlines()] == [
        [2, 5], [2, 5]]
