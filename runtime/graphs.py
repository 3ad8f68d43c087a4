"""CUDA graphs for dense decode steps: one captured forward per padded batch size.

A decode step of a resident model is a few hundred small kernels, and at batch 1 their
launches cost more host time than the GPU spends reading the weights. ``DecodeGraphs``
captures the span's forward (embeddings on a first stage, then every layer) for one token
per row, once per batch bucket (1, 2, 4, ...), and replays it: the host then pays a few
small copies into the graph's input buffers and one launch.

What makes the forward capturable: every tensor it touches has a fixed address (weights,
the preallocated KV cache, the static input buffers) and no shape depends on the data.
Attention is the one place a shape would: the eager path gathers each row's cached prefix
up to the step's longest one. Under capture (``Batch.fixed_shape``) attention instead runs
the decode kernel (kernels/sparse_attention.py) over every head, which reads each row's
prefix in place up to the row's own position, taken from a device tensor.

Rows beyond the step's batch (padding up to the bucket) repeat the first row: they write
the same keys and values at the same place, so they change nothing.

Used only where all of this holds: CUDA, float16 or bfloat16, no sparsity (selections are
data-dependent), no offloaded layers, no stored attention inputs, and one new token per
row without prompt scoring. Any other step runs eagerly, unchanged.

What this module does not know: sampling (the stage does it on the graph's output) or
where steps come from.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import Batch, KVCache, OPTModel
from .step import Step

DTYPES = (torch.float16, torch.bfloat16)


def bucket(n: int) -> int:
    """The padded batch size a step of ``n`` rows runs at: the next power of two."""
    return 1 << (n - 1).bit_length()


class _Captured:
    """One graph: static inputs, the captured forward, its output."""

    def __init__(self, model: OPTModel, cache: KVCache, rows: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model, self.cache = model, cache
        c = model.config.hidden_size
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.hidden = torch.zeros((rows, 1, c), dtype=dtype, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None

    def _forward(self) -> Tensor:
        batch = Batch(self.positions, self.slots, self.cache, fixed_shape=True)
        h = self.model.embed(self.ids, self.positions) if self.model.is_first else self.hidden
        return self.model.run_layers(h, batch)

    def capture(self) -> None:
        """Warm up on a side stream (kernel compilation, cuBLAS workspaces), then capture.
        The inputs must already hold a real step: warm-up writes its keys and values,
        exactly what running that step writes."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._forward()

    def replay(self) -> Tensor:
        assert self.graph is not None and self.out is not None
        self.graph.replay()
        return self.out


class DecodeGraphs:
    def __init__(self, model: OPTModel, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        param = next(p for p in model.parameters() if not p.is_meta)
        self.device, self.dtype = param.device, param.dtype
        self.graphs: dict[int, _Captured] = {}
        self.enabled = (self.device.type == "cuda" and self.dtype in DTYPES
                        and cache.inputs is None
                        and not any(p.is_meta for p in model.parameters()))

    def accepts(self, step: Step, sparse: bool) -> bool:
        return (self.enabled and not sparse and len(step.rows) <= self.cache.slots
                and all(len(r.tokens) == 1 and not r.score for r in step.rows))

    @torch.inference_mode()
    def forward(self, step: Step, hidden: Tensor | None) -> Tensor:
        """This span's output hidden [B, 1, C] for a decode step."""
        n = len(step.rows)
        rows = min(bucket(n), self.cache.slots)
        pad = [0] * (rows - n)  # padding repeats row 0
        order = list(range(n)) + pad
        g = self.graphs.get(rows)
        fresh = g is None
        if g is None:
            g = self.graphs[rows] = _Captured(self.model, self.cache, rows, self.device,
                                              self.dtype)
        host = torch.tensor([[step.rows[i].slot, step.rows[i].start, step.rows[i].tokens[0]]
                             for i in order], dtype=torch.long)
        host = host.to(self.device, non_blocking=False)
        g.slots.copy_(host[:, 0])
        g.positions.copy_(host[:, 1:2])
        if self.model.is_first:
            g.ids.copy_(host[:, 2:3])
        else:
            if hidden is None:
                raise ValueError("a stage without the embeddings needs the previous hidden state")
            hidden = hidden.to(self.device, self.dtype)
            g.hidden[:n].copy_(hidden[:, :1])
            if pad:
                g.hidden[n:].copy_(hidden[:1, :1].expand(rows - n, -1, -1))
        if fresh:
            g.capture()
        return g.replay()[:n].clone()
