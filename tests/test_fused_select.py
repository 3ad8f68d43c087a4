"""The captured sparse step with the predictors' fused selection (kernels/select.py inside
runtime/graphs.py) against the plain path: the predictor's own masks, the union gathered.

On the CPU the kernels run in Triton's interpreter and the capturable forward runs eagerly
(the capture itself is a GPU test)."""

import pytest
import torch
import torch.nn.functional as F
from test_graphs import tiny

from dejavu.runtime.graphs import DecodeGraphs, _Captured
from dejavu.runtime.model import Batch
from dejavu.runtime.predictors import PredictorSet
from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.selection import FixedSelector, PredictorSelector, fold_layer_norm
from dejavu.runtime.sparse import SparseContext
from dejavu.runtime.sparse_backend import use_backend
from dejavu.runtime.stage import Stage, allocate_cache
from dejavu.runtime.step import Row, Step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GREEDY = SamplingParams(max_new_tokens=64, ignore_eos=True)


def threshold_selector(model, density=0.25, seed=0):
    """Random low-rank predictors (rank 8), thresholds at each layer's ``density`` quantile
    of scores over random inputs, selecting by threshold with every head kept."""
    torch.manual_seed(seed)
    preds = PredictorSet.create(model, 8, 4)
    preds.mlp_select = "threshold"
    c = model.config
    x = torch.randn(64, c.hidden_size, generator=torch.Generator().manual_seed(seed))
    for i, p in preds.mlp.items():
        with torch.no_grad():
            p.up.bias.normal_(0, 0.3)
            preds.points[i].mlp_threshold = float(p(x).quantile(1 - density))
    preds.to(DEVICE, torch.float16)
    return PredictorSelector(preds)


@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("rows,live", [(1, 1), (4, 3), (4, 1)])
def test_compact_selects_the_masks_union_of_live_rows(rows, live, normed):
    """``normed``: the predictor reads the model's LayerNorm output over its source (its
    own normalization folded into its factors) instead of normalizing the source."""
    model = tiny(torch.float16, DEVICE)
    sel = threshold_selector(model)
    c = model.config
    source = torch.randn(rows, 1, c.hidden_size, generator=torch.Generator().manual_seed(rows))
    source = source.to(DEVICE, torch.float16)
    live_rows = torch.tensor([live], dtype=torch.int32, device=DEVICE)
    for lid in model.layer_ids:
        norm = model.layers()[lid].final_layer_norm
        with torch.no_grad():
            given = (norm(source), norm) if normed else None
        got = sel.compact(lid, source, live_rows, given)
        assert got is not None and got.neurons is None
        ids = set(got.neuron_index[: int(got.neuron_count)].long().cpu().tolist())
        p = sel.predictors.mlp[lid]
        with torch.no_grad():
            scores = p(source[:live]).float().reshape(-1, c.ffn_dim)
        best = scores.max(0).values.cpu()
        thr = sel.threshold(lid)
        margin = 0.02 * float(best.abs().max())
        sure_in = set(torch.nonzero(best > thr + margin).flatten().tolist())
        sure_out = set(torch.nonzero(best < thr - margin).flatten().tolist())
        assert sure_in <= ids and not ids & sure_out
        assert len(ids) == int(got.neuron_count) > 0
        # What the selector's masks give (the eager path) up to rounding at the threshold.
        masks = sel(lid, source[:live]).neurons.reshape(-1, c.ffn_dim).any(0).cpu()
        assert len(ids ^ set(torch.nonzero(masks).flatten().tolist())) <= 2


def test_fold_layer_norm_reads_the_affine_output_exactly():
    """In float64 the folded predictor on an affine LayerNorm's output scores what the
    plain one scores on the source normalized without affine."""
    g = torch.Generator().manual_seed(4)
    c, r, f = 24, 5, 31
    x = torch.randn(3, c, generator=g, dtype=torch.float64) * 3 + 1
    down_t, up_t = torch.randn(c, r, generator=g, dtype=torch.float64), \
        torch.randn(r, f, generator=g, dtype=torch.float64)
    bias = torch.randn(f, generator=g, dtype=torch.float64)
    weight = 1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    norm_bias = torch.randn(c, generator=g, dtype=torch.float64)
    want = F.layer_norm(x, (c,)) @ down_t @ up_t + bias
    folded, folded_bias = fold_layer_norm(down_t, up_t, bias, weight, norm_bias)
    got = F.layer_norm(x, (c,), weight, norm_bias) @ folded @ up_t + folded_bias
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(F.layer_norm(x, (c,), weight, norm_bias) @ down_t @ up_t + bias,
                              want, atol=1e-3)  # the fold is needed


def test_compact_keeps_its_own_norm_where_the_fold_would_not_hold():
    """A LayerNorm with a near-zero weight (or another eps) is not folded: the predictor
    normalizes the source itself and selects what it selects without one."""
    model = tiny(torch.float16, DEVICE)
    sel = threshold_selector(model)
    source = torch.randn(2, 1, model.config.hidden_size,
                         generator=torch.Generator().manual_seed(9)).to(DEVICE, torch.float16)
    live = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    norm = model.layers()[0].final_layer_norm
    with torch.no_grad():
        norm.weight[3] = 1e-4
        wrong = torch.randn_like(source)  # what it must not read

    def chosen(given):
        out = sel.compact(1, source, live, given)
        return set(out.neuron_index[: int(out.neuron_count)].long().cpu().tolist())

    assert chosen((wrong, norm)) == chosen(None)
    with torch.no_grad():
        norm.weight[3] = 1.0
    assert chosen((wrong, norm)) != chosen(None)  # folded: it reads what it is given


def test_compact_declines_where_it_does_not_apply():
    model = tiny(torch.float16, DEVICE)
    sel = threshold_selector(model)
    live = torch.ones(1, dtype=torch.int32, device=DEVICE)
    x = torch.randn(1, 1, model.config.hidden_size, device=DEVICE)
    assert sel.compact(0, x, live) is None  # float32
    sel.predictors.mlp_select = "topk"
    assert sel.compact(0, x.half(), live) is None  # top-k stays on masks


@pytest.mark.parametrize("own", [False, True], ids=["lookahead", "own-mlp-input"])
@pytest.mark.parametrize("real", [1, 3])
def test_captured_forward_with_fused_selection_equals_gathered_masks(real, own):
    """A bucket of 4 rows, ``real`` of them live: the capturable forward with the fused
    selection equals the eager gather over the same rows, and counts their density. The
    fused selection reads the LayerNorm output over its predictor's input: for a layer
    predicting from its own MLP input ("mlp_in"), that layer's own MLP LayerNorm over the
    residual entering its MLP block; for a lookahead layer, the previous layer's (the
    first layer, with none, normalizes its own input)."""
    model = tiny(torch.float16, DEVICE)
    assert use_backend(model, "triton") == "triton"
    sel = threshold_selector(model)
    for point in sel.predictors.points.values():
        point.mlp_source = "mlp_in" if own else "lookahead"
    norms = [layer.final_layer_norm for layer in model.layers()]
    cache = allocate_cache(model, 4, 32)
    graphs = DecodeGraphs(model, cache, sel)
    g = _Captured(model, cache, sel, 4, torch.device(DEVICE), torch.float16)
    rows = [Row(f"r{i}", i, [5 + i], 3 + i, True, GREEDY) for i in range(real)]
    graphs.load(g, Step(1, rows), None, None, None)
    chosen = {}
    compact = sel.compact

    def spy(lid, source, live, normed=None, scratch=None):
        if own:
            assert normed[1] is norms[lid] and torch.equal(normed[0], normed[1](source))
        elif lid > 0:
            assert normed[1] is norms[lid - 1] and torch.equal(normed[0], normed[1](source))
        else:
            assert normed is None
        out = compact(lid, source, live, normed, scratch=scratch)
        ids = out.neuron_index[: int(out.neuron_count)].long()
        mask = torch.zeros(model.config.ffn_dim, dtype=torch.bool, device=DEVICE)
        chosen[lid] = mask.index_fill_(0, ids, True)
        return out

    sel.compact = spy
    with torch.inference_mode():
        got = g._forward()[:real]
        eager_cache = allocate_cache(model, 4, 32)
        fixed = FixedSelector(neurons={lid: m.expand(real, 1, -1) for lid, m in chosen.items()})
        ctx = SparseContext(fixed, mode="gather", dense_above=1.01)
        ids = torch.tensor([[r.tokens[0]] for r in rows], device=DEVICE)
        pos = torch.tensor([[r.start] for r in rows], device=DEVICE)
        slots = torch.arange(real, device=DEVICE)
        batch = Batch(pos, slots, eager_cache, ctx)
        want = model.run_layers(model.embed(ids, pos), batch)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 5e-3
    for i, lid in enumerate(model.layer_ids):
        density = int(chosen[lid].sum()) / model.config.ffn_dim
        assert 0 < density < 0.9
        assert float(g.sparse.union[i]) == pytest.approx(density)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("own", [False, True], ids=["lookahead", "own-mlp-input"])
def test_captured_fused_stage_equals_eager_stage(own):
    """The whole captured stage (fused selection in the graph) against the eager stage
    (masks, gathered union): hidden states and densities agree, with MLP predictors reading
    the lookahead source or each layer's own MLP input."""
    model = tiny(torch.float16, "cuda")
    sel = threshold_selector(model)
    for point in sel.predictors.points.values():
        point.mlp_source = "mlp_in" if own else "lookahead"
    prompts = [[2, 7, 9, 11], [2, 5], [2, 8, 8, 8, 8, 8, 1]]

    def run(graphs):
        stage = Stage(model, allocate_cache(model, 4, 48), sel, cuda_graphs=graphs)
        stage.forward(Step(0, [Row(f"r{i}", i, p, 0, True, GREEDY)
                               for i, p in enumerate(prompts)]))
        before = stage.sparse_stats.snapshot()
        outs = [stage.forward(Step(s + 1, [Row(f"r{i}", i, [5 + s], len(p) + s, True, GREEDY)
                                           for i, p in enumerate(prompts)])).float()
                for s in range(6)]
        return stage, outs, stage.sparse_stats.since(before)

    eager_stage, eager, eager_stats = run(False)
    graph_stage, graphed, graph_stats = run(True)
    assert graph_stage.graphs.enabled and set(graph_stage.graphs.graphs) == {4}
    for want, got in zip(eager, graphed, strict=True):
        assert float((got - want).norm() / want.norm()) < 2e-2
    assert graph_stats.mlp_density == pytest.approx(eager_stats.mlp_density, abs=0.02)
