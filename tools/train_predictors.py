"""Train DejaVu predictors for a model: collect, fit, choose operating points, report.

``dejavu-run train-predictors --model M --data FILE --out DIR`` runs the model over
calibration text (tools/collect_labels.py), fits each layer's low-rank classifiers
(runtime/predictors.py) on documents split three ways (train / calibrate / report, by
document so held-out text is unseen), chooses each layer's operating point on the
calibration split and reports recall, precision and density on the report split. It
writes DIR/predictors.safetensors, DIR/report.json and DIR/report.md.

MLP predictors read the residual entering their own layer's MLP block (``mlp_source``
"mlp_in", the default) or the heads' lookahead source ("lookahead"). From their own input
the default predictor is closed-form (``mlp_init`` "svd"): fc1 through its layer norm,
truncated to rank r by an SVD, so it scores each neuron by an approximation of its
pre-activation; ``mlp_epochs`` > 0 fine-tunes it (binary cross-entropy), and "random"
initialises and fits it as the head predictors are.

Operating points (top-k per token):
- MLP: the smallest k whose recall of firing neurons reaches ``mlp_recall`` on the
  calibration split, or a fixed ``mlp_density`` for every layer; with threshold selection,
  per layer, the largest logit threshold that keeps that recall;
- heads: k = ``head_density`` * H; a head counts as "needed" when it is among the k heads
  with the largest output norm for that token.

What this module does not know: how predictions are executed (runtime/sparse.py).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime.predictors import (
    MLP_SOURCES,
    Frequencies,
    LowRankClassifier,
    OperatingPoint,
    PredictorSet,
    fingerprint,
)
from ..runtime.selection import count, topk_mask
from . import captured_fit
from .collect_labels import (
    Collected,
    collect,
    planned_bytes,
    unpack_bits,
)

# Recall targets whose thresholds every layer stores besides its own operating point.
RECALLS = (0.8, 0.85, 0.9, 0.925, 0.95, 0.955, 0.96, 0.965, 0.975, 0.99)


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 100_000
    # Tokens per calibration sequence; None = the model's positions. Predictors must see
    # every position they will serve: trained on 512-token windows, opt-gutenberg-31m's
    # MLP predictors cost +0.2% bits per byte scored in 512-token windows but +3.5% in
    # 1024-token windows, whose scored tokens sit at positions 512..1023.
    window: int | None = None
    per_doc: int = 4096  # tokens from one document at most: calibration spans many books
    # Rank 256 for the closed-form predictor: on opt-gutenberg-31m (hidden 512) its mean
    # held-out density at recall 0.95 is 0.29 at rank 64, 0.20 at 128, 0.16 at 192 and
    # 0.14 at 256 (bench/sparsity/README.md).
    mlp_rank: int = 256
    head_rank: int = 64
    mlp_source: str = "mlp_in"  # runtime.predictors.MLP_SOURCES
    mlp_init: str = "svd"  # "svd" (closed form from fc1, needs "mlp_in") or "random"
    # Fitting epochs of the MLP predictor; None: none for "svd" (fine-tuning it for an
    # epoch changed layer 0's held-out density by +0.003), ``epochs`` for "random".
    mlp_epochs: int | None = None
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
            "mlp_source": self.mlp_source in MLP_SOURCES,
            "mlp_init": self.mlp_init in ("svd", "random"),
            "mlp_epochs": self.mlp_epochs is None or self.mlp_epochs >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"train-predictors: {name}={getattr(self, name)!r} is out "
                                 "of range")
        if self.mlp_init == "svd" and self.mlp_source != "mlp_in":
            raise ValueError("train-predictors: mlp_init='svd' approximates fc1 from its own "
                             "input: it needs mlp_source='mlp_in' (or use mlp_init='random')")
        if self.mlp_init == "random" and self.mlp_epochs == 0:
            raise ValueError("train-predictors: mlp_init='random' with mlp_epochs=0 would "
                             "ship untrained MLP predictors")

    @property
    def mlp_fit_epochs(self) -> int:
        if self.mlp_epochs is not None:
            return self.mlp_epochs
        return 0 if self.mlp_init == "svd" else self.epochs


def _split(docs: Tensor, window: int) -> dict[str, Tensor]:
    """Token indices of each split, by document: 8 in 10 documents train, 1 calibrates,
    1 reports (with fewer than 10 documents, windows are split instead)."""
    n_docs = int(docs.unique().numel())
    if n_docs < 10 and docs.numel() < 10:  # the calibrate and report splits would be empty
        raise ValueError(f"--tokens: the calibration data gave {docs.numel()} window(s) of "
                         f"{window} tokens from {n_docs} document(s); the train / calibrate "
                         "/ report split needs 10 windows or 10 documents: pass --tokens "
                         f"{10 * window} or more, or a smaller --window")
    key = docs if n_docs >= 10 else torch.arange(docs.numel())
    token_key = key.repeat_interleave(window)
    idx = torch.arange(token_key.numel())
    return {"train": idx[token_key % 10 < 8], "calibrate": idx[token_key % 10 == 8],
            "report": idx[token_key % 10 == 9]}


def init_layer(config, layer: int, cfg: TrainConfig) -> tuple[LowRankClassifier,
                                                              LowRankClassifier]:
    """Layer ``layer``'s untrained (MLP, head) predictors. Seeded per layer, so that a run
    that trains one layer at a time, or resumes at layer l, starts layer l from the same
    weights as a run over the whole model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1_000_003 + layer)
        return (LowRankClassifier(config.hidden_size, cfg.mlp_rank, config.ffn_dim),
                LowRankClassifier(config.hidden_size, cfg.head_rank,
                                  config.num_attention_heads))


# Multiplications of the start's subspace by the Gram matrix (``leading_eigenvectors``).
SUBSPACE_ITERATIONS = 6


def leading_eigenvectors(gram: Tensor, r: int, *, iterations: int = SUBSPACE_ITERATIONS,
                         seed: int = 0) -> Tensor:
    """The ``r`` leading eigenvectors of the symmetric positive semi-definite ``gram``
    [c, c], largest first: [c, r].

    Where 2r columns are at most a quarter of c, by subspace iteration: a Gaussian start of
    2r columns (from a CPU generator seeded with ``seed``, so every run and process starts
    alike) multiplied by ``gram`` ``iterations`` times, orthonormalised by QR after each, then
    the Rayleigh-Ritz step (the eigenvectors of ``gram`` within that subspace). A few
    matrix products instead of the whole eigendecomposition: on an H100 the float64 ``eigh``
    of OPT-13B's 5120 x 5120 Gram matrix cost the layer reader about 0.3 s a layer, 0.9 s
    at OPT-30B's 7168 (bench/NOTES.md, seventh session). The subspace converges as
    (lambda_2r / lambda_r)^iterations: on the shipped model's fc1 at r = 64 of 512, six
    iterations left the captured energy (the squared norm of fc1 in the subspace) 9e-4 short
    of the exact subspace's in layer 0 and at most 1.6e-4 in the others, and the MLP
    predictors' held-out density at recall 0.95 within 0.0011 of the exact start's in every
    layer. Wider ranks take the whole eigendecomposition (``torch.linalg.eigh``)."""
    c = gram.shape[0]
    k = 2 * r
    if 4 * k > c:
        _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
        return vecs[:, -r:].flip(1)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(c, k, generator=g, dtype=gram.dtype).to(gram.device)
    for _ in range(iterations):
        q = torch.linalg.qr(gram @ q).Q
    _, w = torch.linalg.eigh(q.T @ gram @ q)
    return q @ w[:, -r:].flip(1)


@torch.no_grad()
def svd_weights(layer, rank: int) -> dict[str, Tensor]:
    """An MLP predictor's weights set to fc1's pre-activation truncated to ``rank``: with
    the layer norm's scale g and shift b folded in, fc1(LN(x)) = (W diag(g)) z + (W b + bias)
    for the normalised z that the classifier computes; A = W diag(g) = U S V^T, down =
    V_r^T, up = U_r S_r = A V_r with bias W b + bias. At full rank it scores exactly the
    pre-activation. Returns the classifier's state dict (float32, on the CPU); it reads
    nothing but the layer, so a background reader can compute it ahead.

    V_r comes from the eigenvectors of the Gram matrix A^T A (hidden x hidden) rather than
    an SVD of the tall A (ffn x hidden): the same subspace (in float64 the squared condition
    number costs nothing at the leading singular values), at a third of the time on a CPU
    and far less on a GPU, where a tall float64 SVD took minutes per OPT-13B layer; for a
    rank much below the width only the leading ones (``leading_eigenvectors``)."""
    if not layer.pre_ln:
        raise ValueError("mlp_init='svd' needs a pre-LN model (fc1 reads LN(x)); this one "
                         "normalises after each block: use mlp_init='random'")
    fc1, ln = layer.fc1, layer.final_layer_norm
    f, c = fc1.weight.shape
    # float64: LAPACK's float32 factorisations differ in the last bits with the number of
    # threads, and a resumed run (another process) must write the same predictors as an
    # uninterrupted one. One float64 copy of fc1 (the bias is taken from it before it is
    # scaled in place): on OPT-13B that copy is 0.8 GiB, the Gram matrix 0.2 GiB.
    a = fc1.weight.detach().double()
    dev = a.device
    shift = ln.bias.double() if ln.bias is not None else torch.zeros(c, device=dev).double()
    bias = fc1.bias.double() if fc1.bias is not None else torch.zeros(f, device=dev).double()
    up_bias = a @ shift.to(dev) + bias.to(dev)
    if ln.weight is not None:
        a.mul_(ln.weight.double().to(dev))
    # a rank past fc1's own adds nothing: those rows stay 0
    r = min(rank, f, c)
    v = leading_eigenvectors(a.T @ a, r)  # the r leading right singular vectors
    down = torch.zeros(rank, c)
    up = torch.zeros(f, rank)
    down[:r] = v.T.float().cpu()
    up[:, :r] = (a @ v).float().cpu()
    return {"down.weight": down, "up.weight": up, "up.bias": up_bias.float().cpu()}


@torch.no_grad()
def svd_init(clf: LowRankClassifier, layer) -> None:
    """Set an MLP predictor to ``svd_weights`` of ``layer`` at its rank."""
    clf.load_state_dict(svd_weights(layer, clf.down.weight.shape[0]))


def mlp_start(layer, cfg: TrainConfig) -> dict[str, Tensor] | None:
    """The MLP predictor's starting weights computed from the layer (``mlp_init`` "svd"),
    or None when it starts from ``init_layer``'s random weights."""
    return svd_weights(layer, cfg.mlp_rank) if cfg.mlp_init == "svd" else None


def init_mlp(clf: LowRankClassifier, layer, cfg: TrainConfig) -> None:
    """The MLP predictor's starting point from the layer's weights (``mlp_init``)."""
    start = mlp_start(layer, cfg)
    if start is not None:
        clf.load_state_dict(start)


def epoch_orders(idx: Tensor, epochs: int, seed: int) -> Iterator[Tensor]:
    """Each epoch's order of the training tokens ``idx``: one permutation per epoch from one
    CPU generator seeded with ``seed`` (the eager and the captured fit share it)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield idx[torch.randperm(idx.numel(), generator=g).to(idx.device)]


# AdamW's betas: beta1 stays at 0.9 for the whole fit (the schedule moves only the learning
# rate), so the captured fit can use the fused AdamW kernel, which takes beta1 as a number a
# graph would freeze. OneCycleLR's default also cycles beta1 (0.95 down to 0.85 and back);
# on the shipped model that recipe and this one gave the same held-out head recall to three
# places in every layer (bench/NOTES.md, sixth session).
BETAS = (0.9, 0.999)


def schedule(opt: torch.optim.Optimizer, lr: float, steps: int
             ) -> torch.optim.lr_scheduler.OneCycleLR:
    """A predictor fit's learning rate over its ``steps``: one cycle up to ``lr`` in the first
    tenth, then down; beta1 fixed (``BETAS``). OneCycleLR divides by its warm-up's length
    in steps less one, which is zero for exactly 10 steps: there the warm-up is 15%."""
    pct = 0.15 if steps == 10 else 0.1
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                               pct_start=pct, cycle_momentum=False)


def fit(clf: LowRankClassifier, x: Tensor, target, idx: Tensor, cfg: TrainConfig,
        device: torch.device, progress=None, epochs: int | None = None) -> float | None:
    """Binary cross-entropy over ``idx`` tokens. ``target`` gives their labels: a [tokens,
    out] bool table indexed by token id, or a function ``rows -> [n, out] bool``. Returns the
    last epoch's mean loss (None with no epoch). ``progress()`` is called after every step.

    On CUDA (where ``captured_fit.ENABLED``, the default), with a table and ``x``, ``idx``
    and the table on the device, every step after a few warm-up steps is a replay of one
    captured graph (tools/captured_fit.py: the same steps, to float32 rounding); otherwise
    (``captured_fit.unsupported`` says why) the steps run eagerly."""
    epochs = cfg.epochs if epochs is None else epochs
    clf.to(device).train()
    if epochs == 0:
        clf.eval()
        return None
    steps = epochs * math.ceil(idx.numel() / cfg.batch_size)
    orders = epoch_orders(idx, epochs, cfg.seed)
    if captured_fit.unsupported(clf, x, target, idx) is None:
        steps_on_device = captured_fit.PaddedSteps(
            clf, x, target, idx, lr=cfg.lr, betas=BETAS, batch_size=cfg.batch_size,
            schedule=lambda opt: schedule(opt, cfg.lr, steps))
        loss = steps_on_device.run(orders, progress, graphed=True)
        clf.eval()
        return loss
    labels = target.__getitem__ if isinstance(target, Tensor) else target
    # Fused on CUDA: one kernel per step for every parameter instead of a few per tensor
    # (the steps are small and launch-bound). The CPU keeps the reference implementation.
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, betas=BETAS, weight_decay=0.0,
                            fused=device.type == "cuda")
    sched = schedule(opt, cfg.lr, steps)
    # The loss is summed on the device: reading it every step would make the host wait for
    # the GPU step by step instead of queueing steps ahead.
    loss_sum, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for order in orders:
        loss_sum, n = torch.zeros((), dtype=torch.float64, device=device), 0
        for start in range(0, order.numel(), cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            xb = x[rows].to(device, torch.float32)
            yb = labels(rows).to(device, torch.float32)
            loss = F.binary_cross_entropy_with_logits(clf(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, n = loss_sum + loss.detach().double() * rows.numel(), n + rows.numel()
            if progress is not None:
                progress()
    clf.eval()
    return float(loss_sum) / max(n, 1)


@torch.no_grad()
def _scores(clf: LowRankClassifier, x: Tensor, idx: Tensor, device: torch.device) -> Tensor:
    return torch.cat([clf(x[idx[s:s + 4096]].to(device, torch.float32))
                      for s in range(0, idx.numel(), 4096)])


def hits_at_k(scores: Tensor, labels: Tensor, chunk: int = 2048) -> Tensor:
    """Summed over tokens, how many labelled entries the top-k contains, for every k:
    [n + 1] float64 on the CPU, with entry k for top-k. Each row is sorted once; a labelled
    entry at rank j counts for every k > j, so the labels are summed by rank over the rows
    and one cumulative sum over the ranks ends it (whole numbers: exact in any order). Row
    chunks bound the sort's memory."""
    by_rank = torch.zeros(scores.shape[-1], dtype=torch.int64, device=scores.device)
    for s in range(0, scores.shape[0], chunk):
        order = scores[s:s + chunk].argsort(dim=-1, descending=True)
        by_rank += labels[s:s + chunk].gather(-1, order).sum(0)
    total = torch.zeros(scores.shape[-1] + 1, dtype=torch.int64, device=scores.device)
    total[1:] = by_rank.cumsum(0)
    return total.double().cpu()


def head_targets(norms: Tensor, k: int) -> Tensor:
    """Top-k heads by output norm, per token."""
    return topk_mask(norms.float(), k)


def fit_steps(cfg: TrainConfig, train_tokens: int) -> int:
    """Optimizer steps ``train_layer`` takes (both predictors), for a progress bar."""
    return (cfg.epochs + cfg.mlp_fit_epochs) * math.ceil(train_tokens / cfg.batch_size)


@torch.no_grad()
def layer_frequencies(bits: Tensor, norms: Tensor, ffn_dim: int, head_k: int,
                      device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Per-neuron firing and per-head top-``head_k`` fractions over all tokens of one
    layer's labels (``Frequencies``): [F] and [H] float32 on the CPU. Counted on ``device``
    in row chunks, one bit plane at a time (neuron 8 j + b is bit b of byte j, high bit
    first as ``pack_bits`` writes it), without unpacking the bits to tokens x F bytes."""
    planes = torch.zeros(bits.shape[1], 8, dtype=torch.int64, device=device)
    heads = torch.zeros(norms.shape[1], dtype=torch.int64, device=device)
    n = bits.shape[0]
    for s in range(0, n, 8192):
        block = bits[s:s + 8192].to(device)
        for b in range(8):
            planes[:, b] += (block & (0x80 >> b)).ne(0).sum(0)
        heads += head_targets(norms[s:s + 8192].to(device), head_k).sum(0)
    mlp = planes.reshape(-1)[:ffn_dim]
    return ((mlp.double() / max(n, 1)).float().cpu(),
            (heads.double() / max(n, 1)).float().cpu())


def counts_above(scores: Tensor, labels: Tensor, thresholds: list[float], chunk: int = 2048
                 ) -> tuple[list[int], list[int]]:
    """For each threshold t: how many scores exceed t, and how many of those are labelled.
    One pass over the scores for every threshold at once: each score's bucket is the number
    of (sorted) thresholds below it, and a score exceeds sorted threshold j exactly when its
    bucket is past j; the slow twin is ``(scores > t).sum()`` per threshold. Row chunks
    bound the buckets' memory."""
    edges, where = torch.tensor(thresholds, dtype=scores.dtype, device=scores.device).sort()
    m = len(thresholds)
    above = torch.zeros(m + 1, dtype=torch.int64, device=scores.device)
    hits = torch.zeros(m + 1, dtype=torch.int64, device=scores.device)
    for s in range(0, scores.shape[0], chunk):
        # right=False: the number of edges strictly below each score
        bucket = torch.bucketize(scores[s:s + chunk], edges, out_int32=True)
        above += torch.bincount(bucket.reshape(-1), minlength=m + 1)
        hits += torch.bincount(bucket[labels[s:s + chunk]], minlength=m + 1)
    # sorted edge j is exceeded by the scores in buckets j + 1 and up; back to input order
    back = where.argsort()
    above = above.flip(0).cumsum(0).flip(0)[1:][back]
    hits = hits.flip(0).cumsum(0).flip(0)[1:][back]
    return above.tolist(), hits.tolist()


def point_rows(scores: Tensor, labels: Tensor, thresholds: dict[str, float]) -> dict:
    """Density, recall and precision on held-out tokens at each calibrated threshold."""
    active = max(float(labels.sum()), 1.0)
    above, hits = counts_above(scores, labels, list(thresholds.values()))
    return {key: {"mlp_density": n / scores.numel(), "mlp_recall": hit / active,
                  "mlp_precision": hit / max(float(n), 1.0)}
            for key, n, hit in zip(thresholds, above, hits, strict=True)}


class Clock:
    """Seconds per phase on one device. ``lap(name)`` closes the phase that ran since the
    last lap; on CUDA it first waits for the work queued on the current stream, so a phase
    is charged for its own kernels rather than the next phase's first host read (a few
    waits per layer; the loops inside a phase still never wait). Other streams (a layer
    read ahead on its own) are not waited for."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> float:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        took, self.last = now - self.last, now
        self.seconds[name] = self.seconds.get(name, 0.0) + took
        return took


def train_layer(data: Collected, layer: int, split: dict[str, Tensor], preds: PredictorSet,
                cfg: TrainConfig, device: torch.device, *, tables: torch.device | None = None,
                progress=None, clock: Clock | None = None) -> dict:
    """Fit one layer's two predictors, set its operating point, return its report row,
    with the seconds of its phases: ``tables_s`` (moving the tables), ``mlp_fit_s``,
    ``head_fit_s`` and ``calibrate_s`` (MLP operating point and report scoring).
    ``tables``: where the layer's inputs and labels sit while fitting (default ``device``:
    on a GPU the whole table moves once and rows are gathered there). ``clock``: a running
    ``Clock`` to lap (its earlier phases come into the row too)."""
    clock = Clock(device) if clock is None else clock
    tables = device if tables is None else tables
    x, f = data.inputs[layer].to(tables), data.ffn_dim
    xm = data.mlp_source(layer, cfg.mlp_source).to(tables)
    bits, norms_all = data.neuron_bits[layer].to(tables), data.head_norms[layer].to(tables)
    split = {k: v.to(tables) for k, v in split.items()}
    h = norms_all.shape[1]
    head_k = count(cfg.head_density, h)
    # Every token's head labels at once (a row's top-k does not depend on the other rows):
    # tokens x H bools, gathered per step instead of a top-k per step (a table, which a
    # captured fit replays: tools/captured_fit.py).
    head_labels = head_targets(norms_all, head_k)
    # A function, so the MLP fit steps eagerly: unpack_bits copies its bit weights from the
    # host on every call, which a graph cannot hold.
    neurons = lambda rows: unpack_bits(bits[rows], f)  # noqa: E731
    clock.lap("tables_s")
    mlp_loss = fit(preds.mlp[layer], xm, neurons, split["train"], cfg, device, progress,
                   epochs=cfg.mlp_fit_epochs)
    clock.lap("mlp_fit_s")
    head_loss = fit(preds.heads[layer], x, head_labels, split["train"], cfg, device, progress)
    clock.lap("head_fit_s")
    seconds = clock.seconds["mlp_fit_s"] + clock.seconds["head_fit_s"]

    # Operating point on the calibration split.
    cal = split["calibrate"]
    cal_labels = neurons(cal).to(device)
    threshold, table = None, None
    if cfg.mlp_density is not None:
        mlp_k = count(cfg.mlp_density, f)
    else:
        cal_scores = _scores(preds.mlp[layer], xm, cal, device)
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
    labels = neurons(rep).to(device)
    rep_scores = _scores(preds.mlp[layer], xm, rep, device)
    active = float(labels.sum())
    if threshold is not None and cfg.mlp_select == "threshold":
        (n_chosen,), (hit,) = counts_above(rep_scores, labels, [threshold])
    else:
        chosen = topk_mask(rep_scores, mlp_k)
        n_chosen, hit = int(chosen.sum()), int((chosen & labels).sum())
    density = n_chosen / rep_scores.numel()
    norms = norms_all[rep].to(device).float()
    head_chosen = topk_mask(_scores(preds.heads[layer], x, rep, device), head_k)
    head_hit = float((head_chosen & head_labels[rep].to(device)).sum())
    mass = float((norms * head_chosen).sum() / norms.sum().clamp_min(1e-12))
    point = OperatingPoint(mlp_k=mlp_k, head_k=count(cfg.head_point, h), mlp_threshold=threshold,
                           mlp_thresholds=table,
                           mlp_recall=hit / max(active, 1.0),
                           mlp_precision=hit / max(float(n_chosen), 1.0),
                           head_recall=head_hit / (head_k * rep.numel()),
                           mlp_source=cfg.mlp_source)
    preds.points[layer] = point
    points = point_rows(rep_scores, labels, table) if table else {}
    clock.lap("calibrate_s")
    return {
        "layer": layer, "firing": active / (rep.numel() * f), "mlp_k": mlp_k,
        "mlp_density": density, "mlp_recall": point.mlp_recall,
        "mlp_precision": point.mlp_precision, "head_k": head_k, "head_density": head_k / h,
        "default_head_k": point.head_k,
        "head_recall": point.head_recall, "head_norm_mass": mass,
        "mlp_loss": mlp_loss, "head_loss": head_loss, "train_s": seconds,
        # Every stored recall point, measured on the report tokens (threshold selection).
        "points": points, **clock.seconds,
    }


def train_predictors(model, windows: Tensor, docs: Tensor, cfg: TrainConfig, *,
                     device: torch.device, log=print
                     ) -> tuple[PredictorSet, dict, Frequencies]:
    """Collect labels over the whole model at once, then fit layer by layer: the reference
    for ``tools/train_layerwise.py`` (the CLI's entry), which needs only one layer in
    memory at a time."""
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
    c = model.config
    preds = PredictorSet(c, fingerprint(model), cfg.mlp_rank, cfg.head_rank)
    head_k = count(cfg.head_density, c.num_attention_heads)
    freq = Frequencies({}, {}, windows.numel(), head_k, preds.fingerprint)
    rows = []
    for layer in model.layer_ids:
        preds.mlp[layer], preds.heads[layer] = init_layer(c, layer, cfg)
        init_mlp(preds.mlp[layer], model.layers()[model.layer_ids.index(layer)], cfg)
        rows.append(train_layer(data, layer, split, preds, cfg, device))
        freq.mlp[layer], freq.heads[layer] = layer_frequencies(
            data.neuron_bits[layer], data.head_norms[layer], c.ffn_dim, head_k)
        log(layer_line(rows[-1]))
    report = make_report(cfg, split, docs, device, rows)
    report["collect_s"] = collect_s
    finish(preds, cfg, report)
    return preds.to("cpu"), report, freq


def layer_line(r: dict, *, seconds: bool = True) -> str:
    """One layer's report row in a line; ``seconds``: with its fitting time (the layerwise
    trainer's line splits it into phases instead)."""
    took = f" (fit {r['train_s']:.0f} s)" if seconds else ""
    return (f"layer {r['layer']}: mlp k={r['mlp_k']} recall={r['mlp_recall']:.3f} "
            f"precision={r['mlp_precision']:.3f} density={r['mlp_density']:.3f} | heads "
            f"k={r['head_k']} recall={r['head_recall']:.3f}{took}")


def make_report(cfg: TrainConfig, split: dict[str, Tensor], docs: Tensor,
                device: torch.device, rows: list[dict]) -> dict:
    return {
        "config": asdict(cfg), "tokens": {k: int(v.numel()) for k, v in split.items()},
        "documents": int(docs.unique().numel()), "device": str(device), "layers": rows,
        "mean": {key: sum(r[key] for r in rows) / len(rows)
                 for key in ("firing", "mlp_density", "mlp_recall", "mlp_precision",
                             "head_density", "head_recall", "head_norm_mass")},
    }


def finish(preds: PredictorSet, cfg: TrainConfig, report: dict) -> None:
    preds.mlp_select = cfg.mlp_select
    preds.report = report


def write_outputs(out_dir: Path, preds: PredictorSet, freq: Frequencies, report: dict,
                  model_name: str) -> Path:
    """predictors.safetensors, frequencies.safetensors, report.json and report.md."""
    path = preds.save(out_dir)
    freq.save(out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "report.md").write_text(markdown_report(report, model_name))
    return path


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
    keys = sorted({k for r in report["layers"] for k in r.get("points", {})}, key=float)
    if keys:
        lines += [
            "Every calibrated recall point (threshold selection; thresholds set on the "
            "calibration tokens), measured on the report tokens: MLP density / recall / "
            "precision per layer.", "",
            "| layer | " + " | ".join(f"recall {k}" for k in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for r in report["layers"]:
            cells = [r["points"].get(k) for k in keys]
            lines.append(f"| {r['layer']} | " + " | ".join(
                f"{p['mlp_density']:.3f} / {p['mlp_recall']:.3f} / {p['mlp_precision']:.3f}"
                if p else "" for p in cells) + " |")
        lines.append("")
    return "\n".join(lines)
