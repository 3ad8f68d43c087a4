"""dejavu-run eval: text perplexity against an independent transformers computation, task
scoring against direct log-likelihoods, and the --json shape. Tiny random models and
synthetic files only."""

from __future__ import annotations

import json
import lzma
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from dejavu.runtime.checkpoint import save_model
from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.tokenizer import load_tokenizer
from dejavu.tools.cli import app
from dejavu.tools.eval import EvalOptions, evaluate
from dejavu.tools.eval_tasks import Request, build_requests, score_requests, task_metrics
from dejavu.tools.eval_text import dense_logits_fn, sliding_windows
from dejavu.tools.train_tokenizer import train_tokenizer

WORDS = ["the", "river", "old", "man", "said", "night", "light", "house", "ran", "quickly",
         "and", "to", "of", "a", "woman", "é", "—"]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer OPT with 64 positions and a 300-entry BPE, saved like a release."""
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    corpus = root / "corpus.jsonl.xz"
    with lzma.open(corpus, "wt", encoding="utf-8") as f:
        for _ in range(20):
            f.write(json.dumps({"text": words(rng, 300) + "\n"}) + "\n")
    out = root / "model"
    train_tokenizer(corpus, out / "tokenizer.json", vocab_size=300)
    config = OPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, ffn_dim=128,
                       num_attention_heads=4, max_position_embeddings=64,
                       word_embed_proj_dim=32, torch_dtype="float32")
    model = OPTModel(config)
    model.init_weights(torch.Generator().manual_seed(0), std=0.2)
    save_model(model, out, dtype=torch.float32)
    return out


def hf_sliding_nll(hf, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop: windows of ``window`` ids every ``stride``,
    earlier-scored labels masked with -100, loss = mean over the rest."""
    seq = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq.shape[1], stride):
        end = min(begin + window, seq.shape[1])
        trg = end - prev_end
        inp = seq[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg] = -100
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            loss = hf(inp, labels=labels).loss
        nll += float(loss) * n
        count += n
        prev_end = end
        if end == seq.shape[1]:
            break
    return nll, count


def test_perplexity_matches_transformers(model_dir, tmp_path):
    from transformers import OPTForCausalLM

    from dejavu.runtime.checkpoint import load_model

    rng = random.Random(1)
    text = words(rng, 150)
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    result = evaluate(model, tok, EvalOptions(data=[str(path)], window=32, stride=12,
                                              batch_size=3, show_progress=False))[0]
    hf = OPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.encode(text)  # BOS first, like our scoring
    assert len(ids) > 3 * 32  # several windows
    nll, count = hf_sliding_nll(hf, ids, window=32, stride=12)
    m = result["metrics"]
    assert m["tokens"] == count == len(ids) - 1
    assert m["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-3)
    assert m["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-3)
    # Random weights with std 0.2 are far from uniform: the check is not vacuous.
    assert abs(math.log(m["perplexity"]) - math.log(300)) > 0.05


def scored_targets(lengths, window, stride) -> dict[tuple[int, int], int]:
    seen: dict[tuple[int, int], int] = {}
    for w in sliding_windows(lengths, window, stride):
        assert w.end - w.start <= window - 1  # the window's last id is only a label
        for target in range(w.start + 1 + w.first, w.end + 1):
            seen[(w.doc, target)] = seen.get((w.doc, target), 0) + 1
    return seen


def test_sliding_windows_score_each_target_once():
    for lengths, window, stride in [([1, 2, 5, 33, 100], 8, 3), ([64, 65, 17], 16, 15)]:
        seen = scored_targets(lengths, window, stride)
        expected = {(d, t) for d, n in enumerate(lengths) for t in range(1, n)}
        assert set(seen) == expected and set(seen.values()) == {1}


def test_non_overlapping_windows_leave_each_first_id_as_context():
    # stride == window (the guide's loop, GPTQ-style): ids 16, 32 start windows unscored.
    seen = scored_targets([40], 16, 16)
    assert set(seen) == {(0, t) for t in range(1, 40) if t not in (16, 32)}
    assert set(seen.values()) == {1}


def direct_loglik(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One unbatched forward over context + continuation, no truncation, no padding."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(dense_logits_fn(model)(ids)[0], -1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    lps = [logp[p] for p in positions]
    ll = sum(float(lp[t]) for lp, t in zip(lps, continuation, strict=True))
    greedy = all(int(lp.argmax()) == t for lp, t in zip(lps, continuation, strict=True))
    return ll, greedy


def test_task_scoring_matches_direct_computation(model_dir):
    from dejavu.runtime.checkpoint import load_model

    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    rng = random.Random(2)
    rows = [{"query": words(rng, rng.randint(2, 9)),
             "choices": [words(rng, rng.randint(1, 5)) for _ in range(3)], "gold": i % 3}
            for i in range(6)]
    encode = lambda t: tok.encode(t, add_bos=False)  # noqa: E731
    groups, info = build_requests("arc_easy", rows, encode, tok.bos_id)
    flat = [r for g in groups for r in g]
    scores = score_requests(dense_logits_fn(model), flat, max_len=64, batch_size=4,
                            device="cpu")
    direct = [direct_loglik(model, list(r.context), list(r.continuation)) for r in flat]
    for s, (ll, greedy) in zip(scores, direct, strict=True):
        assert s.loglik == pytest.approx(ll, abs=1e-4)
        assert s.greedy == greedy
    # The prompt convention: context "<query>\nAnswer:", continuation " <choice>".
    assert flat[0].context == (tok.bos_id, *encode(rows[0]["query"] + "\nAnswer:"))
    assert flat[0].continuation == tuple(encode(" " + rows[0]["choices"][0]))
    metrics = task_metrics("arc_easy", groups, info, scores)
    lls = [[ll for ll, _ in direct[3 * i:3 * i + 3]] for i in range(len(rows))]
    acc = sum(max(range(3), key=ll.__getitem__) == row["gold"] for ll, row in zip(
        lls, rows, strict=True)) / len(rows)
    norm = [[x / len((" " + c).encode()) for x, c in zip(ll, row["choices"], strict=True)]
            for ll, row in zip(lls, rows, strict=True)]
    acc_norm = sum(max(range(3), key=n.__getitem__) == row["gold"] for n, row in zip(
        norm, rows, strict=True)) / len(rows)
    assert metrics == {"acc": acc, "acc_norm": acc_norm}


def test_long_request_keeps_its_last_positions(model_dir):
    from dejavu.runtime.checkpoint import load_model

    model = load_model(model_dir)
    context = [2] + [5 + i % 50 for i in range(90)]
    continuation = [7, 8, 9]
    (scored,) = score_requests(dense_logits_fn(model), [Request(tuple(context),
                               tuple(continuation))], max_len=64, batch_size=1, device="cpu")
    full = context + continuation
    inputs = torch.tensor([full[:-1][-64:]])  # the last 64 positions the model has
    with torch.no_grad():
        logp = torch.log_softmax(dense_logits_fn(model)(inputs)[0], -1)
    ll = sum(float(logp[61 + i, t]) for i, t in enumerate(continuation))
    assert scored.loglik == pytest.approx(ll, abs=1e-4)
    # ... and it differs from scoring with the whole context (which would not fit).
    assert inputs.shape[1] == 64 and len(full) - 1 > 64


def test_cli_json_shape_and_text_metrics(model_dir, tmp_path):
    rng = random.Random(3)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    with open(eval_dir / "copa.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"query": words(rng, 5) + ", therefore",
                                "choices": [words(rng, 3), words(rng, 3)], "gold": i % 2}) + "\n")
    with lzma.open(eval_dir / "lambada_openai.jsonl.xz", "wt", encoding="utf-8") as f:
        for _ in range(3):
            f.write(json.dumps({"context": words(rng, 20), "continuation": "river"}) + "\n")
    data = tmp_path / "held.jsonl"
    docs = [words(rng, 40) for _ in range(3)]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    runner = CliRunner()
    base = ["eval", "--model", str(model_dir), "--eval-dir", str(eval_dir), "--json"]
    res = runner.invoke(app, [*base, "--task", "copa", "--task", "lambada",
                              "--data", str(data), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["task"] for r in out] == ["copa", "lambada", "held.jsonl"]
    assert all(set(r) == {"task", "metrics", "n"} for r in out)
    assert [r["n"] for r in out] == [4, 3, 3]
    assert set(out[0]["metrics"]) == {"acc", "acc_norm"}
    assert set(out[1]["metrics"]) == {"acc", "perplexity"}
    text = out[2]["metrics"]
    assert text["bits_per_byte"] > 0 and text["perplexity"] > 1
    assert text["bytes"] == sum(len(d.encode()) for d in docs)
    one = runner.invoke(app, [*base, "--task", "copa"])
    assert one.exit_code == 0, one.output
    single = json.loads(one.stdout.strip().splitlines()[-1])
    assert isinstance(single, dict) and single["task"] == "copa"
    bad = runner.invoke(app, [*base, "--task", "nope"])
    assert bad.exit_code == 2 and "unknown task 'nope'" in bad.output
