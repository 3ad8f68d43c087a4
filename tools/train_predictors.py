"""Train DejaVu predictors for a model: collect, fit, choose operating points, report.

``dejavu-run train-predictors --model M --data FILE --out DIR`` runs the model over
calibration text (tools/collect_labels.py), fits each layer's low-rank classifiers
(runtime/predictors.py) on documents split three ways (train / calibrate / report, by
document so held-out text is unseen), chooses each layer's operating point on the
calibration split and reports recall, precision and density on the report split. It
writes DIR/predictors.safetensors, DIR/report.json and DIR/report.md.

Operating points (top-k per token):
- MLP: the smallest k whose recall of firing neurons reaches ``mlp_recall`` on the
  calibration split, or a fixed ``mlp_density`` for every layer;
- heads: k = ``head_density`` * H; a head counts as "needed" when it is among the k heads
  with the largest output norm for that token.

What this module does not know: how predictions are executed (runtime/sparse.py).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime.predictors import LowRankClassifier, OperatingPoint, PredictorSet
from ..runtime.selection import count, topk_mask
from .collect_labels import (
    Collected,
    calibration_windows,
    collect,
    iter_texts,
    planned_bytes,
    unpack_bits,
)

# Recall targets whose thresholds every layer stores besides its own operating point.
RECALLS = (0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99)


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 100_000
    # Tokens per calibration sequence; None = the model's positions. Predictors must see
    # every position they will serve: trained on 512-token windows, opt-gutenberg-31m's
    # MLP predictors cost +0.2% bits per byte scored in 512-token windows but +3.5% in
    # 1024-token windows, whose scored tokens sit at positions 512..1023.
    window: int | None = None
    per_doc: int = 4096  # tokens from one document at most: calibration spans many books
    mlp_rank: int = 128
    head_rank: int = 64
    epochs: int = 8
    # Small batches and several epochs: with 1024-token batches and 3 epochs the MLP
    # predictors were far from converged (recall of firing neurons at 20% density 0.69 vs
    # 0.99 for 256-token batches, 8 epochs, lr 5e-3; layer 2 of opt-gutenberg-31m).
    batch_size: int = 256
    lr: float = 5e-3
    mlp_recall: float = 0.95
    mlp_density: float | None = None  # fixed density instead of a recall target
    # "topk": the same k for every token; "threshold": a logit threshold, so a token keeps
    # as many neurons as its prediction says (both calibrated for mlp_recall).
    mlp_select: str = "topk"
    head_density: float = 0.5  # labels: a token's top heads by output norm
    # Heads kept per token at the file's default operating point. 1.0 (dense) because on
    # opt-gutenberg-31m skipping half of the 8 heads costs ~11% bits per byte even with
    # near-oracle predictions; head sparsity is a setting ([sparsity] head_density).
    head_point: float = 1.0
    max_memory_gb: float = 8.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "tokens": self.tokens > 0, "window": self.window is None or self.window > 1,
            "per_doc": self.per_doc > 0,
            "mlp_rank": self.mlp_rank > 0, "head_rank": self.head_rank > 0,
            "epochs": self.epochs > 0, "batch_size": self.batch_size > 0, "lr": self.lr > 0,
            "mlp_recall": 0 < self.mlp_recall <= 1,
            "mlp_density": self.mlp_density is None or 0 < self.mlp_density <= 1,
            "head_density": 0 < self.head_density <= 1, "max_memory_gb": self.max_memory_gb > 0,
            "head_point": 0 < self.head_point <= 1,
            "mlp_select": self.mlp_select in ("topk", "threshold"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"train-predictors: {name}={getattr(self, name)!r} is out "
                                 "of range")


def _split(docs: Tensor, window: int) -> dict[str, Tensor]:
    """Token indices of each split, by document: 8 in 10 documents train, 1 calibrates,
    1 reports (with fewer than 10 documents, windows are split instead)."""
    key = docs if int(docs.unique().numel()) >= 10 else torch.arange(docs.numel())
    token_key = key.repeat_interleave(window)
    idx = torch.arange(token_key.numel())
    return {"train": idx[token_key % 10 < 8], "calibrate": idx[token_key % 10 == 8],
            "report": idx[token_key % 10 == 9]}


def fit(clf: LowRankClassifier, x: Tensor, target, idx: Tensor, cfg: TrainConfig,
        device: torch.device) -> float:
    """Binary cross-entropy over ``idx`` tokens; ``target(rows)`` gives [n, out] bool.
    Returns the last epoch's mean loss."""
    clf.to(device).train()
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.epochs * math.ceil(idx.numel() / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps,
                                                pct_start=0.1)
    loss_sum, n = 0.0, 0
    for epoch in range(cfg.epochs):
        order = idx[torch.randperm(idx.numel(), generator=g).to(idx.device)]
        loss_sum, n = 0.0, 0
        for start in range(0, order.numel(), cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            xb = x[rows].to(device, torch.float32)
            yb = target(rows).to(device, torch.float32)
            loss = F.binary_cross_entropy_with_logits(clf(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, n = loss_sum + float(loss.detach()) * rows.numel(), n + rows.numel()
        del epoch
    clf.eval()
    return loss_sum / max(n, 1)


@torch.no_grad()
def _scores(clf: LowRankClassifier, x: Tensor, idx: Tensor, device: torch.device) -> Tensor:
    return torch.cat([clf(x[idx[s:s + 4096]].to(device, torch.float32))
                      for s in range(0, idx.numel(), 4096)])


def hits_at_k(scores: Tensor, labels: Tensor) -> Tensor:
    """Summed over tokens, how many labelled entries the top-k contains, for every k:
    [n + 1] with entry k for top-k."""
    order = scores.argsort(dim=-1, descending=True)
    ranked = labels.gather(-1, order).double()
    zero = torch.zeros(1, dtype=torch.float64, device=ranked.device)
    return torch.cat([zero, ranked.cumsum(-1).sum(0)]).cpu()


def head_targets(norms: Tensor, k: int) -> Tensor:
    """Top-k heads by output norm, per token."""
    return topk_mask(norms.float(), k)


def train_layer(data: Collected, layer: int, split: dict[str, Tensor], preds: PredictorSet,
                cfg: TrainConfig, device: torch.device) -> dict:
    """Fit one layer's two predictors, set its operating point, return its report row."""
    # On a GPU the layer's whole table moves once (rows are then gathered there).
    x, f = data.inputs[layer].to(device), data.ffn_dim
    bits, norms_all = data.neuron_bits[layer].to(device), data.head_norms[layer].to(device)
    split = {k: v.to(device) for k, v in split.items()}
    h = norms_all.shape[1]
    head_k = count(cfg.head_density, h)
    neurons = lambda rows: unpack_bits(bits[rows], f)  # noqa: E731
    heads = lambda rows: head_targets(norms_all[rows], head_k)  # noqa: E731
    t0 = time.perf_counter()
    mlp_loss = fit(preds.mlp[layer], x, neurons, split["train"], cfg, device)
    head_loss = fit(preds.heads[layer], x, heads, split["train"], cfg, device)
    seconds = time.perf_counter() - t0

    # Operating point on the calibration split.
    cal = split["calibrate"]
    cal_labels = neurons(cal)
    threshold, table = None, None
    if cfg.mlp_density is not None:
        mlp_k = count(cfg.mlp_density, f)
    else:
        cal_scores = _scores(preds.mlp[layer], x, cal, device)
        recall = hits_at_k(cal_scores, cal_labels)
        recall = recall / max(float(cal_labels.sum()), 1.0)
        mlp_k = max(1, int((recall >= cfg.mlp_recall).nonzero()[0]))
        # The largest threshold that keeps mlp_recall of the firing neurons (stored with
        # the top-k; the selector uses it when the file says threshold selection).
        pos = cal_scores[cal_labels].sort().values
        if pos.numel():
            threshold = float(pos[int((1 - cfg.mlp_recall) * pos.numel())])
            table = {f"{r:g}": float(pos[int((1 - r) * pos.numel())]) for r in RECALLS}

    # Report on unseen documents.
    rep = split["report"]
    labels = neurons(rep)
    rep_scores = _scores(preds.mlp[layer], x, rep, device)
    use_threshold = threshold is not None and cfg.mlp_select == "threshold"
    chosen = rep_scores > threshold if use_threshold else topk_mask(rep_scores, mlp_k)
    hit = float((chosen & labels).sum())
    active = float(labels.sum())
    density = float(chosen.double().mean())
    norms = norms_all[rep].float()
    head_chosen = topk_mask(_scores(preds.heads[layer], x, rep, device), head_k)
    head_hit = float((head_chosen & head_targets(norms, head_k)).sum())
    mass = float((norms * head_chosen).sum() / norms.sum().clamp_min(1e-12))
    point = OperatingPoint(mlp_k=mlp_k, head_k=count(cfg.head_point, h), mlp_threshold=threshold,
                           mlp_thresholds=table,
                           mlp_recall=hit / max(active, 1.0),
                           mlp_precision=hit / max(float(chosen.sum()), 1.0),
                           head_recall=head_hit / (head_k * rep.numel()))
    preds.points[layer] = point
    return {
        "layer": layer, "firing": active / (rep.numel() * f), "mlp_k": mlp_k,
        "mlp_density": density, "mlp_recall": point.mlp_recall,
        "mlp_precision": point.mlp_precision, "head_k": head_k, "head_density": head_k / h,
        "default_head_k": point.head_k,
        "head_recall": point.head_recall, "head_norm_mass": mass,
        "mlp_loss": mlp_loss, "head_loss": head_loss, "train_s": seconds,
    }


def train_predictors(model, windows: Tensor, docs: Tensor, cfg: TrainConfig, *,
                     device: torch.device, log=print) -> tuple[PredictorSet, dict]:
    need = planned_bytes(model, windows.numel())
    if need > cfg.max_memory_gb * 2**30:
        raise ValueError(f"collecting {windows.numel()} tokens needs {need / 2**30:.1f} GiB "
                         f"(> max_memory_gb={cfg.max_memory_gb}); lower --tokens")
    log(f"collecting {windows.numel()} tokens in {windows.shape[0]} windows "
        f"({need / 2**20:.0f} MiB of inputs and labels)")
    t0 = time.perf_counter()
    data = collect(model, windows)
    collect_s = time.perf_counter() - t0
    split = _split(docs, windows.shape[1])
    torch.manual_seed(cfg.seed)
    preds = PredictorSet.create(model, cfg.mlp_rank, cfg.head_rank)
    rows = []
    for layer in model.layer_ids:
        rows.append(train_layer(data, layer, split, preds, cfg, device))
        r = rows[-1]
        log(f"layer {layer}: mlp k={r['mlp_k']} recall={r['mlp_recall']:.3f} "
            f"precision={r['mlp_precision']:.3f} | heads k={r['head_k']} "
            f"recall={r['head_recall']:.3f} ({r['train_s']:.0f} s)")
    preds.mlp_select = cfg.mlp_select
    report = {
        "config": asdict(cfg), "tokens": {k: int(v.numel()) for k, v in split.items()},
        "documents": int(docs.unique().numel()), "collect_s": collect_s,
        "device": str(device), "layers": rows,
        "mean": {key: sum(r[key] for r in rows) / len(rows)
                 for key in ("firing", "mlp_density", "mlp_recall", "mlp_precision",
                             "head_density", "head_recall", "head_norm_mass")},
    }
    preds.report = report
    return preds.to("cpu"), report


def markdown_report(report: dict, model_name: str) -> str:
    lines = [
        f"# Predictor report: {model_name}", "",
        f"Calibration: {report['tokens']['train']} training tokens, "
        f"{report['tokens']['calibrate']} for operating points, "
        f"{report['tokens']['report']} held-out report tokens from "
        f"{report['documents']} documents (split by document). Device: {report['device']}.",
        "", "Per layer, on the held-out report tokens, at the file's MLP operating point "
        "(MLP density: measured fraction of neurons selected):", "",
        "| layer | firing | MLP k | MLP density | MLP recall | MLP precision | heads k | "
        "head recall | head norm mass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["layers"] + [dict(report["mean"], layer="mean", mlp_k="", head_k="")]:
        lines.append(
            f"| {r['layer']} | {r['firing']:.3f} | {r['mlp_k']} | {r['mlp_density']:.3f} | "
            f"{r['mlp_recall']:.3f} | {r['mlp_precision']:.3f} | {r['head_k']} | "
            f"{r['head_recall']:.3f} | {r['head_norm_mass']:.3f} |")
    lines += [
        "", "MLP selection: " + report["config"]["mlp_select"] + (
            f" (threshold calibrated for recall {report['config']['mlp_recall']})"
            if report["config"]["mlp_select"] == "threshold" else "") + "; MLP k is the "
        "top-k alternative for the same recall. Heads are scored at k = head density x H; "
        f"the file's default operating point keeps {report['config']['head_point']:.0%} of "
        "the heads.", "",
        "firing: fraction of neurons with fc1 pre-activation > 0 (the label). MLP recall: "
        "share of firing neurons that the top-k contains. Head recall: share of each token's "
        "top-k heads by output norm that the predicted top-k contains; head norm mass: share "
        "of the summed head output norms that the predicted heads carry.", "",
    ]
    return "\n".join(lines)


def run(model_path: str, data: str, out: str, cfg: TrainConfig, *, device: str = "cpu",
        dtype: str = "float32", log=print) -> Path:
    from ..runtime.checkpoint import load_model, resolve_model_dir
    from ..runtime.tokenizer import load_tokenizer

    dev = torch.device(device)
    model_dir = resolve_model_dir(model_path)
    model = load_model(model_dir, dtype=dtype, device=dev)
    tok = load_tokenizer(model_dir)
    window = min(cfg.window or model.config.max_position_embeddings,
                 model.config.max_position_embeddings)
    windows, docs = calibration_windows(iter_texts(data), tok.encode, window=window,
                                        tokens=cfg.tokens, per_doc=cfg.per_doc)
    preds, report = train_predictors(model, windows, docs, cfg, device=dev, log=log)
    report["model"] = str(model_dir)
    report["data"] = str(data)
    out_dir = Path(out)
    path = preds.save(out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "report.md").write_text(markdown_report(report, model_dir.name))
    log(f"wrote {path}")
    sys.stdout.flush()
    return path
