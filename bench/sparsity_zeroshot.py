"""Zero-shot accuracy dense vs sparse vs random selection, with the sampling error next to
every difference (the target: each zero-shot accuracy within 1 point of dense).

Per task, the same first ``limit`` rows are scored three times: dense; sparse with the
selector that ``dejavu.toml``'s [sparsity] section gives (the shipped default); and
uniformly random neurons at the MLP density the sparse run measured on that task (heads
as the sparse run had them). Rows are paired, so besides each accuracy's standard error
sqrt(p(1-p)/n) the table gives the paired standard error of each difference (the standard
deviation of the per-row difference over sqrt(n)), which is what says whether a gap of
one point is resolved by n rows.

    python -m dejavu.bench.sparsity_zeroshot --model models/M --out bench/sparsity \\
        --tasks piqa,copa --limit 200 [--limits copa=100,boolq=80]

What this module does not know: how tasks are scored (eval_tasks) or how selections are
made (runtime/selection.py).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ..tools.eval import DEFAULT_EVAL_DIR
from ..tools.eval_tasks import (
    ZERO_SHOT,
    build_requests,
    read_rows,
    row_correct,
    score_requests,
    task_file,
)


def std_err(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n rows."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def paired_std_err(a: list[bool], b: list[bool]) -> float:
    """Standard error of mean(b) - mean(a) over the same rows."""
    n = len(a)
    d = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return math.sqrt(var / n)


def parse_limits(text: str) -> dict[str, int]:
    """ "copa=100,boolq=80" -> {"copa": 100, "boolq": 80}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if not value.isdigit():
            raise SystemExit(f"--limits {part!r}: expected task=rows")
        out[name] = int(value)
    return out


def run_task(name: str, model, tok, sparse_selector, make_random, *, limit: int | None,
             eval_dir: str, batch_size: int, device: str) -> dict:
    """One task, three runs over the same rows."""
    from ..tools.eval_text import dense_logits_fn
    from ..tools.sparse_eval import density_metrics, sparse_logits_fn

    rows = read_rows(task_file(eval_dir, name), limit)
    groups, info = build_requests(name, rows, lambda t: tok.encode(t, add_bos=False),
                                  tok.bos_id)
    flat = [r for g in groups for r in g]

    def score(logits_fn) -> tuple[list[bool], float]:
        t0 = time.perf_counter()
        s = score_requests(logits_fn, flat, max_len=model.config.max_position_embeddings,
                           batch_size=batch_size, device=device)
        return row_correct(name, groups, info, s), time.perf_counter() - t0

    out: dict = {"task": name, "n": len(rows), "requests": len(flat),
                 "tokens": sum(len(r.context) + len(r.continuation) - 1 for r in flat)}
    runs = {}
    runs["dense"], out["dense_s"] = score(dense_logits_fn(model))
    fn, stats = sparse_logits_fn(model, sparse_selector)
    runs["sparse"], out["sparse_s"] = score(fn)
    dens = density_metrics(stats)
    out["sparse_mlp_density"], out["sparse_head_density"] = (dens["mlp_density"],
                                                             dens["head_density"])
    fn, stats = sparse_logits_fn(model, make_random(dens["mlp_density"],
                                                    dens["head_density"]))
    runs["random"], out["random_s"] = score(fn)
    out["random_mlp_density"] = density_metrics(stats)["mlp_density"]
    n = len(rows)
    for key, correct in runs.items():
        acc = sum(correct) / n
        out[f"{key}_acc"], out[f"{key}_se"] = acc, std_err(acc, n)
    for key in ("sparse", "random"):
        out[f"{key}_diff"] = out[f"{key}_acc"] - out["dense_acc"]
        out[f"{key}_diff_se"] = paired_std_err(runs["dense"], runs[key])
        out[f"{key}_changed"] = sum(a != b for a, b in zip(runs["dense"], runs[key],
                                                           strict=True))
    return out


def markdown(saved: dict) -> str:
    meta, rows = saved["meta"], saved["rows"]
    reruns = "".join(f" {r['tasks']} rescored {r['date']} on the first "
                     f"{r['limits'] or r['limit']} rows." for r in meta.get("reruns", []))
    pts = lambda x: f"{100 * x:+.1f}"  # noqa: E731 (accuracy points)
    lines = [
        f"Zero-shot accuracy on {meta['model']}, {meta['hardware']}, {meta['date']}: dense vs "
        f"sparse ({meta['sparse']}) vs uniformly random neurons at the MLP density the sparse "
        "run measured on the same rows. First n rows of each task (../shared/data/eval); "
        "`acc` as in eval_tasks (LAMBADA: greedy last word). "
        "se = sqrt(p(1-p)/n) of the dense accuracy; diff ± paired se = the difference in "
        "accuracy points with the standard error of the per-row difference; changed = rows "
        "whose correctness differs from dense; MLP density = measured over every scored "
        "position (batch padding included)." + reruns,
        "",
        "| task | n | dense acc (se) | sparse acc | sparse − dense (paired se) | changed | "
        "MLP density | random acc | random − dense (paired se) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['n']} | {r['dense_acc']:.3f} ({r['dense_se']:.3f}) | "
            f"{r['sparse_acc']:.3f} | {pts(r['sparse_diff'])} ± {100 * r['sparse_diff_se']:.1f} "
            f"| {r['sparse_changed']} | {r['sparse_mlp_density']:.3f} | {r['random_acc']:.3f} | "
            f"{pts(r['random_diff'])} ± {100 * r['random_diff_se']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import torch

    from ..runtime.build import build_model, resolve
    from ..runtime.checkpoint import resolve_model_dir
    from ..runtime.selection import RandomSelector
    from ..runtime.settings import load_settings
    from ..runtime.tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/opt-gutenberg-31m")
    p.add_argument("--config", default=None, help="dejavu.toml ([sparsity] = the sparse run)")
    p.add_argument("--tasks", default=",".join(ZERO_SHOT))
    p.add_argument("--limit", type=int, default=None, help="rows per task")
    p.add_argument("--limits", default="", help="per-task rows, e.g. copa=100,boolq=80")
    p.add_argument("--eval-dir", default=DEFAULT_EVAL_DIR)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="zeroshot", help="output stem (.json, .md)")
    p.add_argument("--replot", action="store_true", help="only redo the .md from the .json")
    p.add_argument("--merge", action="store_true",
                   help="replace these tasks' rows in an existing .json (e.g. more rows)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        saved = json.loads((out / f"{args.name}.json").read_text())
        (out / f"{args.name}.md").write_text(markdown(saved))
        return
    limits = parse_limits(args.limits)
    settings = resolve(load_settings(args.config, {"model.path": args.model,
                                                   "model.device": "cpu"}), sparse=True)
    model_dir = resolve_model_dir(settings.model.path)
    built = build_model(settings)
    model, sparse = built.model, built.selector
    tok = load_tokenizer(model_dir)
    c = model.config
    sp = settings.sparsity
    meta = {"model": model_dir.name, "hardware": "cpu", "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "sparse": f"dejavu.toml [sparsity]: mlp_recall={sp.mlp_recall}, "
                      f"mlp_density={sp.mlp_density}, head_density={sp.head_density}",
            "limit": args.limit, "limits": limits, "random_seed": 0}
    out.mkdir(parents=True, exist_ok=True)
    saved = {"meta": meta, "rows": []}
    if args.merge:
        saved = json.loads((out / f"{args.name}.json").read_text())
        saved["meta"].setdefault("reruns", []).append(
            {k: meta[k] for k in ("date", "sparse", "limit", "limits")} | {"tasks": args.tasks})
    for name in args.tasks.split(","):
        def make_random(mlp: float, head: float) -> RandomSelector:
            return RandomSelector(c.ffn_dim, c.num_attention_heads, mlp, head, seed=0)

        row = run_task(name, model, tok, sparse, make_random,
                       limit=limits.get(name, args.limit), eval_dir=args.eval_dir,
                       batch_size=args.batch_size, device="cpu")
        rows = saved["rows"]
        same = [i for i, r in enumerate(rows) if r["task"] == row["task"]]
        if same:
            rows[same[0]] = row
        else:
            rows.append(row)
        # Written after every task: a run cut short keeps what it measured.
        (out / f"{args.name}.json").write_text(json.dumps(saved, indent=1) + "\n")
        (out / f"{args.name}.md").write_text(markdown(saved))
        print(f"{name:<14} n={row['n']:<5} dense={row['dense_acc']:.3f} "
              f"sparse={row['sparse_acc']:.3f} random={row['random_acc']:.3f} "
              f"tokens={row['tokens']} s={row['dense_s']:.0f}/{row['sparse_s']:.0f}/"
              f"{row['random_s']:.0f}", flush=True)


if __name__ == "__main__":
    main()
