"""Which worker owns which layers: contiguous spans chosen by cost within memory budgets.

Each layer costs its weights' bytes in memory (plus its share of the KV cache) and, in
time, about its weights' bytes too (a decode step reads every weight once). The first
worker also holds the embeddings and the last one the final norm and LM head, which the
last one must also run every step (its time cost is the head's bytes). The plan minimises
the slowest stage (the pipeline's throughput bound) subject to each worker's memory
budget, by dynamic programming over split points: exact, and instant for any real depth.

With a GPU budget per worker (``gpu_budget``, [pipeline] gpu_memory_gib) nothing is
refused: the layers are split by cost alone and each worker keeps on its GPU the
embeddings / LM head it holds, the KV cache of all its layers (with the attention inputs
of lazy K/V when steps may skip heads: ``kv_inputs``, runtime/build.py ``steps_skip_heads``)
and an activation margin, then as many whole layers as fit; the
rest are offloaded to pinned host memory (runtime/offload.py's ``plan_offload``, which the
worker runs with ``offload_reserved_bytes`` below, so that the plan and the worker agree).
Offloaded layers are slower than resident ones; the cost model does not know that yet.

What this module does not know: devices. A budget is a number of bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.opt_config import OPTConfig
from ..runtime.sizes import (
    embed_bytes,
    head_bytes,
    kv_bytes_per_layer,
    layer_bytes,
    offload_reserved_bytes,
    size,
    stream_buffer_bytes,
)
from ..runtime.weight_store import GIB


class PlanError(ValueError):
    """No split fits: names the worker, its budget and what it would need."""


@dataclass(frozen=True)
class StagePlan:
    index: int
    layers: range
    memory_bytes: int
    cost: float  # relative time of one decode step (bytes read)
    budget_bytes: int | None
    offloaded: int = 0  # with a GPU budget: layers of the span held in host memory
    host_bytes: int = 0  # their weights (read row by row from pinned memory)


@dataclass(frozen=True)
class Plan:
    stages: list[StagePlan]
    num_layers: int
    offload: bool = False  # planned with a GPU budget (StagePlan.offloaded is meaningful)

    def spans(self) -> list[range]:
        return [s.layers for s in self.stages]

    def describe(self) -> str:
        worst = max(s.cost for s in self.stages)
        lines = [f"plan: {self.num_layers} layers over {len(self.stages)} worker(s)"]
        for s in self.stages:
            budget = ("no budget" if s.budget_bytes is None
                      else f"budget {size(s.budget_bytes)}")
            count = f"{len(s.layers)} layers"
            if self.offload:
                count += (f": {len(s.layers) - s.offloaded} resident, {s.offloaded} offloaded"
                          f" = {size(s.host_bytes)} in host memory")
                budget = "GPU " + budget
            lines.append(
                f"  worker {s.index}: layers [{s.layers.start}, {s.layers.stop}) "
                f"({count}), memory {size(s.memory_bytes)} ({budget}), "
                f"relative step time {s.cost / worst:.2f}"
            )
        return "\n".join(lines)


def offloaded_layers(config: OPTConfig, span: range, budget: int, *, dtype_bytes: int,
                     slots: int, max_len: int, kv_inputs: bool = True) -> int:
    """How many layers of ``span`` a worker with ``budget`` GPU bytes offloads
    (runtime/offload.py's ``plan_offload`` keeps the others, spread over the span). Raises
    PlanError when the budget does not even hold the embeddings / head, KV cache and
    activations."""
    n = config.num_hidden_layers
    first, last = span.start == 0, span.stop == n
    fixed = offload_reserved_bytes(config, len(span), slots, max_len, dtype_bytes,
                                   kv_inputs=kv_inputs)
    if first:
        fixed += embed_bytes(config, dtype_bytes)
    if last:
        fixed += head_bytes(config, dtype_bytes)
        if first and config.tie_word_embeddings:  # one worker: the head is the embedding
            fixed -= config.vocab_size * config.word_embed_proj_dim * dtype_bytes
    left = budget - fixed
    if left < 0:
        parts = ", ".join(p for p, on in (("embeddings", first), ("LM head", last)) if on)
        raise PlanError(
            f"[pipeline] gpu_memory_gib = {budget / GIB:.4g}: the worker of layers "
            f"[{span.start}, {span.stop}) needs {fixed / GIB:.4g} GiB on its GPU before any "
            f"layer ({parts + ', ' if parts else ''}KV cache of {slots} slots x {max_len} "
            "positions, activations); raise gpu_memory_gib or lower [pipeline] slots / "
            "max_len")
    off = max(0, len(span) - left // layer_bytes(config, dtype_bytes))
    # An offloading worker also holds the double buffer prefill streams layers through,
    # unless even offloading every layer leaves no room for it (runtime/offload.py's
    # plan_streaming; prefill then reads rows token by token).
    with_buffer = left - stream_buffer_bytes(config, dtype_bytes)
    if off and with_buffer >= 0:
        off = max(0, len(span) - with_buffer // layer_bytes(config, dtype_bytes))
    return off


def plan_layers(config: OPTConfig, workers: int, *, dtype_bytes: int = 4, slots: int = 8,
                max_len: int = 2048, budgets: list[int | None] | None = None,
                resident_fraction: float = 1.0, gpu_budget: int | None = None,
                kv_inputs: bool = True) -> Plan:
    """Split ``config.num_hidden_layers`` layers into ``workers`` non-empty contiguous spans.

    ``budgets[i]`` is worker i's memory in bytes (None: unlimited). ``gpu_budget``: every
    worker's GPU bytes when layers may be offloaded (then ``budgets`` must be None); spans
    are chosen by cost and each stage says how many of its layers are offloaded."""
    if gpu_budget is not None:
        if budgets is not None and any(b is not None for b in budgets):
            raise PlanError("a GPU budget (gpu_memory_gib) offloads what does not fit; "
                            "per-worker budgets refuse it: give one of them")
        plan = plan_layers(config, workers, dtype_bytes=dtype_bytes, slots=slots,
                           max_len=max_len)
        stages = []
        for s in plan.stages:
            off = offloaded_layers(config, s.layers, gpu_budget, dtype_bytes=dtype_bytes,
                                   slots=slots, max_len=max_len, kv_inputs=kv_inputs)
            host = off * layer_bytes(config, dtype_bytes)
            reserved = offload_reserved_bytes(config, len(s.layers), slots, max_len,
                                              dtype_bytes, kv_inputs=kv_inputs)
            kv = len(s.layers) * kv_bytes_per_layer(config, slots, max_len, dtype_bytes)
            gpu = s.memory_bytes - host + reserved - kv
            buffer = stream_buffer_bytes(config, dtype_bytes)
            if off and gpu + buffer <= gpu_budget:  # the prefill's double buffer fits
                gpu += buffer
            stages.append(StagePlan(s.index, s.layers, gpu, s.cost, gpu_budget, off, host))
        return Plan(stages, plan.num_layers, offload=True)
    n = config.num_hidden_layers
    if not 1 <= workers <= n:
        raise PlanError(f"workers={workers}: expected 1 to {n} (one layer per worker at least)")
    budgets = list(budgets) if budgets is not None else [None] * workers
    if len(budgets) != workers:
        raise PlanError(f"{len(budgets)} memory budgets for {workers} workers")
    per_layer_mem = int(layer_bytes(config, dtype_bytes) * resident_fraction) + \
        kv_bytes_per_layer(config, slots, max_len, dtype_bytes)
    per_layer_cost = float(layer_bytes(config, dtype_bytes))
    emb, head = embed_bytes(config, dtype_bytes), head_bytes(config, dtype_bytes)
    tied_shared = config.tie_word_embeddings and workers == 1

    def stage(i: int, a: int, b: int) -> tuple[int, float]:
        mem = (b - a) * per_layer_mem
        cost = (b - a) * per_layer_cost
        if i == 0:
            mem += emb
        if i == workers - 1:
            mem += head - (config.vocab_size * config.word_embed_proj_dim * dtype_bytes
                           if tied_shared else 0)
            cost += head
        return mem, cost

    inf = float("inf")
    # best[i][b]: the smallest max-cost of workers 0..i-1 covering layers [0, b).
    best = [[inf] * (n + 1) for _ in range(workers + 1)]
    choice = [[-1] * (n + 1) for _ in range(workers + 1)]
    best[0][0] = 0.0
    for i in range(workers):
        for b in range(i + 1, n - (workers - i - 1) + 1):
            for a in range(i, b):
                if best[i][a] == inf:
                    continue
                mem, cost = stage(i, a, b)
                if budgets[i] is not None and mem > budgets[i]:
                    continue
                value = max(best[i][a], cost)
                if value < best[i + 1][b]:
                    best[i + 1][b], choice[i + 1][b] = value, a
    if best[workers][n] == inf:
        raise PlanError(_explain(config, workers, budgets, stage))
    spans, b = [], n
    for i in range(workers, 0, -1):
        a = choice[i][b]
        spans.append(range(a, b))
        b = a
    spans.reverse()
    stages = []
    for i, span in enumerate(spans):
        mem, cost = stage(i, span.start, span.stop)
        stages.append(StagePlan(i, span, mem, cost, budgets[i]))
    return Plan(stages, n)


def _explain(config: OPTConfig, workers: int, budgets: list[int | None], stage) -> str:
    need = sum(stage(i, 0, 0)[0] for i in range(workers)) + \
        (stage(0, 0, config.num_hidden_layers)[0] - stage(0, 0, 0)[0])
    have = sum(b for b in budgets if b is not None)
    small = [f"worker {i}: {b / GIB:.2f} GiB" for i, b in enumerate(budgets) if b is not None]
    return (f"the model does not fit: about {need / GIB:.2f} GiB needed in total, budgets "
            f"give {have / GIB:.2f} GiB ({', '.join(small)}); add workers, lower "
            "max_len/slots, or set gpu_memory_gib to offload the layers that do not fit")
