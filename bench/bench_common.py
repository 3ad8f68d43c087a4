"""Shared pieces of `dejavu-run bench`: OPT layer shapes, timers, the synthetic selection
law, and the measured ceilings (HBM copy and host-to-device bandwidth).

Timers: on a GPU, CUDA-graph replays timed with CUDA events (median of repeats), so launch
overhead is out of the kernel numbers; eager code is timed with events around the whole
region. On a CPU (the --small dry run) a wall clock, once: those numbers mean nothing and
the results say so.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    heads: int
    layers: int
    vocab: int = 50272

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        c, f = self.hidden, self.ffn
        return 4 * c * c + 4 * c + 2 * c * f + f + c


SHAPES = {
    "opt-6.7b": Shape("opt-6.7b", 4096, 16384, 32, 32),
    "opt-13b": Shape("opt-13b", 5120, 20480, 40, 40),
    "opt-30b": Shape("opt-30b", 7168, 28672, 56, 48),
    "opt-66b": Shape("opt-66b", 9216, 36864, 72, 64),
}
TINY = Shape("tiny", 64, 256, 4, 4, vocab=512)  # the CPU dry run


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def time_graph(fn: Callable[[], object], *, reps: int = 20, warmup: int = 2) -> float:
    """Seconds per call of ``fn`` (GPU work only), through a captured CUDA graph."""
    if not cuda():
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles, allocator) off the capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    sync()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_eager(fn: Callable[[], object], *, reps: int = 5, warmup: int = 1) -> float:
    """Seconds per call, eager launches included (events around each call; median)."""
    for _ in range(warmup):
        fn()
    sync()
    if not cuda():
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def hbm_copy_bandwidth(nbytes: int = 2 << 30) -> float | None:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if not cuda():
        return None
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    # Half a second of copies first: an idle GPU starts at low clocks (a first run without
    # this read 2.77 TB/s on an H200 whose cuBLAS GEMVs then read 3.4 TB/s).
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        b.copy_(a)
        sync()
    t = time_graph(lambda: b.copy_(a), reps=20)
    return 2 * nbytes / t


def hbm_read_bandwidth(nbytes: int = 4 << 30) -> float | None:
    """Read-only bandwidth in bytes/s: a sum over a large fp16 tensor (the ceiling for
    kernels that read weights and write almost nothing)."""
    if not cuda():
        return None
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    t = time_graph(lambda: a.sum(dtype=torch.float32), reps=20)
    return nbytes / t


def h2d_bandwidth(nbytes: int = 1 << 30) -> float | None:
    """Pinned host-to-device copy bandwidth in bytes/s (one large copy)."""
    if not cuda():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t = time_eager(lambda: dev.copy_(host, non_blocking=True), reps=5)
    return nbytes / t


@dataclass(frozen=True)
class SelectionLaw:
    """Synthetic per-token selections: each token picks ``density`` of the n rows by
    weighted sampling without replacement, row of rank r weighted r^-skew (Zipf-like); the
    ranks are a fixed random permutation of the ids. Firing frequencies then fall off as a
    power law: a few rows fire on almost every token, most rarely."""

    density: float
    skew: float

    def weights(self, n: int, generator: torch.Generator) -> Tensor:
        ranks = torch.randperm(n, generator=generator).double() + 1.0
        return ranks ** -self.skew

    def sample(self, weights: Tensor, tokens: int, generator: torch.Generator) -> Tensor:
        """[tokens, k] selected ids (int64, CPU)."""
        k = max(1, round(self.density * weights.numel()))
        return torch.multinomial(weights.expand(tokens, -1).float(), k, replacement=False,
                                 generator=generator)


def frequencies(selections: Tensor, n: int) -> Tensor:
    """Measured firing frequency of each of n rows from [tokens, k] selections."""
    counts = torch.bincount(selections.reshape(-1), minlength=n).double()
    return counts / selections.shape[0]


def gb(x: float | None) -> float | None:
    return None if x is None else round(x / 1e9, 2)


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(), "torch": torch.__version__,
        "host": platform.machine(), "cpu_count": os.cpu_count(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    if cuda():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   sm_count=p.multi_processor_count, cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env.update(gpu=None, driver=None)
    try:
        import accelerate
        env["accelerate"] = accelerate.__version__
    except ImportError:
        env["accelerate"] = None
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env
