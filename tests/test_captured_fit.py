"""The captured fit (tools/captured_fit.py) against the eager fit (train_predictors.fit).

On the CPU: the padded batch's loss, the schedule written into the tensors a graph reads,
and the padded steps run uncaptured against the eager reference. On CUDA (marked gpu): the
captured fit against the eager fit on the same data and seed.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from dejavu.runtime.predictors import LowRankClassifier
from dejavu.tools import captured_fit
from dejavu.tools.captured_fit import PaddedSteps, batch_loss
from dejavu.tools.train_predictors import BETAS, TrainConfig, epoch_orders, fit, schedule

HIDDEN, RANK, OUT = 48, 8, 12


def classifier(seed: int = 0) -> LowRankClassifier:
    torch.manual_seed(seed)
    return LowRankClassifier(HIDDEN, RANK, OUT)


def tables(tokens: int, seed: int = 1, device: str = "cpu"):
    """float16 inputs and bool labels that depend on them (so the fit has something to
    learn and its loss falls), with training token ids in a shuffled subset."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g).half()
    w = torch.randn(HIDDEN, OUT, generator=g)
    labels = (x.float() @ w + 0.5 * torch.randn(tokens, OUT, generator=g)) > 0.3
    idx = torch.randperm(tokens, generator=g)[: tokens - tokens // 5]
    return x.to(device), labels.to(device), idx.to(device)


def schedule_for(cfg: TrainConfig, n: int, epochs: int):
    return lambda opt: schedule(opt, cfg.lr, epochs * math.ceil(n / cfg.batch_size))


def padded_steps(clf, x, labels, idx, cfg: TrainConfig, sched=None) -> PaddedSteps:
    return PaddedSteps(clf, x, labels, idx, batch_size=cfg.batch_size, lr=cfg.lr, betas=BETAS,
                       schedule=sched or schedule_for(cfg, idx.numel(), cfg.epochs))


def test_a_padded_batch_weighs_only_its_rows():
    clf = classifier()
    x, labels, _ = tables(40)
    rows = torch.tensor([3, 17, 5, 30, 11])

    def eager(ids):
        clf.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(clf(x[ids].float()), labels[ids].float())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in clf.parameters()]

    def padded(ids):
        clf.zero_grad(set_to_none=True)
        loss, n = batch_loss(clf, x, labels, ids)
        loss.backward()
        return loss.detach(), n, [p.grad.clone() for p in clf.parameters()]

    # a full batch: exactly the plain mean (both factors are 1)
    ref_loss, ref_grads = eager(rows)
    loss, n, grads = padded(rows)
    assert n.item() == 5 and torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    # the same rows padded to 8 (padding gathers token 0, which must weigh nothing)
    loss, n, grads = padded(torch.cat([rows, torch.full((3,), -1)]))
    assert n.item() == 5
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_schedule_is_written_into_the_tensor_a_graph_reads():
    # Each step the scheduler must leave lr in the optimizer's own tensor (a graph reads its
    # memory), with the value it gives an optimizer of floats, and the betas where a graph
    # froze them.
    cfg = TrainConfig(batch_size=8, epochs=3)
    x, labels, idx = tables(50)
    steps = padded_steps(classifier(), x, labels, idx, cfg)
    lr_ptr = steps.lr.data_ptr()
    twin_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    twin = schedule_for(cfg, idx.numel(), cfg.epochs)(twin_opt)
    seen = []

    def check():
        twin_opt.step()
        twin.step()
        group, want = steps.opt.param_groups[0], twin_opt.param_groups[0]
        assert group["lr"] is steps.lr and steps.lr.data_ptr() == lr_ptr
        assert steps.lr.item() == pytest.approx(want["lr"], rel=1e-6)
        assert group["betas"] == BETAS == want["betas"]
        seen.append(steps.lr.item())

    steps.run(epoch_orders(idx, cfg.epochs, cfg.seed), check, graphed=False)
    assert len(seen) == cfg.epochs * math.ceil(idx.numel() / cfg.batch_size)
    assert max(seen) > 10 * min(seen)  # the one cycle moved the learning rate


@pytest.mark.parametrize("steps", [1, 9, 10, 11, 20])
def test_the_schedule_runs_any_number_of_steps(steps):
    # OneCycleLR with a 10% warm-up divides by zero at exactly 10 steps (a fit of 5 batches
    # for 2 epochs was a ZeroDivisionError from the scheduler).
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = schedule(opt, 0.02, steps)
    lrs = []
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert all(0 < lr <= 0.02 for lr in lrs[:-1])


def test_a_schedule_that_moves_beta1_is_refused():
    # OneCycleLR's default cycles beta1, which a captured step would keep at its capture
    # value: refused at once, not followed wrongly.
    cfg = TrainConfig(batch_size=8, epochs=3)
    x, labels, idx = tables(50)
    cycling = lambda opt: torch.optim.lr_scheduler.OneCycleLR(  # noqa: E731
        opt, max_lr=cfg.lr, total_steps=60)
    with pytest.raises(RuntimeError, match="betas"):
        padded_steps(classifier(), x, labels, idx, cfg, cycling)


# Whole batches, a partial last batch, less than one batch (OneCycleLR needs > 10 steps).
@pytest.mark.parametrize(("tokens", "epochs"), [(40, 3), (47, 3), (8, 12)])
def test_padded_steps_uncaptured_match_the_eager_fit(tokens, epochs):
    cfg = TrainConfig(batch_size=8, epochs=epochs)
    x, labels, idx = tables(tokens)
    ref = classifier()
    ref_loss = fit(ref, x, labels, idx, cfg, torch.device("cpu"))
    clf = classifier()
    steps = padded_steps(clf, x, labels, idx, cfg)
    loss = steps.run(epoch_orders(idx, cfg.epochs, cfg.seed), graphed=False)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    moved = 0.0
    for (name, a), b in zip(clf.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, float((b - classifier().state_dict()[name]).abs().max()))
    assert moved > 1e-3  # the fit changed the weights: the comparison means something


def test_epoch_orders_are_one_generators_permutations():
    idx = torch.arange(100, 137)
    g = torch.Generator().manual_seed(7)
    want = [idx[torch.randperm(idx.numel(), generator=g)] for _ in range(3)]
    got = list(epoch_orders(idx, 3, 7))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)) and len(got) == 3


def test_the_cpu_fit_is_not_captured(monkeypatch):
    x, labels, idx = tables(20)
    assert "not on CUDA" in captured_fit.unsupported(classifier(), x, labels, idx)
    monkeypatch.setattr(captured_fit, "ENABLED", False)
    assert "off" in captured_fit.unsupported(classifier(), x, labels, idx)


# --- CUDA -------------------------------------------------------------------------------

# Captured and eager steps differ in float32 rounding (the padded last batch's sums over
# more rows), which Adam carries on: on the CPU the twin's weights differ by ~1e-7, while a
# graph that froze a moving beta1 missed by ~1e-2 (when the schedule still cycled it).
GPU_RTOL, GPU_ATOL = 1e-3, 1e-4


@pytest.fixture
def float32_matmuls():
    """Full float32 matmuls (another test may have allowed TF32 for the session): the
    tolerances are float32's."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Whole batches, a partial last batch, less than one batch (OneCycleLR needs > 10 steps).
@pytest.mark.parametrize(("tokens", "epochs"), [(400, 3), (437, 3), (29, 12)])
def test_gpu_captured_fit_matches_the_eager_fit(tokens, epochs, monkeypatch, float32_matmuls):
    monkeypatch.setattr(captured_fit, "ENABLED", True)
    dev = torch.device("cuda")
    cfg = TrainConfig(batch_size=32, epochs=epochs)
    x, labels, idx = tables(tokens, device="cuda")
    ref = classifier()
    # a function for the labels: the eager steps (the reference on CUDA)
    ref_loss = fit(ref, x, lambda rows: labels[rows], idx, cfg, dev)
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay",
                        lambda self: (replays.append(1), replay(self))[1])
    clf, calls = classifier(), []
    assert captured_fit.unsupported(clf.to(dev), x, labels, idx) is None
    loss = fit(clf, x, labels, idx, cfg, dev, progress=lambda: calls.append(1))
    steps = cfg.epochs * math.ceil(idx.numel() / cfg.batch_size)
    assert len(calls) == steps
    assert len(replays) == max(steps - captured_fit.WARMUP_STEPS, 0)
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    start = classifier().state_dict()
    for (name, a), b in zip(clf.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=GPU_RTOL, atol=GPU_ATOL, msg=name)
        assert float((b.cpu() - start[name]).abs().max()) > 1e-2  # the fit moved it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_capture_needs_a_table_on_the_device(monkeypatch):
    monkeypatch.setattr(captured_fit, "ENABLED", True)
    x, labels, idx = tables(50, device="cuda")
    clf = classifier().cuda()
    assert captured_fit.unsupported(clf, x, labels, idx) is None
    assert "function" in captured_fit.unsupported(clf, x, lambda rows: labels[rows], idx)
    assert "not all on" in captured_fit.unsupported(clf, x.cpu(), labels, idx)
    assert "not all on" in captured_fit.unsupported(clf, x, labels.cpu(), idx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fits_capture_beside_a_thread_busy_on_a_pool_stream(float32_matmuls):
    """train-predictors' 32nd layer failed to capture ("capturing stream has unjoined work"):
    each fit took a fresh stream from torch's pool, which comes round to the layer reader's
    after 32 takes, and the reader's work, issued from its thread, joined the capture. Here a
    thread keeps a pool stream busy, as the reader does, while 34 fits capture one after
    another; each must still match the eager fit."""
    dev = torch.device("cuda")
    cfg = TrainConfig(batch_size=32, epochs=3)
    x, labels, idx = tables(100, device="cuda")
    ref = classifier()
    fit(ref, x, lambda rows: labels[rows], idx, cfg, dev)
    busy, stop, errors = torch.cuda.Stream(dev), threading.Event(), []

    def reader():
        try:
            with torch.cuda.stream(busy):
                a = torch.randn(512, 512, device=dev)
                while not stop.is_set():
                    for _ in range(8):
                        a = torch.tanh(a @ a)
                    busy.synchronize()
        except RuntimeError as e:  # a capture that took this stream refuses the sync
            errors.append(e)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for _ in range(34):
            clf = classifier()
            fit(clf, x, labels, idx, cfg, dev)
            for (name, a), b in zip(clf.state_dict().items(), ref.state_dict().values(),
                                    strict=True):
                torch.testing.assert_close(a, b, rtol=GPU_RTOL, atol=GPU_ATOL, msg=name)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert captured_fit.capture_stream(dev).cuda_stream != busy.cuda_stream
