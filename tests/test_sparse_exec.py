"""Sparse execution against the dense model: exact criteria on tiny random models."""

from __future__ import annotations

import pytest
import torch

from dejavu.runtime import lazy_kv
from dejavu.runtime.model import Batch, KVCache, OPTModel, full_positions
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.predictors import PredictorSet
from dejavu.runtime.selection import FixedSelector, PredictorSelector, SelectionConfig
from dejavu.runtime.sparse import SparseContext, SparsityError, predictor_source

CFG = OPTConfig(vocab_size=97, hidden_size=48, num_hidden_layers=4, ffn_dim=96,
                num_attention_heads=6, max_position_embeddings=64, word_embed_proj_dim=48)
L, H, F = CFG.num_hidden_layers, CFG.num_attention_heads, CFG.ffn_dim


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> OPTModel:
    torch.manual_seed(seed)
    model = OPTModel(CFG)
    model.init_weights(std=0.15)  # larger than OPT's 0.02 so that every block matters
    return model.to(dtype).eval()


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def dense(model: OPTModel, x: torch.Tensor) -> torch.Tensor:
    return model(x, Batch(full_positions(*x.shape, "cpu")))


def sparse_window(model: OPTModel, x: torch.Tensor, selector, mode: str = "mask",
                  **kw) -> torch.Tensor:
    ctx = SparseContext(selector, mode=mode, **kw)
    return model(x, Batch(full_positions(*x.shape, "cpu"), sparse=ctx))


def active_neurons(model: OPTModel, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """The dense run's fc1 pre-activations > 0, per layer: [B, T, F]."""
    masks: dict[int, torch.Tensor] = {}
    hooks = [layer.fc1.register_forward_hook(
        lambda mod, inp, out, i=layer.layer_id: masks.__setitem__(i, out > 0))
        for layer in model.layers()]
    dense(model, x)
    for h in hooks:
        h.remove()
    return masks


def random_masks(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < density
    mask[..., 0] |= ~mask.any(-1)  # at least one entry per token
    return mask


def test_wiring_reads_previous_mlp_input():
    assert predictor_source(0).site == "layer_in"
    assert predictor_source(5).layer == 4 and predictor_source(5).site == "mlp_in"


def test_density_one_equals_dense_exactly():
    model = tiny_model()
    x = ids(2, 9)
    preds = PredictorSet.create(model, mlp_rank=4, head_rank=4)
    sel = PredictorSelector(preds, SelectionConfig(mlp_density=1.0, head_density=1.0))
    assert torch.equal(sparse_window(model, x, sel), dense(model, x))


@pytest.mark.parametrize("mode", ["mask", "gather"])
def test_all_selected_through_sparse_ops_equals_dense(mode):
    model = tiny_model()
    x = ids(2, 9)
    every = FixedSelector({i: torch.ones(2, 9, H, dtype=torch.bool) for i in range(L)},
                          {i: torch.ones(2, 9, F, dtype=torch.bool) for i in range(L)})
    # dense_above > 1: gather even a full union (by default it would just run dense).
    torch.testing.assert_close(sparse_window(model, x, every, mode, dense_above=1.1),
                               dense(model, x), rtol=0, atol=1e-12)


def test_oracle_mlp_selection_equals_dense():
    model = tiny_model()
    x = ids(3, 11)
    oracle = active_neurons(model, x)
    assert 0.2 < float(torch.stack(list(oracle.values())).float().mean()) < 0.8
    out = sparse_window(model, x, FixedSelector(neurons=oracle), "mask")
    assert torch.equal(out, dense(model, x))  # inactive neurons are exact zeros after ReLU
    # Gathering the union of the batch's active neurons reads other rows; same result.
    out = sparse_window(model, x, FixedSelector(neurons=oracle), "gather", dense_above=1.1)
    torch.testing.assert_close(out, dense(model, x), rtol=0, atol=1e-12)
    # The criterion can fail: drop one active neuron of one token and the output moves.
    b, t, n = oracle[2].nonzero()[0].tolist()
    short = {i: m.clone() for i, m in oracle.items()}
    short[2][b, t, n] = False
    out = sparse_window(model, x, FixedSelector(neurons=short), "mask")
    assert not torch.allclose(out[b, t], dense(model, x)[b, t], rtol=0, atol=1e-9)


def test_mask_mode_zeroes_unselected_heads():
    """Reference: dense attention per head, with unselected heads' outputs dropped."""
    model = tiny_model()
    layer = model.layers()[1]
    h = torch.randn(1, 7, CFG.hidden_size, dtype=torch.float64)
    heads = random_masks((1, 7, H), 0.5, seed=3)
    ctx = SparseContext(FixedSelector(), mode="mask")
    batch = Batch(full_positions(1, 7, "cpu"), sparse=ctx)
    got = layer.self_attn(h, 1, batch, heads)
    attn = layer.self_attn
    q = attn._split(attn.q_proj(h) * attn.scaling)
    k, v = attn._split(attn.k_proj(h)), attn._split(attn.v_proj(h))
    d = CFG.head_dim
    want = attn.out_proj.bias.expand(1, 7, -1).clone()
    for j in range(H):
        scores = q[0, j] @ k[0, j].T
        scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
        o = scores.softmax(-1) @ v[0, j]  # [T, D]
        w = attn.out_proj.weight[:, j * d:(j + 1) * d]
        want[0] += (o @ w.T) * heads[0, :, j, None]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def decode(model: OPTModel, x: torch.Tensor, head_masks: torch.Tensor,
           neuron_masks: torch.Tensor | None, *, keep_inputs: bool,
           slots: list[int]) -> tuple[torch.Tensor, SparseContext]:
    """Token by token through a KV cache in gather mode. head_masks [B, T, L, H] are the
    per-row, per-step selections; each step runs the union of the batch's rows."""
    b, t = x.shape
    cache = KVCache(CFG, list(range(L)), slots=max(slots) + 1, max_len=t,
                    dtype=torch.float64, device="cpu", keep_inputs=keep_inputs)
    out = []
    stats = None
    for p in range(t):
        step_heads = {i: head_masks[:, p:p + 1, i] for i in range(L)}
        step_neurons = ({i: neuron_masks[:, p:p + 1, i] for i in range(L)}
                        if neuron_masks is not None else None)
        ctx = SparseContext(FixedSelector(step_heads, step_neurons), mode="gather", stats=stats)
        stats = ctx.stats
        batch = Batch(torch.full((b, 1), p), torch.tensor(slots), cache, sparse=ctx)
        out.append(model(x[:, p:p + 1], batch))
    return torch.cat(out, 1), ctx


def union_rows(mask: torch.Tensor) -> torch.Tensor:
    """[B, T, L, n] -> every row gets the union over rows at each step."""
    return mask.any(0, keepdim=True).expand_as(mask)


@pytest.mark.parametrize("keep_inputs,completion", [(True, "loop"), (True, "batched"),
                                                     (False, "auto")])
def test_skipped_then_selected_heads_see_exact_kv(keep_inputs, completion, monkeypatch):
    """Either completion of skipped heads' K/V (the loop, or the batched pass a GPU runs)."""
    monkeypatch.setattr(lazy_kv, "COMPLETION", completion)
    model = tiny_model()
    x = ids(1, 12, seed=4)
    heads = random_masks((1, 12, L, H), 0.35, seed=5)
    heads[0, 9:, :, 0] = True  # head 0 skipped somewhere early, selected at the end
    got, ctx = decode(model, x, heads, None, keep_inputs=keep_inputs, slots=[2])
    # Reference: whole-window dense attention (exact K/V for all heads), masked per token.
    ref = sparse_window(model, x, FixedSelector({i: heads[:, :, i] for i in range(L)}), "mask")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    ctx.stats.settle()  # the batched pass counts on the device
    recomputed = sum(s.kv_recomputed for s in ctx.stats.layers.values())
    assert (recomputed > 0) == keep_inputs
    if completion == "batched":  # the same pairs as the loop fills
        monkeypatch.setattr(lazy_kv, "COMPLETION", "loop")
        _, loop_ctx = decode(model, x, heads, None, keep_inputs=True, slots=[2])
        assert recomputed == sum(s.kv_recomputed for s in loop_ctx.stats.layers.values())
    # And the heads mattered: the result is not the dense model's.
    assert not torch.allclose(got, dense(model, x), atol=1e-6)


def test_union_over_batch_rows():
    model = tiny_model()
    x = ids(3, 10, seed=6)
    heads = random_masks((3, 10, L, H), 0.3, seed=7)
    neurons = random_masks((3, 10, L, F), 0.3, seed=8)
    got, ctx = decode(model, x, heads, neurons, keep_inputs=True, slots=[4, 0, 2])
    uh, un = union_rows(heads), union_rows(neurons)
    ref = sparse_window(model, x, FixedSelector({i: uh[:, :, i] for i in range(L)},
                                                {i: un[:, :, i] for i in range(L)}), "mask")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    # Densities are measured on what was computed: the union, for every token.
    want = float(un.double().mean(-1).mean())
    assert abs(ctx.stats.mlp_density - want) < 1e-9


def test_reused_slot_does_not_leak_previous_owner_kv():
    model = tiny_model()
    heads = random_masks((1, 8, L, H), 0.4, seed=9)
    x1, x2 = ids(1, 8, seed=10), ids(1, 8, seed=11)
    cache = KVCache(CFG, list(range(L)), slots=1, max_len=8, dtype=torch.float64,
                    device="cpu", keep_inputs=True)
    for x in (x1, x2):  # the second sequence reuses slot 0
        outs = []
        for p in range(8):
            sel = FixedSelector({i: heads[:, p:p + 1, i] for i in range(L)})
            batch = Batch(torch.tensor([[p]]), torch.tensor([0]), cache,
                          sparse=SparseContext(sel, mode="gather"))
            outs.append(model(x[:, p:p + 1], batch))
    ref = sparse_window(model, x2, FixedSelector({i: heads[:, :, i] for i in range(L)}))
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-10)


def test_pipeline_stage_carries_the_next_predictor_input():
    model = tiny_model()
    x = ids(2, 6)
    preds = PredictorSet.create(model, mlp_rank=8, head_rank=4)
    sel = PredictorSelector(preds, SelectionConfig(mlp_density=0.25, head_density=0.5))
    whole = sparse_window(model, x, sel)
    first, second = OPTModel(CFG, range(0, 2)), OPTModel(CFG, range(2, 4))
    state = model.state_dict()
    first.load_state_dict({k: v for k, v in state.items() if k in first.state_dict()})
    second.load_state_dict({k: v for k, v in state.items() if k in second.state_dict()})
    first, second = first.double(), second.double()
    pos = full_positions(2, 6, "cpu")
    ctx1 = SparseContext(sel)
    h = first(x, Batch(pos, sparse=ctx1))
    with pytest.raises(SparsityError, match="previous stage"):
        second(h, Batch(pos, sparse=SparseContext(sel)))
    out = second(h, Batch(pos, sparse=SparseContext(sel, carry=ctx1.carry_out)))
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-12)


def test_dense_path_on_a_cache_with_inputs_is_unchanged():
    model = tiny_model()
    x = ids(1, 6)
    outs = {}
    for keep in (False, True):
        cache = KVCache(CFG, list(range(L)), slots=1, max_len=6, dtype=torch.float64,
                        device="cpu", keep_inputs=keep)
        outs[keep] = model(x, Batch(full_positions(1, 6, "cpu"), torch.tensor([0]), cache))
    assert torch.equal(outs[True], outs[False])


def test_a_union_near_dense_runs_the_block_dense():
    model = tiny_model()
    x = ids(2, 5)
    neurons = torch.ones(2, 5, F, dtype=torch.bool)
    neurons[:, :, 7] = False  # union 95/96: above the default 0.9
    sel = FixedSelector(neurons={i: neurons for i in range(L)})
    ctx = SparseContext(sel, mode="gather")
    out = model(x, Batch(full_positions(2, 5, "cpu"), sparse=ctx))
    assert torch.equal(out, dense(model, x)) and ctx.stats.mlp_density == 1.0
    gathered = sparse_window(model, x, sel, "gather", dense_above=1.1)
    assert not torch.allclose(gathered, out, rtol=0, atol=1e-12)


def test_a_dense_step_after_sparse_steps_sees_every_heads_exact_kv():
    model = tiny_model()
    x = ids(1, 8, seed=12)
    heads = random_masks((1, 8, L, H), 0.3, seed=13)
    heads[:, 7] = True  # the last step runs dense
    cache = KVCache(CFG, list(range(L)), slots=1, max_len=8, dtype=torch.float64,
                    device="cpu", keep_inputs=True)
    outs = []
    for p in range(8):
        sparse = None
        if p < 7:
            sparse = SparseContext(FixedSelector({i: heads[:, p:p + 1, i] for i in range(L)}),
                                   mode="gather")
        batch = Batch(torch.tensor([[p]]), torch.tensor([0]), cache, sparse=sparse)
        outs.append(model(x[:, p:p + 1], batch))
    ref = sparse_window(model, x, FixedSelector({i: heads[:, :, i] for i in range(L)}))
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-10)


def test_a_mask_mode_step_after_gather_steps_sees_every_heads_exact_kv():
    """Mask mode on a shared cache is the dense op with heads zeroed: it must complete the
    keys/values that earlier gather steps skipped, exactly as the dense step does."""
    model = tiny_model()
    x = ids(1, 8, seed=14)
    heads = random_masks((1, 8, L, H), 0.3, seed=15)
    heads[:, 7] = True  # the last step selects every head, in mask mode
    cache = KVCache(CFG, list(range(L)), slots=1, max_len=8, dtype=torch.float64,
                    device="cpu", keep_inputs=True)
    outs = []
    for p in range(8):
        step = FixedSelector({i: heads[:, p:p + 1, i] for i in range(L)})
        sparse = SparseContext(step, mode="gather" if p < 7 else "mask")
        batch = Batch(torch.tensor([[p]]), torch.tensor([0]), cache, sparse=sparse)
        outs.append(model(x[:, p:p + 1], batch))
    ref = sparse_window(model, x, FixedSelector({i: heads[:, :, i] for i in range(L)}))
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-10)
