"""Quality vs density: dense, the trained predictors at a sweep of MLP and head densities,
and uniformly random selection at the same densities.

For every configuration it scores held-out text (bits per byte, sliding windows, the same
scorer as ``dejavu-run eval``) and, when a task scorer is given, zero-shot tasks, with the
measured densities next to each number. Writes sweep.json, sweep.md (table) and sweep.png
(bits per byte and accuracy vs density) into the output directory.

``--oracle-heads`` adds oracle head selections (runtime/selection.OracleHeadSelector: the
heads that matter most, chosen from the true outputs, MLP dense) to an existing sweep.json:
the bound that no head predictor can beat at that density.

    python -m dejavu.bench.sparsity_sweep --model models/M --data heldout.jsonl.xz \
        --out bench/sparsity [--docs 8 --chars 40000] [--device cuda]

What this module does not know: how the tasks are scored (``tasks`` is a callable), or how
the predictors were trained.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..runtime.selection import (
    AdaptiveOracleHeadSelector,
    OracleHeadSelector,
    PredictorSelector,
    RandomSelector,
    SelectionConfig,
)
from ..tools.eval import DEFAULT_EVAL_DIR
from ..tools.eval_text import TextScore, dense_logits_fn, score_documents
from ..tools.sparse_eval import density_metrics, sparse_logits_fn

# (mlp density, head density); None = the layer's trained operating point.
MLP_SWEEP = (0.5, 0.3, 0.2, 0.15, 0.1, 0.05)
HEAD_SWEEP = (0.875, 0.75, 0.5, 0.25)
JOINT = ((0.2, 0.5), (0.15, 0.5), (0.1, 0.5))
ORACLE_HEADS = (0.875, 0.75, 0.625, 0.5)


@dataclass(frozen=True)
class Point:
    selector: str  # "dense" | "predictor" | "random" | "oracle-norm|best|adaptive"
    mlp: float | None
    head: float | None
    mlp_select: str | None = None  # trained MLP point: "topk" or "threshold"
    recall: float | None = None  # threshold calibrated for this recall (None: the file's)

    @property
    def name(self) -> str:
        if self.selector == "dense":
            return "dense"
        fmt = lambda v: "trained" if v is None else f"{v:g}"  # noqa: E731
        mlp = fmt(self.mlp) + (f"-{self.mlp_select}" if self.mlp_select else "")
        mlp += f"@{self.recall:g}" if self.recall is not None else ""
        return f"{self.selector} mlp={mlp} heads={fmt(self.head)}"


# Where zero-shot tasks are scored too (they cost more than the text).
TASK_POINTS = ("dense", "predictor mlp=trained-threshold heads=0.5",
               "predictor mlp=trained-threshold@0.9 heads=0.5", "predictor mlp=0.2 heads=0.5",
               "random mlp=0.2 heads=0.5")


def cpu_points() -> list[Point]:
    """A reduced grid for a slow CPU: the trained MLP threshold at several recalls, heads
    alone, the joint target, and random selection at matched densities."""
    thr = lambda r, h: Point("predictor", None, h, "threshold", r)  # noqa: E731
    return [Point("dense", 1.0, 1.0), thr(0.95, 1.0), thr(0.955, 1.0), thr(0.96, 1.0),
            thr(0.9, 1.0), thr(0.85, 1.0), thr(0.975, 1.0), Point("random", 0.15, 1.0),
            Point("predictor", 0.2, 1.0), Point("random", 0.2, 1.0),
            Point("predictor", 1.0, 0.875), Point("predictor", 1.0, 0.75),
            Point("predictor", 1.0, 0.5), Point("random", 1.0, 0.75),
            Point("random", 1.0, 0.5), thr(0.95, 0.75), thr(0.95, 0.5),
            Point("random", 0.2, 0.5)]


CPU_TASK_POINTS = ("dense", "predictor mlp=trained-threshold@0.95 heads=1",
                   "predictor mlp=trained-threshold@0.9 heads=1",
                   "predictor mlp=trained-threshold@0.95 heads=0.75",
                   "predictor mlp=trained-threshold@0.95 heads=0.5",
                   "random mlp=0.2 heads=0.5")


def oracle_points() -> list[Point]:
    """Dense (to check the text is the sweep's), both oracles at each head density, and the
    predictor and random selection where the CPU grid has no point at that density."""
    pts = [Point("dense", 1.0, 1.0)]
    pts += [Point(f"oracle-{m}", 1.0, h) for m in ("norm", "best") for h in ORACLE_HEADS]
    pts += [Point("oracle-adaptive", 1.0, h) for h in (0.75, 0.5)]
    return pts + [Point("predictor", 1.0, 0.625), Point("random", 1.0, 0.875),
                  Point("random", 1.0, 0.625)]


def sweep_points() -> list[Point]:
    pts = [Point("dense", 1.0, 1.0), Point("predictor", None, 0.5, "topk"),
           Point("predictor", None, 0.5, "threshold"), Point("predictor", None, 1.0, "threshold")]
    for recall in (0.85, 0.9, 0.95, 0.975):
        pts += [Point("predictor", None, h, "threshold", recall) for h in (1.0, 0.5)]
    for sel in ("predictor", "random"):
        pts += [Point(sel, m, 1.0) for m in MLP_SWEEP]
        pts += [Point(sel, 1.0, h) for h in HEAD_SWEEP]
        pts += [Point(sel, m, h) for m, h in JOINT]
    return pts


TaskFn = Callable[[Callable], dict[str, float]]  # logits_fn -> {"piqa_acc": ...}


def run_sweep(model, tok, predictors, documents: list[str], *, tasks: TaskFn | None = None,
              task_points: tuple[str, ...] | None = None, checkpoint=None,
              points: list[Point] | None = None, window: int = 1024, stride: int = 512,
              batch_size: int = 8, device: str = "cpu", per_document: bool = False,
              log=print) -> list[dict]:
    """One row per point. ``per_document``: each document is scored on its own (the same
    windows, so the same total) and the row keeps its ``documents``: [{nll, tokens, bytes}],
    for standard errors with documents as the independent units."""
    rows = []
    for pt in points or sweep_points():
        t0 = time.perf_counter()
        selector = make_selector(pt, predictors, model)
        stats = None
        if selector is None:
            logits_fn = dense_logits_fn(model)
        else:
            logits_fn, stats = sparse_logits_fn(model, selector)
        parts = score_text(logits_fn, tok, documents, per_document, window=window,
                           stride=stride, batch_size=batch_size, device=device)
        score = TextScore(nll=sum(p.nll for p in parts), tokens=sum(p.tokens for p in parts),
                          bytes=sum(p.bytes for p in parts))
        row = {"config": pt.name, "selector": pt.selector, "mlp_target": pt.mlp,
               "head_target": pt.head, "bits_per_byte": score.bits_per_byte,
               "perplexity": score.perplexity, "tokens": score.tokens}
        if per_document:
            row["documents"] = [{"nll": p.nll, "tokens": p.tokens, "bytes": p.bytes}
                                for p in parts]
        row.update(density_metrics(stats) if stats is not None
                   else {"mlp_density": 1.0, "head_density": 1.0})
        if tasks is not None and (task_points is None or pt.name in task_points):
            # A fresh selector: the text's densities stay the text's.
            selector = make_selector(pt, predictors, model)
            task_fn = (dense_logits_fn(model) if selector is None
                       else sparse_logits_fn(model, selector)[0])
            row.update(tasks(task_fn))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if checkpoint is not None:  # a run cut short keeps what it measured
            checkpoint(rows)
        log(f"{pt.name:<36} bpb={row['bits_per_byte']:.4f} mlp={row['mlp_density']:.3f} "
            f"heads={row['head_density']:.3f} ({row['seconds']:.0f} s)")
    return rows


def score_text(logits_fn, tok, documents: list[str], per_document: bool,
               **scoring) -> list[TextScore]:
    """The documents' score as one part, or one part per document."""
    encode = lambda s: tok.encode(s, add_bos=False)  # noqa: E731
    groups = [[d] for d in documents] if per_document else [documents]
    return [score_documents(logits_fn, encode, g, bos_id=tok.bos_id, **scoring)
            for g in groups]


def make_selector(pt: Point, predictors, model):
    """None for dense; a density of 1 keeps that block dense (no selection at all)."""
    c = model.config
    if pt.selector == "dense":
        return None
    if pt.selector.startswith("oracle-"):
        if pt.mlp != 1.0 or pt.head is None:
            raise ValueError(f"{pt.name}: the head oracle runs with the MLP dense")
        if pt.selector == "oracle-adaptive":
            return AdaptiveOracleHeadSelector(model, pt.head)
        return OracleHeadSelector(model, pt.head, pt.selector.removeprefix("oracle-"))
    if pt.selector == "random":
        return RandomSelector(c.ffn_dim, c.num_attention_heads, pt.mlp, pt.head, seed=0)
    return PredictorSelector(predictors, SelectionConfig(mlp_density=pt.mlp,
                                                         head_density=pt.head,
                                                         mlp_select=pt.mlp_select,
                                                         mlp_recall=pt.recall))


def markdown(rows: list[dict], header: str) -> str:
    dense = next(r for r in rows if r["selector"] == "dense")
    extra = sorted({k for r in rows for k in r if k.endswith("_acc")})
    lines = [header, "",
             "| config | MLP density | head density | bits/byte | vs dense | "
             + " | ".join(extra) + (" |" if extra else "|"),
             "|---|---|---|---|---|" + "---|" * len(extra)]
    for r in rows:
        rel = (r["bits_per_byte"] / dense["bits_per_byte"] - 1) * 100
        accs = "".join(f" {r[k]:.3f} |" if k in r else " |" for k in extra)
        lines.append(f"| {r['config']} | {r['mlp_density']:.3f} | {r['head_density']:.3f} | "
                     f"{r['bits_per_byte']:.4f} | {rel:+.2f}% |{accs}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, zeroshot: list[dict] | None = None) -> None:
    """``zeroshot``: rows of zeroshot.json (bench/sparsity_zeroshot.py); when given, the
    third panel shows them (all tasks, with standard errors) instead of the sweep rows'
    accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["selector"] == "dense")
    tasks = sorted({k for r in rows for k in r if k.endswith("_acc")}) or bool(zeroshot)
    fig, axes = plt.subplots(1, 3 if tasks else 2, figsize=(16 if tasks else 11, 4.4))
    for ax, key, fixed, label in ((axes[0], "mlp", "head_target", "MLP density (heads dense)"),
                                  (axes[1], "head", "mlp_target", "head density (MLP dense)")):
        for sel, style in (("predictor", "o-"), ("random", "s--"), ("oracle-norm", "v-"),
                           ("oracle-best", "^-"), ("oracle-adaptive", "P:")):
            pts = sorted((r[f"{key}_density"], r["bits_per_byte"]) for r in rows
                         if r["selector"] == sel and r[fixed] == 1.0
                         and r[f"{key}_target"] not in (None, 1.0))
            if pts:
                name = f"{sel} (top-k)" if sel in ("predictor", "random") else sel
                ax.plot(*zip(*pts, strict=True), style, label=name)
        if key == "mlp":  # calibrated thresholds: each token keeps what it needs
            pts = sorted((r["mlp_density"], r["bits_per_byte"]) for r in rows
                         if r["selector"] == "predictor" and r["mlp_target"] is None
                         and r["head_target"] == 1.0)
            if pts:
                ax.plot(*zip(*pts, strict=True), "D-", label="predictor (threshold)")
        ax.axhline(dense["bits_per_byte"], color="k", lw=0.8, label="dense")
        ax.axhline(dense["bits_per_byte"] * 1.01, color="k", lw=0.8, ls=":", label="dense +1%")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel("held-out bits per byte (log scale)")
        ax.set_yscale("log")  # random selection is off by 2x; the predictors by ~1%
    # Joint points (both blocks sparse), on the MLP axis, labelled with their head density.
    for r in rows:
        if r["selector"] == "dense" or r["head_target"] == 1.0 or r["mlp_target"] == 1.0:
            continue
        marker = "r^" if r["selector"] == "predictor" else "kx"
        axes[0].plot(r["mlp_density"], r["bits_per_byte"], marker)
        axes[0].annotate(f"heads {r['head_density']:.2f}", (r["mlp_density"],
                         r["bits_per_byte"]), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    axes[0].plot([], [], "r^", label="predictor, MLP + heads")
    axes[0].plot([], [], "kx", label="random, MLP + heads")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    if zeroshot:
        width = 0.27
        for i, run in enumerate(("dense", "sparse", "random")):
            xs = [j + i * width for j in range(len(zeroshot))]
            axes[2].bar(xs, [z[f"{run}_acc"] for z in zeroshot], width,
                        yerr=[z[f"{run}_se"] for z in zeroshot], capsize=2, label=run)
        axes[2].set_xticks([j + width for j in range(len(zeroshot))])
        axes[2].set_xticklabels([f"{z['task']}\nn={z['n']}" for z in zeroshot], fontsize=7,
                                rotation=30)
        axes[2].set_ylabel("zero-shot accuracy (± se)")
        axes[2].set_title("dense vs shipped sparse default vs random at its MLP density",
                          fontsize=8)
        axes[2].legend(fontsize=7)
    elif tasks:
        scored = [r for r in rows if all(t in r for t in tasks)]
        width = 0.8 / max(len(scored), 1)
        for i, r in enumerate(scored):
            xs = [j + i * width for j in range(len(tasks))]
            ax_label = (f"{r['config']} (mlp {r['mlp_density']:.2f}, "
                        f"heads {r['head_density']:.2f})")
            axes[2].bar(xs, [r[t] for t in tasks], width, label=ax_label)
        axes[2].set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
        axes[2].set_xticklabels([t.removesuffix("_acc") for t in tasks], rotation=30,
                                fontsize=8)
        axes[2].set_ylabel("zero-shot accuracy")
        axes[2].legend(fontsize=6)
    fig.suptitle("Quality vs measured density: trained predictors vs random selection "
                 "(and oracle heads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    from ..runtime.checkpoint import load_model, resolve_model_dir
    from ..runtime.predictors import PredictorSet, find_predictors
    from ..runtime.tokenizer import load_tokenizer
    from ..tools.collect_labels import iter_texts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--predictors", default=None)
    p.add_argument("--data", default=None, help="held-out text (.txt, .jsonl, .jsonl.xz)")
    p.add_argument("--docs", type=int, default=8, help="documents scored")
    p.add_argument("--chars", type=int, default=40_000, help="characters per document")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--grid", default="full", choices=("full", "cpu", "quick"),
                   help="which points: full (GPU), cpu (a reduced grid), quick")
    p.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated (eval_tasks)")
    p.add_argument("--limit", type=int, default=None, help="rows per zero-shot task")
    p.add_argument("--eval-dir", default=DEFAULT_EVAL_DIR)
    p.add_argument("--only", default="", help="run only these points (names, '|'-separated)")
    p.add_argument("--replot", action="store_true", help="only redo sweep.md/png from --out")
    p.add_argument("--oracle-heads", action="store_true",
                   help="run dense + oracle head points and merge them into --out/sweep.json")
    args = p.parse_args(argv)
    if args.replot:
        write_outputs(Path(args.out))
        return
    model_dir = resolve_model_dir(args.model)
    model = load_model(model_dir, device=args.device)
    tok = load_tokenizer(model_dir)
    preds_path = args.predictors or find_predictors(model_dir)
    predictors = PredictorSet.load(preds_path, model, device=args.device)
    docs = []
    for text in iter_texts(args.data):
        docs.append(text[len(text) // 3: len(text) // 3 + args.chars])
        if len(docs) >= args.docs:
            break
    window = min(args.window, model.config.max_position_embeddings)
    tasks = None
    if args.tasks:
        from ..tools.eval_tasks import evaluate_task

        def tasks(logits_fn) -> dict[str, float]:
            out = {}
            for name in args.tasks.split(","):
                r = evaluate_task(name, logits_fn, lambda t: tok.encode(t, add_bos=False),
                                  bos_id=tok.bos_id, eval_dir=args.eval_dir,
                                  max_len=model.config.max_position_embeddings, batch_size=16,
                                  device=args.device, limit=args.limit)
                out[f"{r['task']}_acc"] = r["metrics"]["acc"]
            return out

    points, task_points = sweep_points(), TASK_POINTS
    if args.grid == "quick":
        points = [Point("dense", 1.0, 1.0), Point("predictor", None, 0.5, "threshold"),
                  Point("predictor", 0.2, 0.5), Point("random", 0.2, 0.5)]
        task_points = None
    elif args.grid == "cpu":
        points, task_points = cpu_points(), CPU_TASK_POINTS
    elif args.oracle_heads:
        points, task_points, tasks = oracle_points(), None, None
    if args.only:
        wanted = args.only.split("|")
        points = [pt for pt in points if pt.name in wanted]
        if len(points) != len(wanted):
            raise SystemExit(f"--only: unknown point among {wanted}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_dir.name, "data": Path(args.data).name, "docs": len(docs),
            "tasks": args.tasks, "task_limit": args.limit,
            "chars_per_doc": args.chars, "device": args.device, "window": window,
            "hardware": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    previous = None
    if args.oracle_heads:
        previous = json.loads((out / "sweep.json").read_text())
        previous["meta"]["added"] = (f"Oracle head rows (MLP dense) and heads 0.625/0.875 "
                                     f"points added {meta['date']} (same text: the dense row "
                                     "re-measured equal); all eight zero-shot tasks: "
                                     "zeroshot.md")

    def checkpoint(rows: list[dict]) -> None:
        saved = {"meta": meta, "rows": rows}
        if previous is not None:
            saved = merge_rows(previous, rows)
        (out / "sweep.json").write_text(json.dumps(saved, indent=1) + "\n")

    run_sweep(model, tok, predictors, docs, tasks=tasks, points=points, window=window,
              stride=min(args.stride, window), device=args.device, task_points=task_points,
              checkpoint=checkpoint)
    write_outputs(out)


def merge_rows(previous: dict, rows: list[dict]) -> dict:
    """``previous`` (a saved sweep) with ``rows`` replacing rows of the same config or added
    at the end. The new rows must score the same text: same token count and the same dense
    bits per byte (the "vs dense" column compares them with the saved dense row)."""
    old = {r["config"]: r for r in previous["rows"]}
    for r in rows:
        ref = old.get(r["config"])
        if r["tokens"] != previous["rows"][0]["tokens"]:
            raise SystemExit(f"{r['config']}: {r['tokens']} tokens scored, the saved sweep "
                             f"{previous['rows'][0]['tokens']}: not the same text")
        if r["selector"] == "dense" and ref is not None and abs(
                r["bits_per_byte"] - ref["bits_per_byte"]) > 1e-6:
            raise SystemExit(f"dense bits per byte {r['bits_per_byte']:.6f} differs from the "
                             f"saved {ref['bits_per_byte']:.6f}: not the same text or model")
    new = {r["config"]: r for r in rows}
    # A re-measured row keeps what only the saved one has (zero-shot accuracies of a
    # separate run).
    merged = [{**r, **new.get(r["config"], {})} for r in previous["rows"]]
    merged += [r for r in rows if r["config"] not in old]
    return {"meta": previous["meta"], "rows": merged}


def write_outputs(out: Path) -> None:
    """sweep.md and sweep.png from sweep.json (the plot needs matplotlib, the dev extra)."""
    saved = json.loads((out / "sweep.json").read_text())
    meta, rows = saved["meta"], saved["rows"]
    header = (f"Sparsity sweep on {meta['model']}: {meta['docs']} held-out documents of "
              f"{meta['data']} ({rows[0]['tokens']} tokens), {meta['hardware']}, "
              f"{meta['date']}.")
    for key in ("note", "added"):
        if meta.get(key):
            header += " " + meta[key] + "."
    (out / "sweep.md").write_text(markdown(rows, header))
    try:
        zs = out / "zeroshot.json"
        plot(rows, out / "sweep.png",
             json.loads(zs.read_text())["rows"] if zs.is_file() else None)
    except ImportError:
        print("matplotlib is not installed: no sweep.png (rerun with --replot)")


if __name__ == "__main__":
    main()
