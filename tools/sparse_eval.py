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

from ..runtime.model import Batch, OPTModel, full_positions
from ..runtime.sparse import Selector, SparseContext, SparseStats

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


def run_eval(settings, opts, as_json: bool, *, sparse: bool | None = None) -> str:
    """``dejavu-run eval``: the model as runtime/build.py builds it for these settings and
    ``--sparse/--dense``. Dense scores as tools/eval.evaluate does; sparse runs each task
    and file with its own statistics and adds the measured mlp_density / head_density (and
    predictor time) to its metrics."""
    from ..runtime.build import build_model, resolve
    from ..runtime.tokenizer import load_tokenizer
    from .eval import EvalOptions, evaluate, expand_tasks, markdown_table, to_json

    settings = resolve(settings, sparse)
    # No stage: scoring runs whole windows from position 0, without a KV cache, which
    # offloaded layers need (their attention completes skipped heads from it); so the
    # whole model is loaded on the device, whatever [pipeline] gpu_memory_gib says.
    settings.pipeline.gpu_memory_gib = None
    built = build_model(settings)
    model, selector = built.model, built.selector
    tokenizer = load_tokenizer(settings.model.path)
    if selector is None:
        results = evaluate(model, tokenizer, opts)
        return to_json(results) if as_json else markdown_table(results)
    items = [EvalOptions(**{**opts.__dict__, "tasks": [t], "data": ()})
             for t in expand_tasks(opts.tasks)]
    items += [EvalOptions(**{**opts.__dict__, "tasks": (), "data": [d]}) for d in opts.data]
    results = []
    for item in items:
        logits_fn, stats = sparse_logits_fn(model, selector)
        for result in evaluate(model, tokenizer, item, logits_fn=logits_fn):
            result["metrics"].update(density_metrics(stats))
            results.append(result)
    if as_json:
        return to_json(results)
    lines = [markdown_table(results), "", "sparse: measured densities per task"]
    lines += [f"- {r['task']}: mlp_density={r['metrics']['mlp_density']:.3f} "
              f"head_density={r['metrics']['head_density']:.3f}" for r in results]
    return "\n".join(lines)
