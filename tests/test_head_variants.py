"""Head-selectable training (tools/head_training.py) and the head-variant study
(bench/head_variants.py) on CPU: the masked attention against a plain per-head reference,
the policies' draws and gradients, a tiny training run whose checkpoint both loaders read
identically, and the whole study end to end on a synthetic corpus."""

from __future__ import annotations

import json
import lzma
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from dejavu.bench.head_variants import parse_args, parse_variant, run_study
from dejavu.runtime.model import Batch, OPTModel, full_positions
from dejavu.runtime.opt_config import OPTConfig
from dejavu.tools.head_training import (
    HeadMaskedAttention,
    HeadPolicy,
    apply_head_mask,
    attach,
    detach,
    random_head_mask,
)

CFG = OPTConfig(vocab_size=50, hidden_size=40, num_hidden_layers=2, ffn_dim=72,
                num_attention_heads=5, max_position_embeddings=32, word_embed_proj_dim=40)


def tiny_model(seed: int = 0) -> OPTModel:
    torch.manual_seed(seed)
    model = OPTModel(CFG)
    model.init_weights(std=0.3)
    return model


def reference_masked_attention(attn, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain causal attention head by head, each head's out_proj share times scale[b, t, h]."""
    b, t, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(b, t, h, d)
    k = attn.k_proj(x).view(b, t, h, d)
    v = attn.v_proj(x).view(b, t, h, d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    out = attn.out_proj.bias.expand(b, t, c).clone()
    for head in range(h):
        s = torch.einsum("bid,bjd->bij", q[:, :, head], k[:, :, head]) / math.sqrt(d)
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("bij,bjd->bid", p, v[:, :, head])
        w = attn.out_proj.weight[:, head * d:(head + 1) * d]  # [C, D]
        out += scale[:, :, head:head + 1] * (o @ w.T)
    return out


@pytest.mark.parametrize("t", [1, 7, 13])
def test_masked_attention_equals_per_head_reference(t):
    attn = tiny_model().decoder.layers["0"].self_attn
    x = torch.randn(3, t, CFG.hidden_size, generator=torch.Generator().manual_seed(t))
    scale = torch.rand(3, t, CFG.num_attention_heads) * (torch.rand(3, t, 5) > 0.4)
    batch = Batch(full_positions(3, t, x.device))
    with torch.no_grad():
        got = apply_head_mask(attn, x, 0, batch, scale)
        torch.testing.assert_close(got, reference_masked_attention(attn, x, scale),
                                   atol=1e-5, rtol=1e-5)
        ones = torch.ones_like(scale)  # every head: exactly the plain attention
        torch.testing.assert_close(apply_head_mask(attn, x, 0, batch, ones),
                                   attn(x, 0, batch), atol=1e-6, rtol=1e-6)


def test_random_mask_keeps_exactly_k_heads_and_policy_rules():
    mask = random_head_mask((4, 9, 16), 6, "cpu")
    assert (mask.sum(-1) == 6).all()
    assert mask.float().mean(dim=(0, 1)).min() > 0  # every head gets kept somewhere
    assert HeadPolicy("drop", 0.5).kept(16) == 8 and HeadPolicy("drop", 0.75).kept(8) == 2
    assert HeadPolicy("drop", 0.01).kept(8) == 7  # always at least one head dropped
    with pytest.raises(ValueError, match="mode"):
        HeadPolicy("prune")
    with pytest.raises(ValueError, match="fraction"):
        HeadPolicy("drop", 1.0)
    with pytest.raises(ValueError, match="rescale"):
        HeadPolicy("gate", rescale=True)


def test_drop_scale_counts_tokens_and_rescales():
    attn = tiny_model().decoder.layers["0"].self_attn
    x = torch.randn(8, 30, CFG.hidden_size)
    torch.manual_seed(0)
    s = HeadMaskedAttention(attn, HeadPolicy("drop", 0.4, tokens=0.5, rescale=True),
                            CFG.hidden_size).scale(x)
    dropped = (s == 0).any(-1)  # tokens the policy touched
    assert 0.35 < dropped.float().mean() < 0.65
    assert ((s[dropped] == 0).sum(-1) == 2).all()  # 40% of 5 heads
    assert torch.allclose(s[dropped][s[dropped] > 0], torch.tensor(5 / 3))
    assert (s[~dropped] == 1).all()


def test_gate_forward_is_hard_mask_and_gate_learns():
    attn = tiny_model().decoder.layers["0"].self_attn
    wrapped = HeadMaskedAttention(attn, HeadPolicy("gate", 0.6, tokens=1.0), CFG.hidden_size)
    x = torch.randn(2, 6, CFG.hidden_size)
    s = wrapped.scale(x)
    assert ((s == 0) | (s == 1)).all() and ((s == 1).sum(-1) == 2).all()
    wrapped.train()
    out = wrapped(x, 0, Batch(full_positions(2, 6, x.device)))
    out.square().sum().backward()
    assert wrapped.gate.weight.grad is not None and wrapped.gate.weight.grad.abs().sum() > 0
    wrapped.eval()  # at inference the wrapper is the plain attention
    with torch.no_grad():
        batch = Batch(full_positions(2, 6, x.device))
        assert torch.equal(wrapped(x, 0, batch), attn(x, 0, batch))


def test_attach_detach_restores_exact_opt_modules():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach(model, HeadPolicy("gate"))
    assert any(".gate." in k for k in model.state_dict())
    with pytest.raises(ValueError, match="already"):
        attach(model, HeadPolicy("drop"))
    detach(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_variant_names():
    v = parse_variant("h16-drop0.25-t1-rescale")
    assert v.heads == 16 and v.policy == HeadPolicy("drop", 0.25, 1.0, True)
    assert parse_variant("h8").policy.mode == "none"
    assert parse_variant("h32-gate0.5").policy == HeadPolicy("gate", 0.5, 0.5)
    for bad in ("h16-t0.5", "16", "h16-drop"):
        with pytest.raises(ValueError):
            parse_variant(bad)


WORDS = ["the", "river", "old", "man", "said", "night", "light", "house", "ran", "and",
         "to", "of", "a", "woman", "quickly"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from dejavu.tools.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("heads")
    rng = random.Random(0)
    paths = {}
    for name, n_books in (("train", 12), ("held", 3)):
        path = root / f"{name}.jsonl.xz"
        with lzma.open(path, "wt", encoding="utf-8") as f:
            for i in range(n_books):
                text = " ".join(rng.choice(WORDS) for _ in range(1500))
                f.write(json.dumps({"id": f"b{i}", "text": text}) + "\n")
        paths[name] = path
    paths["wiki"] = root / "wiki.txt"
    paths["wiki"].write_text("\n".join(" = the river = " for _ in range(20)) + "\n")
    paths["tokenizer"] = root / "tokenizer.json"
    train_tokenizer(paths["train"], paths["tokenizer"], vocab_size=300)
    return paths


TINY = ["layers=2", "hidden=32", "ffn=128", "positions=64", "seq_len=64", "batch_size=4",
        "micro_batch=2", "lr=3e-3", "warmup=3", "compile=false", "log_every=4",
        "val_every=100"]


def test_gated_training_loss_falls_and_both_loaders_agree(corpus, tmp_path):
    from transformers import OPTForCausalLM

    from dejavu.runtime.checkpoint import load_model
    from dejavu.tools.eval_text import dense_logits_fn
    from dejavu.tools.train_model import TrainConfig, train

    sets = dict(s.split("=") for s in TINY)
    cfg = TrainConfig(corpus=str(corpus["train"]), tokenizer=str(corpus["tokenizer"]),
                      out=str(tmp_path / "m"), device="cpu", steps=12, heads=8,
                      head_policy="gate", head_fraction=0.5, head_tokens=0.5,
                      layers=2, hidden=32, ffn=128, positions=64, seq_len=64, batch_size=4,
                      micro_batch=2, lr=float(sets["lr"]), warmup=3, compile=False,
                      log_every=4)
    metrics = train(cfg)
    assert metrics["history"][0]["loss"] > metrics["final_loss"]
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert not any("gate" in k or "inner" in k for k in weights)
    ours = load_model(tmp_path / "m")
    hf = OPTForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert hf.config.num_attention_heads == 8 and ours.config.head_dim == 4
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense_logits_fn(ours)(ids), hf(ids).logits)


@pytest.mark.slow
def test_study_end_to_end_records_every_variant(corpus, tmp_path):
    args = parse_args(["--corpus", str(corpus["train"]), "--heldout", str(corpus["held"]),
                       "--wikitext", str(corpus["wiki"]), "--tokenizer",
                       str(corpus["tokenizer"]), "--variants", "h4,h5,h8-drop0.5-t1",
                       "--device", "cpu", "--docs", "2", "--chars", "600",
                       "--pred-tokens", "640", "--pred-epochs", "1", "--pred-batch", "64",
                       "--eval-batch", "4", "--work", str(tmp_path / "work"),
                       "--out", str(tmp_path / "out"), "--set", "steps=6",
                       *[a for s in TINY for a in ("--set", s)]])
    study = run_study(args, log=lambda m: None)
    saved = json.loads((tmp_path / "out" / "head_variants.json").read_text())
    assert [v["variant"] for v in saved["variants"]] == ["h4", "h5", "h8-drop0.5-t1"]
    h4, h5, h8 = study["variants"]
    assert h5["status"] == "failed" and "multiple of heads" in h5["error"]  # 32 % 5
    for rec in (h4, h8):
        assert rec["status"] == "ok" and rec["train"]["steps"] == 6
        assert 0 < rec["heldout_bpb"] < 20 and 0 < rec["wikitext2_bpb"] < 20
        oracle = {r["head_target"]: r for r in rec["rows"] if r["selector"] == "oracle-norm"}
        assert sorted(oracle) == [0.25, 0.5, 0.75]
        # Measured densities: round(d x H) heads per token.
        assert abs(oracle[0.5]["head_density"] - 0.5) < 1e-6
        point = [r for r in rec["rows"] if r["selector"] == "predictor"
                 and r["mlp_target"] is None]
        assert len(point) == 4 and all(r["mlp_density"] < 1.0 for r in point)
    assert h8["head_dim"] == 4 and h8["policy"]["mode"] == "drop"
    md = (tmp_path / "out" / "head_variants.md").read_text()
    assert "| h8-drop0.5-t1 | 8 x 4 |" in md and "h5 | failed" in md


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["drop", "gate"])
def test_head_policies_compile_and_train_on_cuda(corpus, tmp_path, policy, capsys):
    """The GPU path: bf16 autocast and torch.compile through the head-policy wrapper (a
    compile failure would silently fall back to slower eager steps)."""
    from dejavu.runtime.checkpoint import load_model
    from dejavu.tools.train_model import TrainConfig, train

    cfg = TrainConfig(corpus=str(corpus["train"]), tokenizer=str(corpus["tokenizer"]),
                      out=str(tmp_path / policy), device="cuda", steps=10, heads=8,
                      head_policy=policy, head_rescale=policy == "drop", layers=2,
                      hidden=64, ffn=256, positions=64, seq_len=64, batch_size=8,
                      micro_batch=4, lr=3e-3, warmup=3, log_every=5)
    metrics = train(cfg)
    assert "torch.compile failed" not in capsys.readouterr().out
    assert metrics["history"][0]["loss"] > metrics["final_loss"]
    assert load_model(tmp_path / policy).config.num_attention_heads == 8


def tiny_checkpoint(corpus, out, heads: int, predictors: bool = True):
    """A 6-step checkpoint of ``heads`` heads, with predictors fitted beside it."""
    from dejavu.bench.head_variants import fit_predictors
    from dejavu.runtime.checkpoint import load_model
    from dejavu.runtime.tokenizer import load_tokenizer
    from dejavu.tools.train_model import TrainConfig, train

    train(TrainConfig(corpus=str(corpus["train"]), tokenizer=str(corpus["tokenizer"]),
                      out=str(out), device="cpu", steps=6, heads=heads, layers=2, hidden=32,
                      ffn=128, positions=64, seq_len=64, batch_size=4, micro_batch=2, lr=3e-3,
                      warmup=3, compile=False, log_every=4))
    if predictors:
        fit = parse_args(["--corpus", str(corpus["train"]), "--heldout", str(corpus["held"]),
                          "--out", str(out), "--pred-tokens", "640", "--pred-epochs", "1",
                          "--pred-batch", "64", "--device", "cpu"])
        fit_predictors(load_model(out), load_tokenizer(out), fit, out / "predictors")
    return out


@pytest.mark.slow
def test_model_mode_scores_checkpoints_with_their_own_predictors(corpus, tmp_path):
    import hashlib

    from dejavu.bench.head_variants import heldout_slice, load_predictors, run_models
    from dejavu.bench.sparsity_sweep import Point, run_sweep
    from dejavu.runtime.checkpoint import load_model
    from dejavu.runtime.tokenizer import load_tokenizer

    h4 = tiny_checkpoint(corpus, tmp_path / "h4", 4)
    h8 = tiny_checkpoint(corpus, tmp_path / "h8", 8)
    bare = tiny_checkpoint(corpus, tmp_path / "bare", 4, predictors=False)
    with pytest.raises(SystemExit):  # not a checkpoint: refused before anything runs
        parse_args(["--model", str(tmp_path), "--heldout", str(corpus["held"]), "--out", "o"])
    with pytest.raises(SystemExit):  # --model trains nothing
        parse_args(["--model", str(h4), "--corpus", str(corpus["train"]), "--heldout",
                    str(corpus["held"]), "--out", "o"])
    args = parse_args(["--model", str(h4), "--model", str(h8), "--model", str(bare),
                       "--heldout", str(corpus["held"]), "--docs", "3", "--chars", "900",
                       "--eval-batch", "4", "--device", "cpu", "--out", str(tmp_path / "out")])
    study = run_models(args, log=lambda m: None)
    a, b, c = study["variants"]
    assert c["status"] == "failed" and "no predictors" in c["error"]
    for rec, heads in ((a, 4), (b, 8)):
        assert rec["status"] == "ok" and rec["heads"] == heads and rec["head_dim"] == 32 // heads
        assert rec["train"]["steps"] == 6 and rec["train"]["file"] == "metrics.json"
        weights = (tmp_path / f"h{heads}" / "model.safetensors").read_bytes()
        assert rec["sha256"] == hashlib.sha256(weights).hexdigest()
        assert len(rec["rows"]) == 11
        for r in rec["rows"]:
            docs = r["documents"]
            assert len(docs) == 3 and sum(d["tokens"] for d in docs) == r["tokens"]
            total = sum(d["nll"] for d in docs) / math.log(2) / sum(d["bytes"] for d in docs)
            assert total == pytest.approx(r["bits_per_byte"], rel=1e-9)
        oracle = {r["head_target"]: r for r in rec["rows"] if r["selector"] == "oracle-norm"}
        assert abs(oracle[0.5]["head_density"] - 0.5) < 1e-6
        at_point = [r for r in rec["rows"] if r["mlp_target"] is None]
        assert len(at_point) == 4 and all(r["mlp_density"] < 1.0 for r in at_point)
    # Scoring document by document gives what scoring them together gives.
    model = load_model(h8).eval()
    preds, _ = load_predictors(h8, model, "cpu")
    points = [Point("dense", 1.0, 1.0), Point("predictor", None, 0.5, "threshold")]
    with torch.no_grad():
        together = run_sweep(model, load_tokenizer(h8), preds,
                             heldout_slice(str(corpus["held"]), 3, 900), points=points,
                             window=64, stride=32, batch_size=4, log=lambda m: None)
    for ref, got in zip(together, (b["rows"][0], b["rows"][7]), strict=True):
        assert ref["config"] == got["config"] and ref["tokens"] == got["tokens"]
        assert got["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-5)
    md = (tmp_path / "out" / "head_models.md").read_text()
    assert "| h8 | 16 x 2 |" not in md and "| h8 | 8 x 4 | 6 steps" in md
    assert "- dense h8 - h4 on this slice:" in md and "| bare | failed:" in md
    saved = json.loads((tmp_path / "out" / "head_models.json").read_text())
    assert [v["variant"] for v in saved["variants"]] == ["h4", "h8", "bare"]
