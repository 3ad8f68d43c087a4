"""A predictor's fit (``train_predictors.fit``) on CUDA, each step a replay of one CUDA graph.

A step is small (a low-rank classifier over one batch of tokens), and eagerly its launches
and the optimizer's Python cost more than its GPU work: on an H100 at the OPT-13B shape
(2048-token batches) a head fit's step took 1.3 ms eagerly and 0.9 ms replayed, the replay
then bound by its hundred-odd small kernels on a GPU shared with the layer reader
(bench/NOTES.md, sixth session), a dozen of them per parameter from the single-tensor
AdamW that a cycling beta1 forced, now one fused kernel. Here the whole step - the batch's
gather from the token tables, forward, binary cross-entropy, backward, the AdamW update and
the epoch's loss sum - is captured once and replayed; between replays the host writes the
next batch's token ids and lets the scheduler write the next learning rate into the tensor
the graph reads.

It takes the eager loop's steps (the caller's per-epoch orders, its schedule):
- The learning rate is a device tensor, which the scheduler writes in place (``fill_``, in
  ``torch.optim.lr_scheduler._update_param_group_val``) and the fused AdamW kernel reads
  (``capturable=True``): one kernel updates every parameter. The betas are numbers, frozen
  into the graph at its capture, so the schedule must not move them; the caller's does not
  (``train_predictors.schedule`` fixes beta1). A schedule that wrote another beta1 into the
  optimizer is refused at the next step, not followed silently.
- An epoch's last, shorter batch is padded to the full batch with token id -1: padded rows
  gather token 0, weigh 0, and the mean is rescaled to the real rows (``batch_loss``), so
  one graph of one shape serves every step.
- The first ``WARMUP_STEPS`` steps run uncaptured on the capture's side stream, as torch's
  CUDA graph notes ask (they create the optimizer state and cuBLAS's workspace outside the
  capture); they are steps of the fit, the same code.
``PaddedSteps.run(graphed=False)`` runs every step uncaptured: on the CPU, the tests' twin.

What this module does not know: the learning-rate schedule (``schedule`` builds it), the
order tokens are visited in (the caller's), or what the labels mean.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime.predictors import LowRankClassifier

# Uncaptured steps before the capture (torch's examples warm up with 3).
WARMUP_STEPS = 3


# On where CUDA is. It was off for a while: inside `train-predictors` on an OPT-13B shape the
# 32nd layer's capture ended with "capturing stream has unjoined work" (an H100,
# 2026-12-06). Each fit took a new side stream from torch's pool, which hands out its 32
# streams per priority in turn, so the 32nd fit's side stream was the layer reader's, and
# the reader's copies, issued from its thread, joined the capture. The side stream is now
# one per device from the high-priority pool (``capture_stream``), which nothing else here
# draws from; with it a whole OPT-13B run captured every layer's fit (an H100, 2026-12-06,
# with one graph per epoch, since gone back to one per step: bench/NOTES.md, sixth session).
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


class PaddedSteps:
    """The fit as fixed-shape steps: one optimizer (AdamW, its learning rate in a tensor on
    the tables' device, ``betas`` fixed) and one scheduler over padded batches of
    ``batch_size`` token ids."""

    def __init__(self, clf: LowRankClassifier, x: Tensor, labels: Tensor, idx: Tensor, *,
                 batch_size: int, lr: float, betas: tuple[float, float],
                 schedule: Callable[[torch.optim.Optimizer], object]) -> None:
        dev = x.device
        self.clf, self.x, self.labels, self.n = clf, x, labels, idx.numel()
        self.lr, self.betas = torch.tensor(float(lr), device=dev), tuple(betas)
        cuda = dev.type == "cuda"
        # CUDA: the fused kernel, capturable (it reads lr and its step counts from the
        # device). The CPU runs the reference formulas, one tensor at a time, uncaptured.
        self.opt = torch.optim.AdamW(clf.parameters(), lr=self.lr, betas=self.betas,
                                     weight_decay=0.0, fused=cuda or None,
                                     foreach=None if cuda else False, capturable=cuda)
        self.sched = schedule(self.opt)
        self._check_schedule()
        self.batch_size = batch_size
        self.steps_per_epoch = math.ceil(self.n / batch_size)
        # An epoch's token ids, padded with -1 to whole batches; the graph reads ``rows``.
        self.padded = torch.full((self.steps_per_epoch * batch_size,), -1, dtype=torch.long,
                                 device=dev)
        self.rows = torch.full((batch_size,), -1, dtype=torch.long, device=dev)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)

    def step(self) -> None:
        """One optimizer step on the batch in ``rows``; grads are set to None beforehand
        when run uncaptured, and refilled in place by a replay."""
        loss, n = batch_loss(self.clf, self.x, self.labels, self.rows)
        loss.backward()
        self.opt.step()
        self.loss_sum.add_(loss.detach().double() * n)

    def run(self, orders: Iterable[Tensor], progress=None, *, graphed: bool) -> float:
        """Every epoch of ``orders`` (each a permutation of the training token ids); the last
        epoch's mean loss. ``progress()`` after every step."""
        side = capture_stream(self.x.device) if graphed else None
        graph, done = None, 0
        for order in orders:
            self.loss_sum.zero_()
            self.padded[:self.n].copy_(order)
            for start in range(0, self.n, self.batch_size):
                self.rows.copy_(self.padded[start:start + self.batch_size])
                if not graphed or done < WARMUP_STEPS:
                    self._uncaptured(side)
                else:
                    if graph is None:
                        graph = self._capture(side)
                    graph.replay()
                self.sched.step()
                self._check_schedule()
                done += 1
                if progress is not None:
                    progress()
        loss = float(self.loss_sum) / self.n  # waits for the last replay
        # The grads live in the graph's memory pool: let it go with the graph.
        self.opt.zero_grad(set_to_none=True)
        return loss

    def _check_schedule(self) -> None:
        """The scheduler left the learning rate in the tensor a graph reads, and the betas
        where the graph froze them."""
        group = self.opt.param_groups[0]
        if group["lr"] is not self.lr:
            raise RuntimeError("the scheduler replaced the optimizer's lr tensor; the graph "
                               "would not see its schedule")
        if tuple(group["betas"]) != self.betas:
            raise RuntimeError(f"the scheduler moved AdamW's betas to {group['betas']} (from "
                               f"{self.betas}); a captured step keeps them as captured "
                               "(cycle_momentum=False keeps OneCycleLR off them)")

    def _uncaptured(self, side: torch.cuda.Stream | None) -> None:
        if side is None:
            self.opt.zero_grad(set_to_none=True)
            self.step()
            return
        current = torch.cuda.current_stream(side.device)
        side.wait_stream(current)
        with torch.cuda.stream(side), warnings.catch_warnings():
            # torch warns that a capturable optimizer steps uncaptured: these are the
            # warm-up steps before its capture.
            warnings.filterwarnings("ignore", message="This instance was constructed with "
                                    "capturable=True")
            self.opt.zero_grad(set_to_none=True)
            self.step()
        current.wait_stream(side)

    def _capture(self, side: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        """``step`` captured (not run). Grads are None first, so that backward allocates them
        from the graph's pool and every replay writes the same ones."""
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # capture_begin / capture_end rather than torch.cuda.graph, which synchronises the
        # whole device and empties the allocator's cache first: that would wait for the
        # layer that tools/layer_reader.py reads ahead on its own stream, and free memory
        # that the next layer allocates again. "thread_local": that reader's thread may
        # synchronise its own stream meanwhile, which the default "global" mode forbids.
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.step()
            finally:
                graph.capture_end()
        return graph
