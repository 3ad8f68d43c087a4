"""CPU fast paths: the sparse MLP reading only the selected neurons' rows, and how many
threads a CPU stage computes with.

On a CPU a decode step is bound by the bytes it reads from memory, so the sparse MLP is
worth only what it does not read. Its reference (``sparse.gathered_mlp_reference``) gathers fc2's
columns with ``index_select(1, idx)``: a strided gather, one element per row of fc2, which
on a 2-core EPYC cost more than the dense product at 20% of the neurons. Here a neuron's
fc2 column is a contiguous row of ``fc2_rows`` (fc2 transposed, [F, C], made once per layer
by ``OPTDecoderLayer.fc2_rows``), so:

- fc1: ``index_select`` of whole rows (one contiguous copy per neuron) and a small GEMV;
- fc2: for a few token rows, ``embedding_bag`` sums the selected rows weighted by the
  activations, reading each row in place with no gathered copy; for more token rows, the
  rows are gathered once and multiplied (a GEMM reads them once for every token).

Threads (``stage_threads``): a CPU stage leaves one core to everything else (the
scheduler, detokenizing, a chat client, other users). Torch's OpenMP threads meet at a
barrier after every op, so when one of them loses its core the whole op waits a scheduler
time slice: on the 2-core machine, with other processes running, a decode step of the
shipped model took 400-650 ms with 2 threads and 25-40 ms with 1 (bench/NOTES.md).

What this module does not know: which neurons are selected or why (runtime/sparse.py), and
any device but the CPU (GPU steps use the Triton kernels, runtime/sparse_backend.py).

Shapes: M token rows, C hidden, F ffn dim, n selected neurons.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

# Up to this many token rows, fc2 is an embedding_bag over rows read in place (it reads
# every selected row once per token row); above it, one gathered copy and a GEMM.
BAG_ROWS = 4


def gathered_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2_rows: Tensor,
                 b2: Tensor | None, idx: Tensor) -> Tensor:
    """fc2(relu(fc1(x))) over neurons ``idx`` [n] (int64, sorted or not): x [..., C],
    w1 [F, C] (fc1.weight), w2_rows [F, C] (fc2.weight transposed, contiguous). Returns
    [..., C]; equals ``sparse.gathered_mlp_reference``."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [M, C]
    rows = x2.shape[0]
    bias1 = b1.index_select(0, idx) if b1 is not None else None
    h = F.relu(F.linear(x2, w1.index_select(0, idx), bias1))  # [M, n]
    if rows <= BAG_ROWS:
        out = F.embedding_bag(idx.expand(rows, -1), w2_rows, per_sample_weights=h,
                              mode="sum")  # [M, C]
    else:
        out = h @ w2_rows.index_select(0, idx)
    if b2 is not None:
        out = out + b2
    return out.view(shape)


def stage_threads(cores: int | None = None, current: int | None = None) -> int:
    """Intra-op threads for a CPU stage: one fewer than the cores this process may run on,
    at least one, and never more than torch would use (``current``, default: now)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    if current is None:
        current = torch.get_num_threads()
    return max(1, min(current, cores - 1))
