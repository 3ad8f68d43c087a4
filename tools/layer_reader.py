"""Read a checkpoint's decoder layers one at a time, the next one in the background.

``LayerReader.take(l)`` returns layer l's one-layer span (``checkpoint.load_model``: only
its tensors, straight from safetensors to the device), its ``layer_hash`` and the MLP
predictor's starting weights (``train_predictors.mlp_start``: on the closed-form default,
an eigendecomposition of fc1's Gram matrix), and asks one worker thread for layer l + 1,
which it reads and prepares while the caller runs layer l. At most two layers are alive:
the one taken and the one being read. Without ``ahead`` every layer is read when taken,
on the caller's thread (the slow, obviously correct twin).

On CUDA the worker issues its copies and kernels on a stream of its own and waits for them
before handing the layer over, so the caller's stream never waits for a read, and the
caller's kernels are not queued behind the worker's.

What this module does not know: what the layers are run for (train_layerwise) or how the
predictors are fitted (train_predictors).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..runtime.checkpoint import load_model
from ..runtime.model import OPTModel
from ..runtime.predictors import layer_hash
from .train_predictors import TrainConfig, mlp_start


@dataclass
class ReadLayer:
    layer: int
    span: OPTModel
    lhash: str
    mlp_start: dict[str, Tensor] | None  # the MLP predictor's starting weights, or None
    seconds: dict[str, float] = field(default_factory=dict)  # load_s, init_s where it ran


class LayerReader:
    def __init__(self, model_dir: Path, cfg: TrainConfig, *, dtype: torch.dtype,
                 device: torch.device, layers: int, ahead: bool = True) -> None:
        self.model_dir, self.cfg, self.dtype, self.device = model_dir, cfg, dtype, device
        self.layers = layers
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="layer-reader") if ahead else None
        self.stream = torch.cuda.Stream(device) if ahead and device.type == "cuda" else None
        self.pending: dict[int, Future] = {}

    def take(self, layer: int) -> ReadLayer:
        """Layer ``layer``, ready on the device; asks for ``layer + 1`` in the background."""
        if self.pool is None:
            return self._read(layer)
        future = self.pending.pop(layer, None) or self.pool.submit(self._read, layer)
        got = future.result()
        if self.stream is not None:
            # The weights were allocated on the worker's stream and will be read and freed
            # on the caller's: the allocator must not hand them back to the worker's next
            # read before the caller's kernels on them are done.
            current = torch.cuda.current_stream(self.device)
            for t in got.span.state_dict().values():
                t.record_stream(current)
        if layer + 1 < self.layers:
            self.pending[layer + 1] = self.pool.submit(self._read, layer + 1)
        return got

    def _read(self, layer: int) -> ReadLayer:
        if self.stream is None:
            return self._prepare(layer)
        with torch.cuda.stream(self.stream):
            got = self._prepare(layer)
            self.stream.synchronize()  # the caller gets weights that have landed
        return got

    def _prepare(self, layer: int) -> ReadLayer:
        t0 = time.perf_counter()
        span = load_model(self.model_dir, layers=range(layer, layer + 1), dtype=self.dtype,
                          device=self.device)
        t1 = time.perf_counter()
        block = span.layers()[0]
        lhash, start = layer_hash(block), mlp_start(block, self.cfg)
        return ReadLayer(layer, span, lhash, start,
                         {"load_s": t1 - t0, "init_s": time.perf_counter() - t1})

    def close(self) -> None:
        """Drop the read ahead (a layer being read finishes first)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
