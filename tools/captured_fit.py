"""A predictor's fit (``train_predictors.fit``) on CUDA, each epoch a replay of one CUDA graph.

A step is tiny (a low-rank classifier over one batch of a few thousand tokens): eagerly its
launches and the optimizer's Python take far longer than its GPU work, and so does a graph
replayed once per step with the scheduler's Python between replays (0.29 s per layer's head
fit at the OPT-13B shape, about 0.8 ms a step). Here one graph holds a whole epoch's steps
- each one's learning rate and beta1 copied from tables, its batch's gather from the token
tables, forward, binary cross-entropy, backward, the AdamW update and the epoch's loss sum -
and the host does three copies and one replay per epoch.

It takes the eager loop's steps (the caller's per-epoch orders, its schedule):
- The schedule's lr and beta1 for every step are computed before the fit, by stepping the
  same scheduler over a stand-in optimizer of floats (``schedule_values``): a schedule is a
  function of the step count (OneCycleLR writes lr, and cycles beta1 through
  ``group["betas"]``). Each step copies its values into the device tensors torch's
  single-tensor AdamW reads with ``capturable=True`` (beta2, which the schedule never
  moves, stays a float: see ``PaddedSteps``).
- An epoch's last, shorter batch is padded to the full batch with token id -1: padded rows
  gather token 0, weigh 0, and the mean is rescaled to the real rows (``batch_loss``), so
  every epoch has the same steps of the same shapes.
- The first epoch runs uncaptured on the capture's side stream, as torch's CUDA graph notes
  ask (it creates the optimizer state and cuBLAS's workspace outside the capture); its steps
  are steps of the fit, the same code.
``PaddedSteps.run(graphed=False)`` runs every epoch uncaptured: on the CPU, the tests' twin.

What this module does not know: the learning-rate schedule (``schedule`` builds it), the
order tokens are visited in (the caller's), or what the labels mean.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime.predictors import LowRankClassifier

# AdamW's default betas, which the eager loop uses; OneCycleLR overwrites beta1 at once.
BETAS = (0.9, 0.999)


# On where CUDA is. It was off for a while: inside `train-predictors` on an OPT-13B shape the
# 32nd layer's capture ended with "capturing stream has unjoined work" (an H100,
# 2026-12-06). Each fit took a new side stream from torch's pool, which hands out its 32
# streams per priority in turn, so the 32nd fit's side stream was the layer reader's, and
# the reader's copies, issued from its thread, joined the capture. The side stream is now
# one per device from the high-priority pool (``capture_stream``), which nothing else here
# draws from.
ENABLED = True

_capture_streams: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream fits on ``device`` warm up and capture on: one per device, taken once from
    torch's high-priority pool. A stream taken per fit from the default pool comes round
    again after 32 takes, to whoever holds it then (tools/layer_reader.py's stream, busy on
    its own thread during the capture)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _capture_streams:
        _capture_streams[device] = torch.cuda.Stream(device, priority=-1)
    return _capture_streams[device]


def unsupported(clf: LowRankClassifier, x: Tensor, target, idx: Tensor) -> str | None:
    """Why the fit of ``clf`` on these inputs cannot be captured, or None when it can."""
    if not ENABLED:
        return "captured fits are off (captured_fit.ENABLED)"
    device = next(clf.parameters()).device
    if device.type != "cuda":
        return "not on CUDA: the CPU steps eagerly (the reference)"
    if not isinstance(target, Tensor):
        # A function may work on the host (unpack_bits copies its bit weights from the
        # host on every call), or read host state that a graph would freeze at capture.
        return "the labels come from a function, not a table"
    if {t.device for t in (x, target, idx)} != {device}:
        # Each batch would be gathered on the host and copied over: host work.
        return f"the tables are not all on {device}"
    if idx.numel() == 0:
        return "no training tokens"
    return None


def batch_loss(clf: LowRankClassifier, x: Tensor, labels: Tensor, rows: Tensor
               ) -> tuple[Tensor, Tensor]:
    """The mean binary cross-entropy over the real rows of a padded batch, and their count
    (float32). ``rows`` [B] int64 token ids, -1 for padding; x [tokens, C], labels [tokens,
    out] bool. Padded rows weigh 0 and the mean over all B rows is scaled by B / n: over a
    full batch both factors are exactly 1, so it is the plain mean."""
    real = rows >= 0
    ids = rows.clamp(min=0)
    n = real.sum(dtype=torch.float32)
    scale = torch.full_like(n, rows.numel()) / n  # a true division: B / B is exactly 1
    logits = clf(x[ids].float())
    weight = real[:, None].float()
    return F.binary_cross_entropy_with_logits(logits, labels[ids].float(), weight) * scale, n


def schedule_values(schedule: Callable[[torch.optim.Optimizer], object], lr: float,
                    steps: int) -> tuple[list[float], list[float]]:
    """The lr and beta1 each of ``steps`` steps runs with, as the eager loop's scheduler
    sets them (``sched.step()`` after every step), from a stand-in AdamW of floats."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr, betas=BETAS,
                            weight_decay=0.0)
    sched = schedule(opt)
    lrs, beta1s = [], []
    with warnings.catch_warnings():
        # The stand-in never steps: torch warns of a scheduler stepped before its optimizer.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler"))
        for i in range(steps):
            group = opt.param_groups[0]
            lrs.append(float(group["lr"]))
            beta1s.append(float(group["betas"][0]))
            if i + 1 < steps:
                sched.step()
    return lrs, beta1s


class PaddedSteps:
    """The fit as fixed-shape epochs: one optimizer (AdamW, lr and beta1 in tensors on the
    tables' device, set from the schedule's tables each step) over padded batches of
    ``batch_size`` token ids, ``epochs`` times."""

    def __init__(self, clf: LowRankClassifier, x: Tensor, labels: Tensor, idx: Tensor, *,
                 batch_size: int, lr: float, epochs: int,
                 schedule: Callable[[torch.optim.Optimizer], object]) -> None:
        dev = x.device
        self.clf, self.x, self.labels, self.n = clf, x, labels, idx.numel()
        self.batch_size, self.epochs = batch_size, epochs
        self.steps_per_epoch = math.ceil(self.n / batch_size)
        lrs, beta1s = schedule_values(schedule, lr, epochs * self.steps_per_epoch)
        shape = (epochs, self.steps_per_epoch)
        self.lrs = torch.tensor(lrs, dtype=torch.float32, device=dev).view(shape)
        self.beta1s = torch.tensor(beta1s, dtype=torch.float32, device=dev).view(shape)
        # What the graph reads: this epoch's schedule and padded token ids, the step's lr
        # and beta1 (the optimizer's own tensors), the epoch's loss sum.
        self.epoch_lrs = torch.empty(self.steps_per_epoch, dtype=torch.float32, device=dev)
        self.epoch_beta1s = torch.empty_like(self.epoch_lrs)
        self.padded = torch.full((self.steps_per_epoch * batch_size,), -1, dtype=torch.long,
                                 device=dev)
        self.lr = torch.tensor(lrs[0], device=dev)
        self.beta1 = torch.tensor(beta1s[0], device=dev)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        # capturable=True needs CUDA; on the CPU the same formulas, uncaptured.
        self.opt = torch.optim.AdamW(
            clf.parameters(), lr=self.lr,
            betas=(self.beta1, torch.tensor(BETAS[1], device=dev)),
            weight_decay=0.0, foreach=False, capturable=dev.type == "cuda")
        # beta2 back to a float (the constructor takes both betas as floats or both as
        # tensors): the step passes 1 - beta2 as addcmul's scalar, which from a tensor is a
        # host read, refused under capture (seen on an H100). The schedule never moves it.
        self.opt.param_groups[0]["betas"] = (self.beta1, BETAS[1])

    def step(self, i: int) -> None:
        """Step ``i`` of the epoch: its lr and beta1 into the optimizer's tensors, then one
        optimizer step on its batch. Grads are set to None first, so that under capture
        backward writes them afresh (from the graph's pool) instead of adding to them."""
        self.lr.copy_(self.epoch_lrs[i])
        self.beta1.copy_(self.epoch_beta1s[i])
        rows = self.padded[i * self.batch_size:(i + 1) * self.batch_size]
        self.opt.zero_grad(set_to_none=True)
        loss, n = batch_loss(self.clf, self.x, self.labels, rows)
        loss.backward()
        self.opt.step()
        self.loss_sum.add_(loss.detach().double() * n)

    def epoch(self) -> None:
        for i in range(self.steps_per_epoch):
            self.step(i)

    def run(self, orders: Iterable[Tensor], progress=None, *, graphed: bool) -> float:
        """Every epoch of ``orders`` (``epochs`` permutations of the training token ids); the
        last epoch's mean loss. ``progress()`` once per step, after its epoch."""
        side = capture_stream(self.x.device) if graphed else None
        graph, epochs = None, 0
        for e, order in enumerate(orders):
            if e >= self.epochs:
                raise ValueError(f"more orders than the {self.epochs} epochs scheduled")
            self.loss_sum.zero_()
            self.padded[:self.n].copy_(order)
            self.epoch_lrs.copy_(self.lrs[e])
            self.epoch_beta1s.copy_(self.beta1s[e])
            if not graphed:
                self.epoch()
            elif e == 0:
                self._uncaptured(side)
            else:
                if graph is None:
                    graph = self._capture(side)
                graph.replay()
            epochs += 1
            if progress is not None:
                for _ in range(self.steps_per_epoch):
                    progress()
        if epochs != self.epochs:
            raise ValueError(f"{epochs} orders for {self.epochs} scheduled epochs")
        loss = float(self.loss_sum) / self.n  # waits for the last replay
        # The grads live in the graph's memory pool: let it go with the graph.
        self.opt.zero_grad(set_to_none=True)
        return loss

    def _uncaptured(self, side: torch.cuda.Stream) -> None:
        current = torch.cuda.current_stream(side.device)
        side.wait_stream(current)
        with torch.cuda.stream(side), warnings.catch_warnings():
            # torch warns that a capturable optimizer steps uncaptured: this is the warm-up
            # epoch before its capture.
            warnings.filterwarnings("ignore", message="This instance was constructed with "
                                    "capturable=True")
            self.epoch()
        current.wait_stream(side)

    def _capture(self, side: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        """``epoch`` captured (not run)."""
        graph = torch.cuda.CUDAGraph()
        # capture_begin / capture_end rather than torch.cuda.graph, which synchronises the
        # whole device and empties the allocator's cache first: that would wait for the
        # layer that tools/layer_reader.py reads ahead on its own stream, and free memory
        # that the next layer allocates again. "thread_local": that reader's thread may
        # synchronise its own stream meanwhile, which the default "global" mode forbids.
        # The host's copies for this epoch were queued on the current stream.
        side.wait_stream(torch.cuda.current_stream(side.device))
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.epoch()
            finally:
                graph.capture_end()
        return graph
