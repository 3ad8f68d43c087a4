"""Head-sparse model variants under one short training budget: which shape and training
makes attention heads skippable?

For each variant in turn (``h16``: 16 heads of hidden/16; ``h16-drop0.5``: random head
dropout of half the heads on ``-t`` (default 0.5) of the tokens, ``-rescale`` to rescale
the kept ones; ``h16-gate0.5``: a learned per-token gate keeping half the heads, on the
same share of tokens; see tools/head_training.py) it

1. trains the model with tools/train_model.py under ``--time-budget-s`` (training, saving
   and evaluation; the corpus is tokenised once for every variant);
2. scores dense bits per byte on a fixed slice of the held-out text and on WikiText-2;
3. trains MLP and head predictors quickly (tools/train_predictors.py) on the training
   text and scores, on the same slice, the oracle head curve (MLP dense), the predictors'
   head curve (MLP dense and at the MLP operating point: threshold selection at
   ``--mlp-recall``) at 25/50/75% of the heads skipped, as bench/sparsity_sweep.py does.

After every variant the results are written (head_variants.json, .md, .png in ``--out``):
a variant that fails is recorded with its error and the next one runs, and a run killed
midway keeps what it finished. Checkpoints go to ``--work`` (not ``--out``: 60 MiB each).

    python -m dejavu.bench.head_variants --corpus train.jsonl.xz --heldout heldout.jsonl.xz \
        --wikitext wikitext2_test.txt --out OUT --time-budget-s 120 \
        --variants h8,h16,h16-drop0.5,h16-gate0.5 --device cuda

``--model DIR`` (repeatable) trains nothing: it scores existing checkpoints, each with its
own ``predictors/`` at the file's MLP operating point, on the same slice and writes
head_models.json, .md (bench/head_compare.py: standard errors, the target) and .png.

    python -m dejavu.bench.head_variants --model models/opt-gutenberg-31m --model OTHER \
        --heldout heldout.jsonl.xz --docs 16 --chars 24000 --out OUT

What this module does not know: how heads are skipped at inference (runtime/sparse.py) or
how the predictors are fitted (tools/train_predictors.py).
"""

from __future__ import annotations

import argparse
import json
import re
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..tools.head_training import HeadPolicy
from . import head_compare
from .head_compare import SKIPPED  # shares of the heads skipped: head densities 0.75 .. 0.25
from .sparsity_sweep import Point, run_sweep

FIT_RECALL = 0.9  # the MLP operating point of the predictors this study fits
BASELINE = "h8"  # the shipped architecture: 8 heads of 64
_VARIANT = re.compile(r"h(\d+)(?:-(drop|gate)([0-9.]+))?(?:-t([0-9.]+))?(-rescale)?$")


@dataclass(frozen=True)
class Variant:
    name: str
    heads: int
    policy: HeadPolicy


def parse_variant(spec: str) -> Variant:
    """``h<heads>[-drop<f>|-gate<f>][-t<tokens>][-rescale]``, e.g. ``h16-drop0.5-t1``."""
    m = _VARIANT.match(spec)
    if m is None:
        raise ValueError(f"variant {spec!r}: expected h<heads>[-drop<f>|-gate<f>][-t<tokens>]"
                         "[-rescale], e.g. h16 or h16-drop0.5-t0.5")
    heads, mode, fraction, tokens, rescale = m.groups()
    if mode is None and (tokens or rescale):
        raise ValueError(f"variant {spec!r}: -t and -rescale need -drop or -gate")
    policy = HeadPolicy(mode or "none", float(fraction or 0.5), float(tokens or 0.5),
                        bool(rescale))
    return Variant(spec, int(heads), policy)


def train_config(args, variant: Variant, out: Path):
    """The trainer's config for one variant: the study's settings, this variant's heads."""
    from ..tools.train_model import TrainConfig

    base = dict(corpus=args.corpus, tokenizer=args.tokenizer, out=str(out),
                device=args.device, time_budget=args.time_budget_s, reserve=args.reserve_s,
                heads=variant.heads, head_policy=variant.policy.mode,
                head_fraction=variant.policy.fraction, head_tokens=variant.policy.tokens,
                head_rescale=variant.policy.rescale)
    base.update(overrides(args.set))
    if base.get("steps") is not None:
        base["time_budget"] = None
    return TrainConfig(**base)


def overrides(pairs: list[str]) -> dict:
    """``--set key=value`` pairs for the trainer, typed by its config's fields."""
    from ..tools.train_model import TrainConfig

    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"--set {pair}: unknown trainer setting {key!r}")
        kind = types[key]
        if kind == "bool":
            out[key] = value.lower() in ("1", "true", "yes")
        elif kind.startswith("int"):
            out[key] = int(value)
        elif kind.startswith("float"):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def heldout_slice(path: str, docs: int, chars: int) -> list[str]:
    """The first ``docs`` documents, ``chars`` characters of each from a third of the way
    in (past front matter), as bench/sparsity_sweep.py slices them."""
    from ..tools.collect_labels import iter_texts

    out = []
    for text in iter_texts(path):
        out.append(text[len(text) // 3: len(text) // 3 + chars])
        if len(out) >= docs:
            break
    return out


def sweep_points(mlp_recall: float) -> list[Point]:
    """Dense, the MLP operating point (heads dense), then per head density the oracle (MLP
    dense), the predictor (MLP dense) and the predictor at the MLP operating point."""
    pts = [Point("dense", 1.0, 1.0), Point("predictor", None, 1.0, "threshold", mlp_recall)]
    for skipped in SKIPPED:
        d = 1.0 - skipped
        pts += [Point("oracle-norm", 1.0, d), Point("predictor", 1.0, d),
                Point("predictor", None, d, "threshold", mlp_recall)]
    return pts


def fit_predictors(model, tok, args, work: Path):
    """MLP and head predictors on calibration windows of the training text; returns the
    loaded PredictorSet and the report's means."""
    from ..runtime.predictors import PredictorSet
    from ..tools.collect_labels import calibration_windows, iter_texts
    from ..tools.train_predictors import TrainConfig, train_predictors, write_outputs

    window = model.config.max_position_embeddings
    cfg = TrainConfig(tokens=args.pred_tokens, window=window, epochs=args.pred_epochs,
                      batch_size=args.pred_batch, lr=args.pred_lr, mlp_select="threshold",
                      mlp_recall=args.mlp_recall)
    windows, docs = calibration_windows(iter_texts(args.corpus),
                                        lambda s: tok.encode(s, add_bos=False),
                                        window=window, tokens=cfg.tokens, per_doc=cfg.per_doc)
    preds, report, freq = train_predictors(model, windows, docs, cfg,
                                           device=torch.device(args.device), log=lambda m: None)
    write_outputs(work, preds, freq, report, work.parent.name)
    return PredictorSet.load(work, model, device=args.device), report["mean"]


def load_predictors(model_dir: Path, model, device: str):
    """A checkpoint's own predictors and their report's means (empty without a report)."""
    from ..runtime.predictors import PredictorSet, find_predictors

    path = find_predictors(model_dir)
    if path is None:
        raise FileNotFoundError(f"{model_dir}: no predictors/ beside the model (train them "
                                "with `dejavu-run train-predictors`)")
    report = Path(path) / "report.json" if Path(path).is_dir() else Path(path).with_name(
        "report.json")
    mean = json.loads(report.read_text())["mean"] if report.is_file() else {}
    return PredictorSet.load(path, model, device=device), mean


def evaluate_variant(model_dir: Path, args, log, fit: bool = True) -> dict:
    """Dense bits per byte (held-out slice, WikiText-2) and the head curves, with the
    predictors fitted here (``fit``) or the checkpoint's own."""
    from ..runtime.checkpoint import load_model
    from ..runtime.tokenizer import load_tokenizer
    from ..tools.eval_text import dense_logits_fn, score_documents, wikitext_documents

    docs = heldout_slice(args.heldout, args.docs, args.chars)  # a bad path fails first
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = load_model(model_dir, dtype=dtype, device=device).eval()
    tok = load_tokenizer(model_dir)
    window = model.config.max_position_embeddings
    stride = window // 2
    out: dict = {}
    t = time.perf_counter()
    if args.wikitext:
        score = score_documents(dense_logits_fn(model), lambda s: tok.encode(s, add_bos=False),
                                wikitext_documents(args.wikitext, args.wikitext_rows),
                                bos_id=tok.bos_id, window=window, stride=stride,
                                batch_size=args.eval_batch, device=device)
        out["wikitext2_bpb"], out["wikitext2_tokens"] = score.bits_per_byte, score.tokens
    t_pred = time.perf_counter()
    if fit:
        preds, out["predictors"] = fit_predictors(model, tok, args, model_dir / "predictors")
    else:
        preds, out["predictors"] = load_predictors(model_dir, model, args.device)
    out["predictor_seconds"] = time.perf_counter() - t_pred
    with torch.no_grad():
        rows = run_sweep(model, tok, preds, docs, points=sweep_points(args.mlp_recall),
                         window=window, stride=stride, batch_size=args.eval_batch,
                         device=args.device, per_document=True, log=log)
    out["rows"] = rows
    out["heldout_bpb"], out["heldout_tokens"] = rows[0]["bits_per_byte"], rows[0]["tokens"]
    out["eval_seconds"] = time.perf_counter() - t
    return out


def run_variant(variant: Variant, args, corpus, log) -> dict:
    from ..tools.train_model import train

    work = Path(args.work) / variant.name
    cfg = train_config(args, variant, work)
    t0 = time.perf_counter()
    rec: dict = {"variant": variant.name, "heads": variant.heads,
                 "head_dim": cfg.hidden // variant.heads, "policy": asdict(variant.policy)}
    metrics = train(cfg, t0=t0, corpus=corpus)
    rec["train"] = {k: metrics[k] for k in ("steps", "tokens_seen", "final_loss",
                                            "final_val_loss")}
    rec["train"]["seconds"] = time.perf_counter() - t0
    rec["train"]["tokens_per_second"] = metrics["performance"]["tokens_per_second"]
    rec.update(evaluate_variant(work, args, log))
    rec["seconds"] = time.perf_counter() - t0
    return rec


def tokenize_once(args, log):
    """The training stream, tokenised once for every variant (the trainer's recipe)."""
    from tokenizers import Tokenizer

    from ..tools.train_data import tokenize_corpus
    from ..tools.train_model import TrainConfig

    d = TrainConfig(corpus=args.corpus, tokenizer=args.tokenizer, out="", steps=1,
                    **{k: v for k, v in overrides(args.set).items()
                       if k in ("seed", "max_corpus_bytes", "unwrap_fraction")})
    tokenizer = Tokenizer.from_file(args.tokenizer)
    stream, data = tokenize_corpus(d.corpus, tokenizer,
                                   separator_id=tokenizer.token_to_id("</s>"),
                                   max_bytes=d.max_corpus_bytes,
                                   unwrap_fraction=d.unwrap_fraction, seed=d.seed + 2)
    log(f"corpus tokenised once: {data}")
    return stream, data


def study_meta(args) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "hardware": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "time_budget_s": args.time_budget_s, "args": vars(args)}


def training_facts(model_dir: Path) -> dict:
    """What the trainer recorded about a checkpoint (metrics.json, or the shipped model's
    training_metrics.json): steps, tokens, time, hardware, head policy."""
    for name in ("metrics.json", "training_metrics.json"):
        path = model_dir / name
        if path.is_file():
            m = json.loads(path.read_text())
            perf, cfg = m.get("performance", {}), m.get("config", {})
            return {"file": name, "steps": m.get("steps"), "tokens_seen": m.get("tokens_seen"),
                    "final_loss": m.get("final_loss"),
                    "train_seconds": perf.get("train_seconds"), "device": perf.get("device"),
                    "tokens_per_second": perf.get("tokens_per_second"),
                    "time_budget": cfg.get("time_budget"), "reserve": cfg.get("reserve"),
                    "head_policy": cfg.get("head_policy", "none"),
                    "head_fraction": cfg.get("head_fraction"),
                    "head_tokens": cfg.get("head_tokens")}
    return {}


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluate_model(model_dir: Path, args, log) -> dict:
    """One existing checkpoint with its own predictors: the variant's record, no training."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = config["num_attention_heads"]
    rec = {"variant": model_dir.name, "model": str(model_dir), "heads": heads,
           "head_dim": config["hidden_size"] // heads,
           "sha256": file_sha256(model_dir / "model.safetensors"),
           "train": training_facts(model_dir)}
    rec.update(evaluate_variant(model_dir, args, log, fit=False))
    return rec


def run_models(args, log=print) -> dict:
    """Every ``--model`` on the same slice; the files are rewritten after each."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = {"meta": {**study_meta(args), "mode": "models"}, "variants": []}
    for model_dir in map(Path, args.model):
        log(f"=== {model_dir}")
        t0 = time.perf_counter()
        try:
            rec = {**evaluate_model(model_dir, args, log), "status": "ok"}
        except Exception as exc:  # recorded; the next model still runs
            log(traceback.format_exc())
            rec = {"variant": model_dir.name, "model": str(model_dir), "status": "failed",
                   "error": f"{type(exc).__name__}: {exc}"}
        rec["seconds"] = time.perf_counter() - t0
        study["variants"].append(rec)
        write_model_outputs(study, out)
    return study


def write_model_outputs(study: dict, out: Path) -> None:
    (out / "head_models.json").write_text(json.dumps(study, indent=1) + "\n")
    (out / "head_models.md").write_text(head_compare.markdown(study))
    try:
        plot(study, out / "head_models.png",
             title=f"Existing checkpoints with their own predictors, "
                   f"{study['meta']['hardware']}, {study['meta']['date']}")
    except ImportError:
        print("matplotlib is not installed: no head_models.png")


def run_study(args, log=print) -> dict:
    variants = [parse_variant(s) for s in args.variants.split(",")]
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = {"meta": study_meta(args), "variants": []}
    corpus = tokenize_once(args, log)
    study["meta"]["corpus"] = corpus[1]
    need = args.time_budget_s  # a variant's expected wall time: the budget, or the last one's
    for variant in variants:
        elapsed = time.perf_counter() - start
        if args.deadline_s is not None and elapsed + need > args.deadline_s:
            rec = {"variant": variant.name, "status": "skipped",
                   "error": f"deadline: {elapsed:.0f} s spent, {args.deadline_s:.0f} s allowed"}
        else:
            log(f"=== {variant.name}: {variant.heads} heads, {variant.policy}")
            try:
                rec = {**run_variant(variant, args, corpus, log), "status": "ok"}
            except Exception as exc:  # recorded; the next variant still runs
                log(traceback.format_exc())
                rec = {"variant": variant.name, "status": "failed",
                       "error": f"{type(exc).__name__}: {exc}"}
            need = max(args.time_budget_s, rec.get("seconds", 0.0))
            torch._dynamo.reset()  # each variant compiles anew, not against a cache limit
            if args.device == "cuda":
                torch.cuda.empty_cache()
        study["variants"].append(rec)
        write_outputs(study, out)
    return study


def curve(rec: dict, selector: str, mlp_dense: bool) -> dict[float, dict]:
    """Rows of one head curve by head density skipped."""
    out = {}
    for r in rec.get("rows", []):
        if r["selector"] != selector or r["head_target"] in (None, 1.0):
            continue
        if (r["mlp_target"] == 1.0) == mlp_dense:
            out[round(1.0 - r["head_target"], 4)] = r
    return out


def mlp_point(rec: dict) -> dict | None:
    """The row of the MLP operating point with every head."""
    return next((r for r in rec.get("rows", []) if r["selector"] == "predictor"
                 and r["mlp_target"] is None and r["head_target"] == 1.0), None)


def relative(row: dict, dense: float) -> float:
    """Bits per byte of ``row`` vs dense, in percent."""
    return (row["bits_per_byte"] / dense - 1) * 100


def cost(row: dict | None, dense: float) -> str:
    if row is None:
        return ""
    return f"{relative(row, dense):+.2f}% ({row['head_density']:.2f})"


def budget_text(meta: dict) -> str:
    steps = [s for s in meta["args"]["set"] if s.startswith("steps=")]
    if steps:
        return f"for {steps[-1].removeprefix('steps=')} steps"
    return (f"for a wall-time budget of {meta['time_budget_s']:g} s (training, saving, "
            "evaluation)")


def markdown(study: dict) -> str:
    m = study["meta"]
    lines = [f"# Head-sparse variants, {m['hardware']}, {m['date']}", "",
             f"Each variant trained {budget_text(m)} on the same data and tokenizer "
             f"({m['corpus']['tokens']:,} tokens). Costs are bits "
             "per byte relative to the variant's own dense score on the held-out slice, with "
             "the measured head density in brackets; oracle = the k heads with the largest "
             "true contribution (MLP dense); predictor = the trained head predictors, MLP "
             "dense, and at the MLP operating point (threshold selection).", "",
             "| variant | heads x dim | steps | held-out bpb | WikiText-2 bpb | MLP point: "
             "density, cost | " + " | ".join(f"oracle {s:.0%}" for s in SKIPPED) + " | "
             + " | ".join(f"predictor {s:.0%}" for s in SKIPPED) + " | "
             + " | ".join(f"pred. @MLP point {s:.0%}" for s in SKIPPED) + " |",
             "|---" * (6 + 3 * len(SKIPPED)) + "|"]
    for rec in study["variants"]:
        if rec.get("status") != "ok":
            lines.append(f"| {rec['variant']} | {rec.get('status')}: {rec.get('error')} |")
            continue
        dense = rec["heldout_bpb"]
        point = mlp_point(rec)
        cells = [rec["variant"], f"{rec['heads']} x {rec['head_dim']}",
                 str(rec["train"]["steps"]), f"{dense:.4f}",
                 f"{rec['wikitext2_bpb']:.4f}" if "wikitext2_bpb" in rec else "",
                 f"{point['mlp_density']:.3f}, {cost(point, dense).split(' ')[0]}"
                 if point else ""]
        for selector, mlp_dense in (("oracle-norm", True), ("predictor", True),
                                    ("predictor", False)):
            rows = curve(rec, selector, mlp_dense)
            cells += [cost(rows.get(s), dense) for s in SKIPPED]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Training per variant: steps, final training loss, tokens/s, seconds:", ""]
    for rec in study["variants"]:
        if rec.get("status") == "ok":
            t = rec["train"]
            lines.append(f"- {rec['variant']}: {t['steps']} steps, loss {t['final_loss']:.3f}, "
                         f"{t['tokens_per_second']:,.0f} tokens/s, {t['seconds']:.0f} s train, "
                         f"{rec['eval_seconds']:.0f} s eval ({rec['heldout_tokens']} held-out "
                         f"tokens); predictors: head recall "
                         f"{rec['predictors']['head_recall']:.3f}, MLP density "
                         f"{rec['predictors']['mlp_density']:.3f}")
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    ok = [r for r in study["variants"] if r.get("status") == "ok"]
    for i, rec in enumerate(ok):
        color = f"C{i}"
        dense = rec["heldout_bpb"]
        for (selector, mlp_dense), style in ((("oracle-norm", True), "-o"),
                                             (("predictor", True), "--s"),
                                             (("predictor", False), ":^")):
            start = mlp_point(rec) if not mlp_dense else None  # the curve's no-skip end
            pts = [(0.0, relative(start, dense) if start else 0.0)]
            pts += [(1.0 - r["head_density"], relative(r, dense))
                    for r in curve(rec, selector, mlp_dense).values()]
            xs, ys = zip(*pts, strict=True)
            label = f"{rec['variant']} {selector}{'' if mlp_dense else ' @MLP point'}"
            axes[0].plot(xs, ys, style, color=color, label=label)
    axes[0].axhline(1.0, color="k", lw=0.8, ls=":", label="+1% (target)")
    axes[0].set_xlabel("measured share of heads skipped")
    axes[0].set_ylabel("bits per byte vs dense (%, symlog)")
    axes[0].set_yscale("symlog", linthresh=1.0)  # the 1% target and 40% costs on one axis
    axes[0].legend(fontsize=6)
    names = [r["variant"] for r in ok]
    axes[1].bar(range(len(ok)), [r["heldout_bpb"] for r in ok], 0.4, label="held-out slice")
    axes[1].bar([i + 0.4 for i in range(len(ok))], [r.get("wikitext2_bpb", 0) for r in ok],
                0.4, label="WikiText-2")
    axes[1].set_xticks([i + 0.2 for i in range(len(ok))])
    axes[1].set_xticklabels(names, rotation=20, fontsize=8)
    axes[1].set_ylabel("dense bits per byte")
    axes[1].legend(fontsize=7)
    fig.suptitle(title or f"Head-sparse variants, trained {budget_text(study['meta'])}, "
                          f"{study['meta']['hardware']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(study: dict, out: Path) -> None:
    (out / "head_variants.json").write_text(json.dumps(study, indent=1) + "\n")
    (out / "head_variants.md").write_text(markdown(study))
    try:
        plot(study, out / "head_variants.png")
    except ImportError:
        print("matplotlib is not installed: no head_variants.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dejavu.bench.head_variants",
                                description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=None, help="training text (train.jsonl.xz); "
                   "required unless --model")
    p.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="score this existing checkpoint with its own predictors/ instead "
                   "of training variants (repeatable: every model on the same slice)")
    p.add_argument("--heldout", required=True, help="held-out text (heldout.jsonl.xz)")
    p.add_argument("--wikitext", default=None, help="WikiText-2 raw test file")
    p.add_argument("--wikitext-rows", type=int, default=None, help="its first rows only")
    p.add_argument("--tokenizer", default="models/opt-gutenberg-31m/tokenizer.json")
    p.add_argument("--variants", default=None,
                   help="comma-separated, e.g. h8,h32,h16-drop0.5-t1-rescale (default "
                   f"{BASELINE},h16,h16-drop0.5,h16-gate0.5)")
    p.add_argument("--time-budget-s", type=float, default=120.0,
                   help="per variant: training + saving + evaluation")
    p.add_argument("--reserve-s", type=float, default=40.0,
                   help="of the budget, kept for saving and evaluation")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip a variant that would end past this many seconds")
    p.add_argument("--docs", type=int, default=6, help="held-out documents scored")
    p.add_argument("--chars", type=int, default=24_000, help="characters per document")
    p.add_argument("--mlp-recall", type=float, default=None,
                   help="the MLP operating point (a calibrated recall): default "
                   f"{FIT_RECALL} when the study fits predictors, the file's own with --model")
    p.add_argument("--pred-tokens", type=int, default=60_000)
    p.add_argument("--pred-epochs", type=int, default=4)
    p.add_argument("--pred-batch", type=int, default=512)
    p.add_argument("--pred-lr", type=float, default=1e-2)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer setting (tools/train_model.TrainConfig), e.g. layers=2")
    p.add_argument("--work", default="/tmp/head_variants", help="checkpoints go here")
    p.add_argument("--out", required=True, help="head_variants.json/.md/.png go here")
    args = p.parse_args(argv)
    if args.model:
        if args.variants is not None or args.corpus is not None:
            p.error("--model scores existing checkpoints: --variants and --corpus train new "
                    "ones, give one or the other")
        for d in args.model:
            if not (Path(d) / "config.json").is_file():
                p.error(f"--model {d}: no config.json there (a checkpoint directory)")
        return args
    if args.corpus is None:
        p.error("--corpus is required to train variants (or give --model DIR)")
    args.variants = args.variants or f"{BASELINE},h16,h16-drop0.5,h16-gate0.5"
    if args.mlp_recall is None:
        args.mlp_recall = FIT_RECALL
    for spec in args.variants.split(","):
        try:
            parse_variant(spec)  # a bad name fails before any training
        except ValueError as exc:
            p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model:
        run_models(args)
    else:
        run_study(args)


if __name__ == "__main__":
    main()
