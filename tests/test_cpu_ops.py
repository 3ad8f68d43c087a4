"""The CPU fast paths against their plain references: the sparse MLP over whole rows of fc2
transposed (runtime/cpu_ops.py) against the column gather, attention over each row's prefix
read in place against the gathered copy, and what a CPU decode step no longer pays for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dejavu.runtime import cpu_ops
from dejavu.runtime.attention import gathered_attention, prefix_attention
from dejavu.runtime.engine import Engine
from dejavu.runtime.model import OPTDecoderLayer, OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.selection import FixedSelector, RandomSelector
from dejavu.runtime.sparse import gathered_mlp_reference, needs_kv_inputs

# Tolerances per dtype, relative to the output's scale.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)


def layer_of(c: int, f: int, dtype: torch.dtype, *, bias: bool = True,
             seed: int = 0) -> OPTDecoderLayer:
    cfg = OPTConfig(vocab_size=11, hidden_size=c, num_hidden_layers=1, ffn_dim=f,
                    num_attention_heads=1, max_position_embeddings=8, word_embed_proj_dim=c,
                    enable_bias=bias)
    torch.manual_seed(seed)
    layer = OPTDecoderLayer(cfg, 0)
    if bias:  # nn.Linear's biases are small; make them matter
        torch.nn.init.normal_(layer.fc1.bias)
        torch.nn.init.normal_(layer.fc2.bias)
    return layer.to(dtype)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,f,n,rows", [(1, 1, 1, 1), (7, 13, 5, 1), (33, 97, 1, 3),
                                        (33, 97, 97, 4), (48, 211, 61, 5), (64, 256, 37, 17)])
def test_gathered_mlp_matches_reference(dtype, c, f, n, rows):
    layer = layer_of(c, f, dtype)
    g = torch.Generator().manual_seed(c * 1000 + f)
    x = torch.randn(rows, 1, c, generator=g).to(dtype)
    idx = torch.randperm(f, generator=g)[:n]  # unsorted on purpose
    got = cpu_ops.gathered_mlp(x, layer.fc1.weight, layer.fc1.bias, layer.fc2_rows(),
                               layer.fc2.bias, idx)
    want = gathered_mlp_reference(layer.to(torch.float64), x.double(), idx)
    assert got.shape == x.shape and got.dtype == dtype
    assert rel_err(got, want) <= TOL[dtype]


def test_gathered_mlp_without_biases():
    layer = layer_of(24, 40, torch.float32, bias=False)
    x = torch.randn(2, 3, 24)
    idx = torch.tensor([3, 0, 39, 17])
    got = cpu_ops.gathered_mlp(x, layer.fc1.weight, None, layer.fc2_rows(), None, idx)
    assert rel_err(got, gathered_mlp_reference(layer, x, idx)) <= TOL[torch.float32]


def test_fc2_rows_follow_changes_to_fc2():
    layer = layer_of(8, 12, torch.float32)
    first = layer.fc2_rows()
    assert torch.equal(first, layer.fc2.weight.t())
    assert layer.fc2_rows() is first  # made once
    with torch.no_grad():
        layer.fc2.weight.mul_(2.0)  # written in place
    assert torch.equal(layer.fc2_rows(), layer.fc2.weight.t())
    layer.to(torch.float64)  # cast: a new tensor
    assert layer.fc2_rows().dtype == torch.float64
    assert torch.equal(layer.fc2_rows(), layer.fc2.weight.t())


def caches(slots: int, heads: int, length: int, dim: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(slots, heads, length, dim, generator=g).to(dtype),
            torch.randn(slots, heads, length, dim, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("starts,width", [([0], 1), ([6], 1), ([4, 0, 10], 1), ([0], 5),
                                          ([3, 9], 3), ([12, 1, 5], 2)])
def test_prefix_attention_matches_gathered(dtype, starts, width):
    heads, dim, max_len = 3, 5, 17
    cache_k, cache_v = caches(4, heads, max_len, dim, dtype, seed=len(starts) * 10 + width)
    slots = torch.tensor([3, 0, 2][: len(starts)])
    # Positions as the stage makes them: start, start+1, ... clamped into the cache (the
    # last row's padding repeats its final position).
    positions = torch.stack([torch.arange(s, s + width).clamp(max=max_len - 1) for s in starts])
    q = torch.randn(len(starts), heads, width, dim).to(dtype)
    length = int(positions.max()) + 1
    want = gathered_attention(q.double(), cache_k.double(), cache_v.double(), slots, positions,
                              length)
    lengths = (positions.max(1).values + 1).tolist()
    got = prefix_attention(q, cache_k, cache_v, slots.tolist(), lengths, positions)
    assert got.shape == q.shape and got.dtype == dtype
    assert rel_err(got, want) <= TOL[dtype]


def test_prefix_attention_ignores_what_lies_beyond_a_rows_prefix():
    cache_k, cache_v = caches(2, 2, 9, 4, torch.float64, seed=3)
    q = torch.randn(1, 2, 1, 4, dtype=torch.float64)
    before = prefix_attention(q, cache_k, cache_v, [1], [4], torch.tensor([[3]]))
    cache_k[1, :, 4:] = 1e3  # a previous owner's keys and values past position 3
    cache_v[1, :, 4:] = -1e3
    after = prefix_attention(q, cache_k, cache_v, [1], [4], torch.tensor([[3]]))
    assert torch.equal(before, after)


CFG = OPTConfig(vocab_size=101, hidden_size=40, num_hidden_layers=3, ffn_dim=88,
                num_attention_heads=5, max_position_embeddings=64, word_embed_proj_dim=40)


def tiny_model(seed: int = 0) -> OPTModel:
    torch.manual_seed(seed)
    model = OPTModel(CFG)
    model.init_weights(std=0.15)
    return model.to(torch.float64).eval()


def test_needs_kv_inputs_only_where_a_head_may_be_skipped():
    f, h = CFG.ffn_dim, CFG.num_attention_heads
    assert not needs_kv_inputs(None)
    assert not needs_kv_inputs(RandomSelector(f, h, 0.2, 1.0))  # every head, every step
    assert needs_kv_inputs(RandomSelector(f, h, 0.2, 0.6))
    assert needs_kv_inputs(FixedSelector())  # says nothing: assume heads may be skipped


def test_sparse_engine_decodes_as_the_reference_path(monkeypatch):
    """Greedy decoding through the engine with sparse MLPs on the CPU path and on the
    plain column gather gives the same tokens, and the cache keeps no inputs it never
    reads (every head is computed)."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [[2, 17, 33, 4, 90], [2, 8]]

    def run() -> tuple[list[list[int]], Engine]:
        selector = RandomSelector(CFG.ffn_dim, CFG.num_attention_heads, 0.3, 1.0, seed=5)
        engine = Engine(tiny_model(), max_batch=2, max_len=32, selector=selector)
        return [c.tokens for c in engine.run(prompts, params)], engine

    got, fast = run()
    assert fast.stage.cache.inputs is None
    assert fast.stage.sparse_stats.mlp_density < 0.9  # the gather path did run

    def column_gather(x, w1, b1, w2_rows, b2, idx):  # the reference's math, fc2 as stored
        hidden = F.relu(F.linear(x, w1.index_select(0, idx), b1.index_select(0, idx)))
        return F.linear(hidden, w2_rows.t().index_select(1, idx), b2)

    monkeypatch.setattr(cpu_ops, "gathered_mlp", column_gather)
    want, _ = run()
    assert got == want


def test_stage_threads_leave_one_core_to_the_rest():
    assert cpu_ops.stage_threads(cores=2, current=2) == 1
    assert cpu_ops.stage_threads(cores=1, current=1) == 1
    assert cpu_ops.stage_threads(cores=16, current=16) == 15
    assert cpu_ops.stage_threads(cores=16, current=4) == 4  # never more than asked for


def test_a_cpu_stage_computes_with_stage_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(before, 2))
        want = cpu_ops.stage_threads()
        Engine(tiny_model(), max_batch=1, max_len=8)
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


# --- greedy decoding through the int8 screen ---------------------------------------------


def head_and_inputs(v: int, e: int, rows: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(v, e, generator=g) * 0.05).to(dtype)
    x = (torch.randn(rows, e, generator=g) * 3.0).to(dtype)
    return weight, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v,e,rows", [(1, 16, 1), (7, 48, 3), (997, 64, 1), (4099, 512, 2)])
def test_greedy_head_matches_argmax(dtype, v, e, rows):
    weight, x = head_and_inputs(v, e, rows, dtype, seed=v + e)
    head = cpu_ops.GreedyHead(weight)
    assert not head.exact_only  # the screen itself runs
    assert torch.equal(head(weight, x), torch.nn.functional.linear(x, weight).argmax(-1))


def test_greedy_head_separates_near_ties():
    """Two tokens 1e-3 apart, far inside the int8 copy's error: the float32 rows decide."""
    weight, x = head_and_inputs(2000, 64, 1, torch.float32, seed=7)
    best = int(torch.nn.functional.linear(x, weight).argmax())
    other = (best + 1000) % 2000
    direction = x[0] / x[0].norm() ** 2
    for margin in (1e-3, -1e-3):
        w = weight.clone()
        w[other] = w[best] + margin * direction  # logit(other) = logit(best) + margin
        want = torch.nn.functional.linear(x, w).argmax(-1)
        assert int(want) == (other if margin > 0 else best)
        assert torch.equal(cpu_ops.GreedyHead(w)(w, x), want)


def test_greedy_head_with_many_candidates_takes_the_full_product():
    weight = torch.ones(3000, 32) + 1e-7 * torch.randn(3000, 32)
    x = torch.randn(1, 32)
    head = cpu_ops.GreedyHead(weight)
    assert torch.equal(head(weight, x), torch.nn.functional.linear(x, weight).argmax(-1))


def test_greedy_head_without_the_int8_kernel_is_exact(monkeypatch):
    def missing(*args):
        raise RuntimeError("no int8 kernel here")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", missing)
    weight, x = head_and_inputs(300, 32, 2, torch.float32, seed=1)
    head = cpu_ops.GreedyHead(weight)
    assert head.exact_only
    assert torch.equal(head(weight, x), torch.nn.functional.linear(x, weight).argmax(-1))


def test_greedy_screen_applies_to_float_heads_of_width_16k():
    assert cpu_ops.greedy_screen_applies(torch.zeros(5, 48))
    assert not cpu_ops.greedy_screen_applies(torch.zeros(5, 40))  # the int8 kernel's limit
    assert not cpu_ops.greedy_screen_applies(torch.zeros(5, 48, dtype=torch.bfloat16))


def test_engine_greedy_tokens_equal_the_full_logits_path():
    """Greedy decoding (screened head) and the same requests asking for log-probabilities
    (every logit computed) give the same tokens; a changed head is picked up."""
    cfg = OPTConfig(vocab_size=503, hidden_size=48, num_hidden_layers=2, ffn_dim=80,
                    num_attention_heads=3, max_position_embeddings=64, word_embed_proj_dim=48)
    torch.manual_seed(3)
    model = OPTModel(cfg)
    model.init_weights(std=0.15)
    model.eval()
    engine = Engine(model, max_batch=2, max_len=40)
    prompts = [[2, 17, 33, 4, 90], [2, 8, 400]]
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True)
    full = SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=0)
    got = [c.tokens for c in engine.run(prompts, greedy)]
    assert model._greedy_head is not None and not model._greedy_head.exact_only
    assert got == [c.tokens for c in engine.run(prompts, full)]
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # tied to the embeddings: a different model
    assert [c.tokens for c in engine.run(prompts, greedy)] == \
        [c.tokens for c in engine.run(prompts, full)]


def test_store_for_gemv_keeps_values_and_changes_only_tall_weights():
    torch.manual_seed(0)
    tall, wide = torch.nn.Linear(13, 97), torch.nn.Linear(97, 13)
    before_tall, before_wide = tall.weight.detach().clone(), wide.weight.detach().clone()
    x = torch.randn(3, 13)
    want = tall(x)
    cpu_ops.store_for_gemv(tall)
    cpu_ops.store_for_gemv(wide)
    assert tall.weight.shape == (97, 13) and tall.weight.stride() == (1, 97)
    assert torch.equal(tall.weight, before_tall)
    assert torch.allclose(tall(x), want, rtol=1e-6, atol=1e-6)
    assert wide.weight.is_contiguous() and torch.equal(wide.weight, before_wide)
    assert "weight" in dict(tall.named_parameters())  # still a parameter of the module


def test_fused_qkv_matches_three_products_and_follows_replaced_weights():
    cfg = OPTConfig(vocab_size=50, hidden_size=48, num_hidden_layers=1, ffn_dim=64,
                    num_attention_heads=3, max_position_embeddings=16, word_embed_proj_dim=48)
    torch.manual_seed(2)
    attn = OPTDecoderLayer(cfg, 0).self_attn
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        torch.nn.init.normal_(lin.bias)
    attn.requires_grad_(False)  # frozen, as load_model returns weights
    x = torch.randn(2, 5, 48)
    want = (attn.q_proj(x) * attn.scaling, attn.k_proj(x), attn.v_proj(x))
    with torch.no_grad():
        got = attn.project_qkv(x)
    assert attn._fused_qkv is not None  # the fused product ran
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= TOL[torch.float32]
    with torch.no_grad():
        attn.k_proj.weight.mul_(3.0)  # in place: the table is the same storage
        assert rel_err(attn.project_qkv(x)[1], attn.k_proj(x)) <= TOL[torch.float32]
        attn.to(torch.float64)  # replaced: fused again
        got = attn.project_qkv(x.double())
    assert got[0].dtype == torch.float64
    assert rel_err(got[2], attn.v_proj(x.double())) <= TOL[torch.float64]


def test_training_keeps_its_parameter_objects():
    layer = layer_of(32, 40, torch.float32)
    attn = layer.self_attn
    before = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    with torch.no_grad():  # an evaluation inside training: weights still trainable
        attn.project_qkv(torch.randn(1, 3, 32))
    assert [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight] == before
    assert attn._fused_qkv is None
