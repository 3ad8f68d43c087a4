"""The seam between evaluation and sparse execution: a logits function that runs the model
with a selector, and the measured densities to report next to the metrics.

Scoring runs whole windows without a KV cache, so every token keeps its own selection
(``SparseContext`` mask mode): the quality measured is that of decoding one sequence at a
time with these predictors (a batch of B sequences would compute the union of its rows'
selections, which can only help quality). Densities are measured, not nominal: the
fraction of neurons and heads each token computed, averaged over tokens and then layers.

What this module does not know: tasks, files, or how selections are made.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from dejavu.runtime.model import Batch, OPTModel, full_positions
from dejavu.runtime.sparse import Selector, SparseContext, SparseStats

LogitsFn = Callable[[Tensor], Tensor]


def sparse_logits_fn(model: OPTModel, selector: Selector,
                     stats: SparseStats | None = None) -> tuple[LogitsFn, SparseStats]:
    """Token ids [B, T] (windows from position 0) -> logits, computed sparse; the returned
    stats accumulate over every call."""
    stats = stats if stats is not None else SparseStats()

    def logits(ids: Tensor) -> Tensor:
        ctx = SparseContext(selector, stats=stats, mode="mask")
        return model(ids, Batch(full_positions(ids.shape[0], ids.shape[1], ids.device),
                                sparse=ctx))

    return logits, stats


def density_metrics(stats: SparseStats) -> dict[str, float]:
    """What ``eval --sparse --json`` adds to each task's metrics."""
    total_s = sum(s.predictor_s for s in stats.layers.values())
    return {"mlp_density": stats.mlp_density, "head_density": stats.head_density,
            "predictor_s": total_s}
