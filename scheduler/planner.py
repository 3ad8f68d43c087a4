"""Which worker owns which layers: contiguous spans chosen by cost within memory budgets.

Each layer costs its weights' bytes in memory (plus its share of the KV cache) and, in
time, about its weights' bytes too (a decode step reads every weight once). The first
worker also holds the embeddings and the last one the final norm and LM head, which the
last one must also run every step (its time cost is the head's bytes). The plan minimises
the slowest stage (the pipeline's throughput bound) subject to each worker's memory
budget, by dynamic programming over split points: exact, and instant for any real depth.

What this module does not know: devices or offloading. A budget is a number of bytes; when
the weight store pages rows from host memory, the budget it is given is what it keeps
resident, and the bytes a layer needs shrink accordingly (pass ``resident_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dejavu.runtime.opt_config import POSITION_OFFSET, OPTConfig

GiB = 1024**3


class PlanError(ValueError):
    """No split fits: names the worker, its budget and what it would need."""


@dataclass(frozen=True)
class StagePlan:
    index: int
    layers: range
    memory_bytes: int
    cost: float  # relative time of one decode step (bytes read)
    budget_bytes: int | None


@dataclass(frozen=True)
class Plan:
    stages: list[StagePlan]
    num_layers: int

    def spans(self) -> list[range]:
        return [s.layers for s in self.stages]

    def describe(self) -> str:
        worst = max(s.cost for s in self.stages)
        lines = [f"plan: {self.num_layers} layers over {len(self.stages)} worker(s)"]
        for s in self.stages:
            budget = ("no budget" if s.budget_bytes is None
                      else f"budget {s.budget_bytes / GiB:.2f} GiB")
            lines.append(
                f"  worker {s.index}: layers [{s.layers.start}, {s.layers.stop}) "
                f"({len(s.layers)} layers), memory {s.memory_bytes / GiB:.3f} GiB ({budget}), "
                f"relative step time {s.cost / worst:.2f}"
            )
        return "\n".join(lines)


def layer_bytes(config: OPTConfig, dtype_bytes: int) -> int:
    c, f = config.hidden_size, config.ffn_dim
    weights = 4 * c * c + 2 * c * f
    biases = 4 * c + f + c if config.enable_bias else 0
    norms = 4 * c if config.layer_norm_elementwise_affine else 0
    return (weights + biases + norms) * dtype_bytes


def kv_bytes_per_layer(config: OPTConfig, slots: int, max_len: int, dtype_bytes: int) -> int:
    return 2 * slots * max_len * config.hidden_size * dtype_bytes


def embed_bytes(config: OPTConfig, dtype_bytes: int) -> int:
    e, c = config.word_embed_proj_dim, config.hidden_size
    n = config.vocab_size * e + (config.max_position_embeddings + POSITION_OFFSET) * c
    if config.has_projections:
        n += e * c
    return n * dtype_bytes


def head_bytes(config: OPTConfig, dtype_bytes: int) -> int:
    e, c = config.word_embed_proj_dim, config.hidden_size
    n = 2 * c if config.has_final_layer_norm else 0
    if config.has_projections:
        n += e * c
    # A tied head shares the embedding's memory only when one worker holds both.
    return n * dtype_bytes + config.vocab_size * e * dtype_bytes


def plan_layers(config: OPTConfig, workers: int, *, dtype_bytes: int = 4, slots: int = 8,
                max_len: int = 2048, budgets: list[int | None] | None = None,
                resident_fraction: float = 1.0) -> Plan:
    """Split ``config.num_hidden_layers`` layers into ``workers`` non-empty contiguous spans.

    ``budgets[i]`` is worker i's memory in bytes (None: unlimited)."""
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
    small = [f"worker {i}: {b / GiB:.2f} GiB" for i, b in enumerate(budgets) if b is not None]
    return (f"the model does not fit: about {need / GiB:.2f} GiB needed in total, budgets "
            f"give {have / GiB:.2f} GiB ({', '.join(small)}); raise [pipeline] "
            "memory_budget_gb, add workers, lower max_len/slots, or enable offloading")
