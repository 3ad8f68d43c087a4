"""The default-model tools on CPU: tokenizer training, corpus preparation, the trainer end
to end (tiny model, a few steps, sharded-free save, reload by both loaders) and its
determinism. Synthetic corpora only."""

from __future__ import annotations

import json
import lzma
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from dejavu.runtime.checkpoint import load_model
from dejavu.tools.train_data import WindowSampler, tokenize_corpus, unwrap_lines
from dejavu.tools.train_model import TrainConfig, lr_at, parse_args, train
from dejavu.tools.train_tokenizer import CorpusError, train_tokenizer

WORDS = ["the", "river", "old", "man", "said", "night", "light", "house", "ran", "and",
         "to", "of", "a", "woman", "quickly", "—", "é"]


def book(rng: random.Random, n: int) -> str:
    # Hard-wrapped like Project Gutenberg: ~60-character lines, blank line per paragraph.
    words = [rng.choice(WORDS) for _ in range(n)]
    lines, line = [], ""
    for i, w in enumerate(words):
        line = f"{line} {w}".strip()
        if len(line) > 60:
            lines.append(line)
            line = ""
        if i % 80 == 79:
            lines.append(line)
            lines.append("")
            line = ""
    return "\n".join([*lines, line]) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    paths = {}
    for name, n_books in (("train", 12), ("held", 2)):
        path = root / f"{name}.jsonl.xz"
        with lzma.open(path, "wt", encoding="utf-8") as f:
            for i in range(n_books):
                f.write(json.dumps({"id": f"b{i}", "text": book(rng, 400)}) + "\n")
        paths[name] = path
    tok = root / "tokenizer.json"
    train_tokenizer(paths["train"], tok, vocab_size=300)
    paths["tokenizer"] = tok
    return paths


def test_tokenizer_has_opt_specials_and_round_trips(corpus):
    tok = Tokenizer.from_file(str(corpus["tokenizer"]))
    assert tok.get_vocab_size() == 300
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    text = "The old man — said é, and ran.\n\n  Night!"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text  # byte-level: nothing is unknown
    assert 2 not in ids  # no BOS/EOS added by the tokenizer itself


def test_tokenizer_rejects_bad_corpus(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        train_tokenizer(bad, tmp_path / "t.json", vocab_size=300)


def test_unwrap_joins_prose_lines_and_keeps_paragraphs_and_verse():
    prose = "a" * 55 + "\nwrapped on\n\nnext paragraph " + "b" * 50 + "\ncontinues\n"
    assert unwrap_lines(prose) == ("a" * 55 + " wrapped on\n\nnext paragraph " + "b" * 50
                                   + " continues\n")
    verse = "Short line one,\nshort line two.\n    indented " + "c" * 60 + "\n  indented\n"
    assert unwrap_lines(verse) == verse


def test_corpus_stream_and_seeded_windows(corpus):
    tok = Tokenizer.from_file(str(corpus["tokenizer"]))
    stream, summary = tokenize_corpus(corpus["train"], tok, separator_id=2,
                                      unwrap_fraction=0.5, seed=3)
    assert summary["documents"] == 12 and 0 < summary["unwrapped"] < 12
    assert stream.dtype == np.uint16 and int((stream == 2).sum()) == 12 and stream[0] == 2
    again, _ = tokenize_corpus(corpus["train"], tok, separator_id=2, unwrap_fraction=0.5, seed=3)
    assert np.array_equal(stream, again)
    a = WindowSampler(stream, 16, seed=5, device="cpu").sample(4)
    b = WindowSampler(stream, 16, seed=5, device="cpu").sample(4)
    c = WindowSampler(stream, 16, seed=6, device="cpu").sample(4)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # labels are the inputs shifted by one


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(corpus="c", tokenizer="t", out="o", steps=100, lr=1e-3, warmup=10,
                      min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55e-3)
    assert lr_at(100, 100, cfg) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="exactly one of --steps and --time-budget"):
        TrainConfig(corpus="c", tokenizer="t", out="o")
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(corpus="c", tokenizer="t", out="o", time_budget=10, warmup=5)


def help_entries(text: str) -> dict[str, str]:
    """argparse's option list as {"--flag": its description}, wrapped lines joined."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):  # "  --flag METAVAR   description" (or on the next line)
            invocation, _, description = line.strip().partition("  ")
            flag = invocation.split(",")[0].split()[0]
            entries[flag] = description.strip()
        elif flag and line.strip():
            entries[flag] = f"{entries[flag]} {line.strip()}".strip()
    return entries


def test_help_describes_every_option(monkeypatch):
    from typer.testing import CliRunner

    from dejavu.tools.cli import app

    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width
    out = CliRunner().invoke(app, ["train-model", "--help"])
    assert out.exit_code == 0, out.output
    entries = help_entries(out.stdout)
    for name in TrainConfig.__dataclass_fields__:
        flag = "--" + name.replace("_", "-")
        assert entries.get(flag), f"{flag} has no description in:\n{out.stdout}"
    assert "gradients accumulate up to --batch-size [default: 64]" in entries["--micro-batch"]
    assert "give this or --time-budget" in entries["--steps"]
    assert entries["--compile"].endswith("[default: on]")
    assert entries["--device"].startswith("cuda | cpu")


def tiny_args(corpus, out, *extra: str) -> list[str]:
    return ["--corpus", str(corpus["train"]), "--tokenizer", str(corpus["tokenizer"]),
            "--out", str(out), "--layers", "2", "--hidden", "32", "--heads", "4",
            "--ffn", "128", "--positions", "64", "--seq-len", "32", "--batch-size", "4",
            "--micro-batch", "2", "--lr", "3e-3", "--warmup", "3", "--device", "cpu",
            "--no-compile", "--log-every", "4", "--val-every", "4", *extra]


def test_trainer_end_to_end_and_deterministic(corpus, tmp_path, capsys):
    from transformers import OPTForCausalLM

    extra = ["--steps", "8", "--heldout", str(corpus["held"]), "--eval-window", "32",
             "--eval-stride", "16", "--stats-tokens", "2000"]
    first = train(parse_args(tiny_args(corpus, tmp_path / "a", *extra)))
    second = train(parse_args(tiny_args(corpus, tmp_path / "b", "--steps", "8")))
    wa = load_file(tmp_path / "a" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(t.dtype == torch.float16 for t in wa.values())
    assert first["history"][0]["loss"] > first["final_loss"]  # it learned something
    assert second["final_loss"] == first["final_loss"]
    third = train(parse_args(tiny_args(corpus, tmp_path / "c", "--steps", "8", "--seed", "9")))
    assert third["final_loss"] != first["final_loss"]

    ev = first["eval"]
    assert ev["heldout"]["tokens"] > 0 and 0 < ev["heldout"]["bits_per_byte"] < 20
    layers = ev["mlp_activation"]["layers"]
    assert len(layers) == 2 and all(0 <= r["zero_fraction"] <= 1 for r in layers)
    assert all(0.1 <= r["top10_share"] <= 1 for r in layers)
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["steps"] == 8 and saved["tokens_seen"] == 8 * 4 * 32

    # Both loaders read the result and agree.
    ours = load_model(tmp_path / "a")
    hf = OPTForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    from dejavu.tools.eval_text import dense_logits_fn

    with torch.no_grad():
        torch.testing.assert_close(dense_logits_fn(ours)(ids), hf(ids).logits)


def test_time_budget_fixes_the_step_count(corpus, tmp_path, capsys):
    import re

    out = train(parse_args(tiny_args(corpus, tmp_path / "t", "--time-budget", "5",
                                     "--reserve", "2", "--warmup", "6", "--measure-from", "2",
                                     "--measure-to", "4")))
    log = capsys.readouterr().out
    fixed = re.search(r"total steps fixed at (\d+) \(reproduce with --steps (\d+)\)", log)
    assert fixed and fixed[1] == fixed[2]
    if "deadline: stopping early" not in log:  # the safety net, on a very loaded machine
        assert out["steps"] == int(fixed[1])
    assert out["steps"] > 4
