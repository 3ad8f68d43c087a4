"""bench/head_compare.py: document-level standard errors against a jackknife computed
directly, paired costs and model differences, and the sparsity target on measured
densities."""

from __future__ import annotations

import math
import random

import pytest

from dejavu.bench.head_compare import (
    bpb_se,
    cost,
    difference,
    markdown,
    meets_target,
    ratio_se,
    target_verdict,
)


def jackknife_se(num: list[float], den: list[float]) -> float:
    """The leave-one-document-out estimate of the same standard error (a reference that
    shares no code with the linearisation)."""
    n = len(num)
    loo = [(sum(num) - a) / (sum(den) - b) for a, b in zip(num, den, strict=True)]
    mean = sum(loo) / n
    return math.sqrt((n - 1) / n * sum((x - mean) ** 2 for x in loo))


def test_ratio_se_matches_the_jackknife():
    rng = random.Random(0)
    den = [rng.uniform(1000, 3000) for _ in range(400)]
    num = [b * rng.gauss(1.4, 0.1) for b in den]
    se = ratio_se(num, den)
    assert se == pytest.approx(jackknife_se(num, den), rel=0.02)
    # Four times the documents: about half the error.
    den4, num4 = den * 4, num * 4
    assert ratio_se(num4, den4) == pytest.approx(se / 2, rel=0.01)


def test_ratio_se_edge_cases():
    assert ratio_se([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == 0.0  # every document the same ratio
    assert math.isnan(ratio_se([1.0], [2.0]))
    with pytest.raises(ValueError, match="numerators"):
        ratio_se([1.0, 2.0], [1.0])


def row(config: str, nll: list[float], n_bytes: list[int], selector: str = "predictor",
        mlp: float | None = 1.0, head: float | None = 1.0, mlp_density: float = 1.0,
        head_density: float = 1.0) -> dict:
    docs = [{"nll": x, "tokens": b // 4, "bytes": b} for x, b in zip(nll, n_bytes,
                                                                      strict=True)]
    return {"config": config, "selector": selector, "mlp_target": mlp, "head_target": head,
            "bits_per_byte": sum(nll) / math.log(2) / sum(n_bytes),
            "tokens": sum(d["tokens"] for d in docs), "mlp_density": mlp_density,
            "head_density": head_density, "documents": docs}


BYTES = [4000, 6000, 5000, 8000]
DENSE_NLL = [2000.0, 3500.0, 2600.0, 4100.0]


def test_cost_is_paired():
    dense = row("dense", DENSE_NLL, BYTES, "dense")
    # Every document 2% worse: the cost is 2% with no spread, however much books differ.
    sparse = row("s", [x * 1.02 for x in DENSE_NLL], BYTES)
    value, se = cost(sparse, dense)
    assert value == pytest.approx(2.0) and se == pytest.approx(0.0, abs=1e-9)
    assert bpb_se(dense) > 0.01  # the books' own spread, which the pairing removes
    uneven = row("u", [x * f for x, f in zip(DENSE_NLL, (1.0, 1.04, 1.0, 1.04),
                                             strict=True)], BYTES)
    value, se = cost(uneven, dense)
    assert 1.0 < value < 3.0 and se > 0.3
    with pytest.raises(ValueError, match="not the same documents"):
        cost(row("x", DENSE_NLL, [1, 2, 3, 4]), dense)
    with pytest.raises(ValueError, match="per-document"):
        cost({**sparse, "documents": None}, dense)


def test_difference_between_models_in_bits_per_byte():
    a = row("dense", DENSE_NLL, BYTES, "dense")
    b = row("dense", [x + 0.01 * math.log(2) * n for x, n in zip(DENSE_NLL, BYTES,
                                                                  strict=True)], BYTES, "dense")
    value, se = difference(b, a)
    assert value == pytest.approx(0.01) and se == pytest.approx(0.0, abs=1e-9)


def study(head_cost: float, mlp_density: float) -> dict:
    dense = row("dense", DENSE_NLL, BYTES, "dense")
    rows = [dense, row("predictor mlp=trained-threshold heads=1", DENSE_NLL, BYTES, mlp=None,
                       mlp_density=mlp_density)]
    for skipped in (0.25, 0.5, 0.75):
        d = 1.0 - skipped
        worse = [x * (1 + head_cost * skipped / 50) for x in DENSE_NLL]
        rows += [row(f"oracle-norm mlp=1 heads={d:g}", worse, BYTES, "oracle-norm", head=d,
                     head_density=d),
                 row(f"predictor mlp=1 heads={d:g}", worse, BYTES, head=d, head_density=d),
                 row(f"predictor mlp=trained-threshold heads={d:g}", worse, BYTES, mlp=None,
                     head=d, mlp_density=mlp_density, head_density=d)]
    return {"variant": "m", "heads": 16, "head_dim": 32, "status": "ok", "rows": rows,
            "train": {"steps": 10, "tokens_seen": 1e6, "device": "cpu"}}


def test_target_on_measured_densities():
    cheap = study(head_cost=0.8, mlp_density=0.14)  # +0.8% at half the heads skipped
    dense = cheap["rows"][0]
    at_half = next(r for r in cheap["rows"] if r["config"].endswith("threshold heads=0.5"))
    assert meets_target(at_half, dense)
    assert target_verdict(cheap).startswith("met by `predictor mlp=trained-threshold "
                                            "heads=0.5`")
    assert target_verdict(study(head_cost=1.5, mlp_density=0.14)).startswith("not met: the "
                                                                             "cheapest")
    # 85% of the MLP skipped is measured, not the target: 0.151 misses it.
    assert target_verdict(study(head_cost=0.8, mlp_density=0.151)).startswith(
        "not met: no measured row")


def test_markdown_tables_every_curve_and_the_model_difference():
    a, b = study(0.8, 0.14), {**study(2.0, 0.14), "variant": "n"}
    text = markdown({"meta": {"hardware": "cpu", "date": "today",
                              "args": {"docs": 4, "heldout": "h.jsonl.xz", "chars": 100}},
                     "variants": [a, b, {"variant": "x", "status": "failed", "error": "E"}]})
    assert text.count("| m | oracle (MLP dense) |") == 1
    assert "| n | predictors @ MLP point | +1.00% ± 0.00 (h 0.75, m 0.140)" in text
    assert "- dense n - m on this slice: +0.0000 ± 0.0000" in text
    assert "| x | failed: E |" in text
