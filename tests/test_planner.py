"""The layer planner: contiguous spans, balanced by cost, within memory budgets."""

from __future__ import annotations

import pytest

from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.weight_store import GIB
from dejavu.scheduler.planner import (
    PlanError,
    embed_bytes,
    head_bytes,
    layer_bytes,
    plan_layers,
)

OPT_1_3B = OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                     num_attention_heads=32, word_embed_proj_dim=2048)


def brute_force_best(costs_first, costs_mid, n, workers):
    """Smallest max stage cost over all splits (reference for the DP)."""
    import itertools

    best = float("inf")
    for cuts in itertools.combinations(range(1, n), workers - 1):
        bounds = [0, *cuts, n]
        stage = [sum(costs_mid for _ in range(bounds[i], bounds[i + 1]))
                 for i in range(workers)]
        stage[-1] += costs_first
        best = min(best, max(stage))
    return best


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5, 7])
def test_spans_are_contiguous_nonempty_cover_every_layer_and_are_optimal(workers):
    plan = plan_layers(OPT_1_3B, workers, dtype_bytes=2, slots=4, max_len=256)
    spans = plan.spans()
    assert spans[0].start == 0 and spans[-1].stop == 24
    assert all(len(s) > 0 for s in spans)
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:], strict=False))
    worst = max(s.cost for s in plan.stages)
    ref = brute_force_best(head_bytes(OPT_1_3B, 2), layer_bytes(OPT_1_3B, 2), 24, workers)
    assert worst == pytest.approx(ref)


def test_the_last_worker_gets_fewer_layers_because_it_runs_the_head():
    plan = plan_layers(OPT_1_3B, 4, dtype_bytes=2)
    assert len(plan.spans()[-1]) < len(plan.spans()[0])


def test_budgets_move_layers_off_a_small_worker():
    layer = layer_bytes(OPT_1_3B, 2)
    small = embed_bytes(OPT_1_3B, 2) + 3 * layer + 2 * 2 * 256 * 2048 * 2 * 3
    plan = plan_layers(OPT_1_3B, 2, dtype_bytes=2, slots=2, max_len=256, budgets=[small, None])
    assert len(plan.spans()[0]) <= 3
    assert all(s.memory_bytes <= (s.budget_bytes or float("inf")) for s in plan.stages)
    assert "worker 0: layers [0, " in plan.describe()


def test_an_impossible_budget_names_the_shortfall():
    with pytest.raises(PlanError, match="does not fit.*GiB"):
        plan_layers(OPT_1_3B, 2, dtype_bytes=2, budgets=[GIB // 4, GIB // 4])


def test_more_workers_than_layers_is_refused():
    with pytest.raises(PlanError, match="workers=30"):
        plan_layers(OPT_1_3B, 30)
