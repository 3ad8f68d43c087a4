"""CPU fast paths: the sparse MLP reading only the selected neurons' rows, weights stored as
the CPU's one-row products read them fastest, greedy decoding that reads the LM head mostly
as int8, and how many threads a CPU stage computes with.

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
from torch import Tensor, nn

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


def store_for_gemv(linear: nn.Linear) -> None:
    """Keep a CPU weight with more outputs than inputs (a predictor's [F, r] up-projection)
    as the transpose of a contiguous [in, out] tensor: same values, shape and parameter,
    other strides. MKL's one-row product over a row-major [n, r] with n >> r ran at under
    half the bandwidth of the transposed storage on the 2-core EPYC (a predictor's 2048 x
    128: 164 against 63 us per layer); square and wide weights gain nothing."""
    w = linear.weight
    if w.device.type != "cpu" or w.shape[0] <= w.shape[1] or w.stride() == (1, w.shape[0]):
        return
    with torch.no_grad():
        linear.weight = nn.Parameter(w.detach().t().contiguous().t(),
                                     requires_grad=w.requires_grad)


def fuse_projections(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None] | None:
    """Store CPU linears that share their input (q/k/v_proj) side by side, in one contiguous
    [in, sum(out)] table: each weight becomes its transposed slice (same values and shape,
    other strides), each bias a slice of one vector; memory is unchanged once the old
    tensors are freed. Returns (the weights together [sum(out), in], a view of the table,
    the biases together or None), or None where the biases are mixed.

    One product over the table replaces three, and reads it the fastest way (see
    ``store_for_gemv``): q, k and v of the shipped model took 1.3 ms per token this way
    against 2.2 ms as three row-major products (7 layers, 1 thread)."""
    biases = [lin.bias for lin in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    with torch.no_grad():
        table = torch.cat([lin.weight.detach() for lin in linears]).t().contiguous()
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        start = 0
        for lin in linears:
            end = start + lin.out_features
            lin.weight = nn.Parameter(table[:, start:end].t(),
                                      requires_grad=lin.weight.requires_grad)
            if bias is not None:
                lin.bias = nn.Parameter(bias[start:end], requires_grad=lin.bias.requires_grad)
            start = end
    return table.t(), bias


def is_fused(linears: list[nn.Linear], weight: Tensor, bias: Tensor | None) -> bool:
    """Whether ``linears`` are still the slices ``fuse_projections`` made of these tensors
    (not replaced since: moved, cast, reloaded)."""
    start = 0
    for lin in linears:
        w = lin.weight
        if w.data_ptr() != weight[start].data_ptr() or w.stride() != weight.stride() \
                or w.dtype != weight.dtype:
            return False
        if bias is not None and (lin.bias is None
                                 or lin.bias.data_ptr() != bias[start:].data_ptr()):
            return False
        start += lin.out_features
    return True


# --- greedy decoding without reading all of the LM head in float32 -------------------------

# The approximate logits' error bound is taken this many times over (float32 accumulation,
# rounding of the bound's own terms), and checked at construction to hold with room to spare.
SCREEN_SAFETY = 2.0
# More candidates than this (near-uniform logits) are not worth gathering: the full product.
SCREEN_MAX_CANDIDATES = 512


class GreedyHead:
    """argmax(head @ x), exactly, reading the head mostly as int8 (a quarter of the bytes).

    The reference is the full float32 product and its argmax. Here an int8 copy of the head
    (per-row scales, torch's weight-only int8 GEMM) gives approximate logits ``a`` and, per
    token v, a bound ``b_v >= |a_v - l_v|`` on the distance to the float32 logit ``l_v``:

        |a_v - l_v| <= ||w'_v|| ||x' - x|| + ||w'_v - w_v|| ||x|| + |rounding of a_v|

    with w' the dequantized row (its error ||w'_v - w_v|| computed exactly once) and x' the
    input rounded to bfloat16. Whatever token has the largest ``l`` satisfies
    ``a_v + b_v >= max_u (a_u - b_u)``; the few tokens that do are the candidates, their
    logits are computed again in float32 from their rows, and the largest wins. So the
    token equals the reference's (both up to float32 rounding of near-ties).

    The bound assumes the int8 product accumulates in float32, as torch's CPU kernel does;
    ``exact_only`` is set, and every call takes the reference path, if the kernel is missing
    or a check on random inputs at construction finds an error outside the bound.
    """

    def __init__(self, weight: Tensor) -> None:  # weight [V, E] float32 or float64
        self.key = tensor_key(weight)
        w = weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        self.scales = scale.to(torch.bfloat16)  # [V]
        scales = self.scales.float()[:, None]
        self.q = torch.round(w / scales).clamp_(-127, 127).to(torch.int8)
        # int8 times a bfloat16 scale is exact in float32: w' itself, not an approximation.
        dequant = self.q.float().mul_(scales)  # [V, E]
        self.norms = dequant.norm(dim=1)  # ||w'_v||
        self.errors = dequant.sub_(w).norm(dim=1)  # ||w'_v - w_v||
        try:
            self.exact_only = not self._bound_holds(weight.detach())
        except (RuntimeError, NotImplementedError):  # no int8 kernel in this build
            self.exact_only = True

    def matches(self, weight: Tensor) -> bool:
        return self.key == tensor_key(weight)

    def _approx(self, x: Tensor, safety: float) -> tuple[Tensor, Tensor]:
        """Approximate logits a [M, V] and their bounds b [M, V] for x [M, E]."""
        xr = x.to(torch.bfloat16)
        a = torch._weight_int8pack_mm(xr, self.q, self.scales).float()
        x64 = x.double()
        dx = (xr.double() - x64).norm(dim=-1, keepdim=True)  # [M, 1]
        # float32 accumulation over E terms: at most E * 2^-24 of sum |w'||x'|.
        dx += x.shape[-1] * 2.0**-24 * xr.double().norm(dim=-1, keepdim=True)
        xn = x64.norm(dim=-1, keepdim=True)
        b = self.norms * (safety * dx).float() + self.errors * (safety * xn).float()
        return a, b.add_(a.abs(), alpha=safety * 2.0**-8)  # + the bfloat16 output's rounding

    def _bound_holds(self, weight: Tensor) -> bool:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, weight.shape[1], generator=g, dtype=torch.float64).to(weight.dtype)
        a, b = self._approx(x, 1.0)
        return bool(((a - F.linear(x, weight).float()).abs() <= b / 2).all())

    def __call__(self, weight: Tensor, x: Tensor) -> Tensor:
        """x [M, E] -> the greedy token of each row [M] (int64)."""
        if self.exact_only:
            return F.linear(x, weight).argmax(-1)
        a, b = self._approx(x, SCREEN_SAFETY)
        floor = (a - b).amax(-1, keepdim=True)  # [M, 1]: some token's logit is at least this
        tokens = []
        for row in range(x.shape[0]):
            cand = (a[row] + b[row] >= floor[row]).nonzero().squeeze(1)  # sorted ids
            if cand.numel() > SCREEN_MAX_CANDIDATES:
                tokens.append(F.linear(x[row], weight).argmax())
                continue
            exact = F.linear(x[row], weight.index_select(0, cand))
            tokens.append(cand[exact.argmax()])
        return torch.stack(tokens)


def tensor_key(t: Tensor) -> tuple:
    """What changes when a tensor is moved, cast, replaced or written in place."""
    # Tensors made under inference_mode have no version counter; they cannot be written in
    # place outside it either, so their address tells every change.
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), version, t.device, t.dtype, t.shape, t.stride())


def greedy_screen_applies(weight: Tensor) -> bool:
    """A CPU head stored in float32 or float64, where int8 reads a quarter of the bytes. Its
    width must be a multiple of 16: torch 2.13's CPU int8 kernel returns garbage or crashes
    on other widths (every OPT's is)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64)
            and weight.shape[1] % 16 == 0)
