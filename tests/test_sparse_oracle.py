"""Oracle head selection (what a perfect head predictor could reach) and the zero-shot
comparison's bookkeeping, on tiny random models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dejavu.bench.sparsity_sweep import Point, make_selector, markdown, merge_rows
from dejavu.bench.sparsity_zeroshot import paired_std_err, std_err
from dejavu.runtime.model import Batch, OPTModel, full_positions
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.selection import (
    AdaptiveOracleHeadSelector,
    OracleHeadSelector,
    RandomSelector,
    SelectionError,
)
from dejavu.tools.eval_tasks import Request, Scored, row_correct
from dejavu.tools.sparse_eval import sparse_logits_fn

CFG = OPTConfig(vocab_size=48, hidden_size=48, num_hidden_layers=3, ffn_dim=96,
                num_attention_heads=6, max_position_embeddings=32, word_embed_proj_dim=48)


def tiny_model(seed: int = 0) -> OPTModel:
    torch.manual_seed(seed)
    model = OPTModel(CFG)
    model.init_weights(std=0.3)  # large weights: heads differ a lot, as in a trained model
    return model.eval()


def ids(seed: int = 1, b: int = 3, t: int = 20) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["norm", "best"])
def test_oracle_at_density_one_equals_dense(method):
    model, x = tiny_model(), ids()
    dense = model(x, Batch(full_positions(*x.shape, "cpu")))
    fn, stats = sparse_logits_fn(model, OracleHeadSelector(model, 1.0, method))
    torch.testing.assert_close(fn(x), dense, rtol=1e-5, atol=1e-5)
    assert stats.head_density == 1.0 and stats.layers[2].tokens == x.numel()


def test_contributions_add_up_to_the_attention_output_of_each_layer():
    """The oracle's recomputed layer input and per-head split are the real ones: summed with
    the out_proj bias they give the attention output of a dense pass, at every layer."""
    model, x = tiny_model(), ids()
    oracle = OracleHeadSelector(model, 0.5, "norm")
    batch = Batch(full_positions(*x.shape, "cpu"))
    h = model.embed(x, batch.positions)
    source = h
    with torch.no_grad():
        for layer in model.layers():
            attn_out = layer.self_attn(layer.self_attn_layer_norm(h), layer.layer_id, batch)
            contrib = oracle.contributions(layer.layer_id, source)
            torch.testing.assert_close(contrib.sum(2) + layer.self_attn.out_proj.bias, attn_out,
                                       rtol=1e-5, atol=1e-5)
            mid = layer.attention_block(h, batch)
            source, h = mid, layer.mlp_block(mid)


def block_error(contrib: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """||sum of the dropped heads' contributions|| per token."""
    return (contrib * (~mask)[..., None]).sum(2).norm(dim=-1)


def test_best_subset_is_optimal_per_token_and_norm_keeps_the_largest():
    model, x = tiny_model(), ids()
    src = model.embed(x, full_positions(*x.shape, "cpu"))
    best, norm = OracleHeadSelector(model, 0.5, "best"), OracleHeadSelector(model, 0.5, "norm")
    contrib = best.contributions(0, src)
    b_mask, n_mask = best(0, src).heads, norm(0, src).heads
    assert b_mask.sum(-1).eq(3).all() and n_mask.sum(-1).eq(3).all()
    err = block_error(contrib, b_mask)
    # Every other 3-of-6 subset is at least as bad for every token (exhaustive check).
    for keep in itertools.combinations(range(6), 3):
        other = torch.zeros(6, dtype=torch.bool)
        other[list(keep)] = True
        assert (err <= block_error(contrib, other.expand_as(b_mask)) + 1e-5).all()
    assert (err <= block_error(contrib, n_mask) + 1e-5).all()
    # The norm oracle's kept heads all outnorm its dropped ones.
    norms = contrib.norm(dim=-1)
    kept_min = norms.masked_fill(~n_mask, math.inf).min(-1).values
    dropped_max = norms.masked_fill(n_mask, -math.inf).max(-1).values
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("method", ["norm", "best"])
@torch.no_grad()
def test_oracle_beats_random_selection_end_to_end(method):
    """At half the heads, the oracle's next-token distributions stay closer to dense than
    random selection's (KL from dense and logits error, several random seeds)."""
    model, x = tiny_model(), ids(t=24)
    dense = model(x, Batch(full_positions(*x.shape, "cpu"))).log_softmax(-1)

    def kl(logits):
        return float((dense.exp() * (dense - logits.log_softmax(-1))).sum(-1).mean())

    def mse(logits):
        return float((logits.log_softmax(-1) - dense).pow(2).mean())

    oracle = sparse_logits_fn(model, OracleHeadSelector(model, 0.5, method))[0](x)
    for seed in range(3):
        rnd = RandomSelector(CFG.ffn_dim, CFG.num_attention_heads, 1.0, 0.5, seed=seed)
        rnd_logits = sparse_logits_fn(model, rnd)[0](x)
        assert kl(oracle) < kl(rnd_logits)
        assert mse(oracle) < mse(rnd_logits)


@torch.no_grad()
def test_adaptive_oracle_hits_its_density_and_beats_fixed_k_at_it():
    """Calibrated on the first batch, the adaptive oracle's mean density is the target on
    that batch's dense pass; per token it keeps the fewest heads within the error bound, so
    some tokens keep fewer and some more heads than the fixed-k oracle."""
    model, x = tiny_model(), ids(t=24)
    positions = full_positions(*x.shape, "cpu")
    dense = model(x, Batch(positions)).log_softmax(-1)
    oracle = AdaptiveOracleHeadSelector(model, 0.5)
    src = model.embed(x, positions)
    bound = oracle.calibrate(src)
    rel, _ = oracle.best_by_size(oracle.contributions(0, src).float())
    k = oracle.first_within(rel, bound)
    assert k.min() < 3 < k.max()
    # Every smaller size misses the bound, the chosen one meets it.
    chosen = rel.gather(-1, k[..., None].long()).squeeze(-1)
    assert (chosen <= bound).all()
    smaller = torch.arange(7)[None, None] < k[..., None]
    assert (rel[smaller] > bound).all()
    fn, stats = sparse_logits_fn(model, oracle)
    logits = fn(x)
    assert oracle.rel_error == bound
    assert abs(stats.head_density - 0.5) < 0.1

    def kl(lg):
        return float((dense.exp() * (dense - lg.log_softmax(-1))).sum(-1).mean())

    rnd = RandomSelector(CFG.ffn_dim, CFG.num_attention_heads, 1.0, 0.5, seed=0)
    assert kl(logits) < kl(sparse_logits_fn(model, rnd)[0](x))
    full = sparse_logits_fn(model, AdaptiveOracleHeadSelector(model, 1.0))[0](x)
    torch.testing.assert_close(full.log_softmax(-1), dense, rtol=1e-4, atol=1e-4)


def test_oracle_refuses_bad_settings():
    model = tiny_model()
    with pytest.raises(SelectionError, match="oracle method"):
        OracleHeadSelector(model, 0.5, "psychic")
    with pytest.raises(SelectionError, match="head_density"):
        OracleHeadSelector(model, 0.0)
    with pytest.raises(SelectionError, match="subsets"):
        OracleHeadSelector(model, 0.5, "best", max_subsets=10)
    with pytest.raises(ValueError, match="MLP dense"):
        make_selector(Point("oracle-norm", 0.5, 0.5), None, model)


def test_merge_rows_replaces_appends_and_refuses_other_text():
    row = lambda name, sel, bpb, tokens=100: {"config": name, "selector": sel,  # noqa: E731
                                              "bits_per_byte": bpb, "tokens": tokens}
    saved = {"meta": {"m": 1}, "rows": [row("dense", "dense", 1.5) | {"piqa_acc": 0.5},
                                        row("a", "predictor", 1.6)]}
    merged = merge_rows(saved, [row("dense", "dense", 1.5), row("a", "predictor", 1.7),
                                row("oracle-norm mlp=1 heads=0.5", "oracle-norm", 1.55)])
    assert [r["config"] for r in merged["rows"]] == ["dense", "a", "oracle-norm mlp=1 heads=0.5"]
    assert merged["rows"][1]["bits_per_byte"] == 1.7 and merged["meta"] == {"m": 1}
    assert merged["rows"][0]["piqa_acc"] == 0.5  # kept from the saved row
    with pytest.raises(SystemExit, match="dense bits per byte"):
        merge_rows(saved, [row("dense", "dense", 1.51)])
    with pytest.raises(SystemExit, match="tokens"):
        merge_rows(saved, [row("b", "random", 2.0, tokens=99)])


def test_row_correct_and_standard_errors():
    r = Request((1,), (2,))
    groups = [[r, r], [r, r], [r]]
    info = [{"gold": 0, "bytes": [1, 1]}, {"gold": 1, "bytes": [1, 1]}]
    s = lambda ll: Scored(ll, False, 1)  # noqa: E731
    assert row_correct("piqa", groups[:2], info, [s(-1), s(-2), s(-1), s(-3)]) == [True, False]
    assert row_correct("lambada", [[r], [r]], [{}, {}],
                       [Scored(-1, True, 1), Scored(-1, False, 1)]) == [True, False]
    assert std_err(0.5, 100) == pytest.approx(0.05)
    # Identical runs: no difference and no error; one flip in 4 rows: sd of (0,0,0,1)/2.
    assert paired_std_err([True, False] * 2, [True, False] * 2) == 0.0
    assert paired_std_err([True, True, False, False], [True, True, False, True]) == \
        pytest.approx(math.sqrt(0.25 / 4))


def test_sweep_oracle_points():
    """The sweep's oracle rows: density 1 scores exactly as dense, half the heads change the
    score, densities are measured. (Bits per byte of a random-weight model say nothing about
    quality: the KL test above compares oracle and random.)"""
    from dejavu.bench.sparsity_sweep import run_sweep
    from dejavu.runtime.predictors import PredictorSet

    class Chars:
        bos_id = 2

        def encode(self, text: str, add_bos: bool = True) -> list[int]:
            return [4 + ord(ch) % 40 for ch in text]

    model = tiny_model()
    docs = ["the cat sat on the mat " * 3, "a quick brown fox jumps " * 2]
    points = [Point("dense", 1.0, 1.0), Point("oracle-best", 1.0, 1.0),
              Point("oracle-norm", 1.0, 0.5), Point("random", 1.0, 0.5)]
    dense, full, oracle, rnd = run_sweep(model, Chars(), PredictorSet.create(model, 4, 4), docs,
                                         points=points, window=16, stride=8,
                                         log=lambda *_: None)
    assert full["bits_per_byte"] == pytest.approx(dense["bits_per_byte"], rel=1e-6)
    assert oracle["head_density"] == pytest.approx(0.5) and oracle["mlp_density"] == 1.0
    assert oracle["bits_per_byte"] != dense["bits_per_byte"]
    assert rnd["head_density"] == pytest.approx(0.5)
    assert "| oracle-norm mlp=1 heads=0.5 | 1.000 | 0.500 |" in markdown([dense, oracle], "h")


def test_zeroshot_runs_pair_rows_and_match_random_density(tmp_path):
    """run_task scores the same rows three times: a sparse run that selects every neuron
    changes no row, and random selection runs at the density the sparse run measured."""
    import json

    from dejavu.bench.sparsity_zeroshot import run_task
    from dejavu.runtime.predictors import PredictorSet
    from dejavu.runtime.selection import PredictorSelector, SelectionConfig

    class Chars:
        bos_id = 2

        def encode(self, text: str, add_bos: bool = True) -> list[int]:
            return [4 + ord(ch) % 40 for ch in text]

    rows = [{"query": f"Question: what is {i}?\n", "choices": ["a cat", f"dog {i}"],
             "gold": i % 2} for i in range(12)]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_model()
    preds = PredictorSet.create(model, 4, 4)
    c = model.config

    def run(mlp_density):
        sel = PredictorSelector(preds, SelectionConfig(mlp_density=mlp_density,
                                                       head_density=1.0))
        seen = []

        def make_random(mlp, head):
            seen.append((mlp, head))
            return RandomSelector(c.ffn_dim, c.num_attention_heads, mlp, head, seed=0)

        out = run_task("piqa", model, Chars(), sel, make_random, limit=10,
                       eval_dir=tmp_path, batch_size=4, device="cpu")
        return out, seen

    full, seen = run(1.0)
    assert full["n"] == 10 and seen == [(1.0, 1.0)]
    assert full["sparse_acc"] == full["dense_acc"] and full["sparse_changed"] == 0
    assert full["sparse_diff_se"] == 0.0
    assert full["dense_se"] == pytest.approx(std_err(full["dense_acc"], 10))
    part, seen = run(0.25)
    assert seen[0][0] == pytest.approx(part["sparse_mlp_density"])
    assert part["random_mlp_density"] == pytest.approx(part["sparse_mlp_density"], abs=0.01)
