"""Existing checkpoints side by side on one held-out slice: dense bits per byte and the head
curves with standard errors, and the shipped-default target checked on measured densities.

The rows come from bench/sparsity_sweep.run_sweep with ``per_document=True``: each row
keeps every document's summed NLL, tokens and bytes. Documents are the independent units
(tokens inside a book are not), so a standard error here is a cluster (document-level)
standard error of a ratio of sums, by linearisation: for R = sum(a_i) / sum(b_i) over n
documents, se(R) = sqrt(n / (n - 1) * sum((a_i - R b_i)^2)) / sum(b_i). A cost (sparse vs
dense of one model) and a model difference (two models on the same text) are paired: both
sides score the same documents, so the spread between books cancels.

What this module does not know: how the rows were scored or the heads selected
(bench/sparsity_sweep.py, bench/head_variants.py).
"""

from __future__ import annotations

import math

SKIPPED = (0.25, 0.5, 0.75)  # shares of the heads skipped, as bench/head_variants.py
CURVES = (("oracle-norm", True, "oracle (MLP dense)"),
          ("predictor", True, "predictors (MLP dense)"),
          ("predictor", False, "predictors @ MLP point"))
# The shipped-default target on measured densities.
TARGET_HEADS_SKIPPED, TARGET_MLP_SKIPPED, TARGET_COST = 0.5, 0.85, 1.0  # cost in percent
TARGET_DENSE_BPB = 1.350  # the shipped model's held-out bits per byte (trainer, full split)
EPS = 1e-6


def ratio_se(num: list[float], den: list[float]) -> float:
    """Document-level standard error of sum(num) / sum(den) (nan for fewer than 2)."""
    n = len(num)
    if n != len(den):
        raise ValueError(f"{n} numerators, {len(den)} denominators")
    if n < 2:
        return math.nan
    r = sum(num) / sum(den)
    spread = sum((a - r * b) ** 2 for a, b in zip(num, den, strict=True))
    return math.sqrt(n / (n - 1) * spread) / sum(den)


def documents(row: dict) -> list[dict]:
    docs = row.get("documents")
    if not docs:
        raise ValueError(f"row {row['config']!r} has no per-document scores "
                         "(run_sweep(..., per_document=True))")
    return docs


def bpb_se(row: dict) -> float:
    """Standard error of a row's bits per byte."""
    docs = documents(row)
    return ratio_se([d["nll"] / math.log(2) for d in docs], [d["bytes"] for d in docs])


def same_text(a: list[dict], b: list[dict], what: str) -> None:
    if [d["bytes"] for d in a] != [d["bytes"] for d in b]:
        raise ValueError(f"{what}: not the same documents (bytes per document differ)")


def cost(row: dict, dense: dict) -> tuple[float, float]:
    """Bits per byte of ``row`` vs ``dense`` (same model, same text) in percent, and its
    paired standard error."""
    s, d = documents(row), documents(dense)
    same_text(s, d, row["config"])
    value = (sum(x["nll"] for x in s) / sum(x["nll"] for x in d) - 1) * 100
    return value, ratio_se([x["nll"] for x in s], [x["nll"] for x in d]) * 100


def difference(a: dict, b: dict) -> tuple[float, float]:
    """Bits per byte of ``a`` minus ``b`` (two models' rows on the same text), paired
    standard error."""
    da, db = documents(a), documents(b)
    same_text(da, db, f"{a['config']} vs {b['config']}")
    diff = [(x["nll"] - y["nll"]) / math.log(2) for x, y in zip(da, db, strict=True)]
    n_bytes = [x["bytes"] for x in da]
    return sum(diff) / sum(n_bytes), ratio_se(diff, n_bytes)


def dense_row(rec: dict) -> dict:
    return next(r for r in rec["rows"] if r["selector"] == "dense")


def curve_row(rec: dict, selector: str, mlp_dense: bool, skipped: float) -> dict | None:
    """The row of one curve at one share of heads skipped (targets, not measurements)."""
    for r in rec["rows"]:
        if (r["selector"] == selector and r["head_target"] is not None
                and abs(1.0 - r["head_target"] - skipped) < EPS
                and (r["mlp_target"] == 1.0) == mlp_dense):
            return r
    return None


def mlp_point(rec: dict) -> dict | None:
    """The MLP operating point with every head."""
    return next((r for r in rec["rows"] if r["selector"] == "predictor"
                 and r["mlp_target"] is None and r["head_target"] == 1.0), None)


def sparse_enough(row: dict) -> bool:
    """At least half the heads and 85% of the MLP neurons skipped (measured densities)."""
    return (row["head_density"] <= 1.0 - TARGET_HEADS_SKIPPED + EPS
            and row["mlp_density"] <= 1.0 - TARGET_MLP_SKIPPED + EPS)


def meets_target(row: dict, dense: dict) -> bool:
    """``sparse_enough`` within 1% bits per byte of dense."""
    return sparse_enough(row) and cost(row, dense)[0] <= TARGET_COST


def target_verdict(rec: dict) -> str:
    """Whether any measured row of the model meets the sparsity target, and which."""
    dense = dense_row(rec)
    sparse = [r for r in rec["rows"] if r["selector"] == "predictor" and sparse_enough(r)]
    hits = [r for r in sparse if meets_target(r, dense)]
    if hits:
        best = max(hits, key=lambda r: 1.0 - r["head_density"])
        return f"met by `{best['config']}`: {describe(best, dense)}"
    if sparse:
        best = min(sparse, key=lambda r: cost(r, dense)[0])
        return (f"not met: the cheapest row at both densities, `{best['config']}`, costs "
                f"{describe(best, dense)}")
    return "not met: no measured row reaches both densities"


def describe(row: dict, dense: dict) -> str:
    value, se = cost(row, dense)
    return (f"{value:+.2f}% ± {se:.2f} (heads {row['head_density']:.3f}, "
            f"MLP {row['mlp_density']:.3f})")


def cell(row: dict | None, dense: dict) -> str:
    if row is None:
        return ""
    value, se = cost(row, dense)
    return (f"{value:+.2f}% ± {se:.2f} (h {row['head_density']:.2f}, "
            f"m {row['mlp_density']:.3f})")


def markdown(study: dict) -> str:
    m = study["meta"]
    ok = [r for r in study["variants"] if r.get("status") == "ok"]
    dense0 = dense_row(ok[0]) if ok else None
    lines = [f"# Existing checkpoints, head curves: {m['hardware']}, {m['date']}", "",
             f"Held-out slice: the first {m['args']['docs']} documents of "
             f"`{m['args']['heldout']}`, {m['args']['chars']:,} characters of each from a "
             f"third of the way in" + (f" ({dense0['tokens']:,} tokens of the first model, "
                                       f"{sum(d['bytes'] for d in documents(dense0)):,} B)"
                                       if dense0 else "") + ". Each model runs with its own "
             "`predictors/`. ± is one standard error with documents as the units (costs and "
             "differences paired on the same documents). Costs: bits per byte vs the same "
             "model's dense score; h / m = measured head / MLP density.", "",
             "| model | heads x dim | training | held-out bpb ± se (tokens) | WikiText-2 bpb "
             "| MLP point: density, cost |",
             "|---|---|---|---|---|---|"]
    for rec in study["variants"]:
        if rec.get("status") != "ok":
            lines.append(f"| {rec['variant']} | {rec.get('status')}: {rec.get('error')} |")
            continue
        dense, point, t = dense_row(rec), mlp_point(rec), rec.get("train", {})
        lines.append(
            f"| {rec['variant']} | {rec['heads']} x {rec['head_dim']} | "
            f"{t.get('steps', '?')} steps, {t.get('tokens_seen', 0) / 1e6:.1f}M tokens, "
            f"{t.get('device', '?')} | {dense['bits_per_byte']:.4f} ± {bpb_se(dense):.4f} "
            f"({dense['tokens']:,}) | "
            + (f"{rec['wikitext2_bpb']:.4f}" if "wikitext2_bpb" in rec else "") + " | "
            + (f"{point['mlp_density']:.3f}, " + "{:+.2f}% ± {:.2f}".format(*cost(point, dense))
               if point else "") + " |")
    lines += ["", "| model | curve | " + " | ".join(f"{s:.0%} of heads skipped"
                                                   for s in SKIPPED) + " |",
              "|---|---|" + "---|" * len(SKIPPED)]
    for rec in ok:
        dense = dense_row(rec)
        for selector, mlp_dense, label in CURVES:
            cells = [cell(curve_row(rec, selector, mlp_dense, s), dense) for s in SKIPPED]
            lines.append(f"| {rec['variant']} | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Target (at least {TARGET_HEADS_SKIPPED:.0%} of heads and "
              f"{TARGET_MLP_SKIPPED:.0%} of MLP neurons skipped, measured, within "
              f"{TARGET_COST:g}% bits per byte of dense; dense held-out bits per byte no worse "
              f"than {TARGET_DENSE_BPB}):", ""]
    lines += [f"- {rec['variant']}: sparsity {target_verdict(rec)}" for rec in ok]
    for rec in ok[1:]:
        value, se = difference(dense_row(rec), dense0)
        lines.append(f"- dense {rec['variant']} - {ok[0]['variant']} on this slice: "
                     f"{value:+.4f} ± {se:.4f} bits per byte "
                     f"({value / dense0['bits_per_byte'] * 100:+.2f}%)")
    return "\n".join(lines) + "\n"
