"""CUDA-graph decode (runtime/graphs.py): the capturable forward equals the eager one, and
the stage replays graphs only for steps they are valid for.

On the CPU the capturable forward (``Batch.fixed_shape``: attention through the decode
kernel, reading the cache in place) runs eagerly in Triton's interpreter; the capture and
replay themselves are GPU tests.
"""

import pytest
import torch

from dejavu.runtime.graphs import DecodeGraphs, _Captured, bucket  # noqa: E402
from dejavu.runtime.model import Batch, OPTModel  # noqa: E402
from dejavu.runtime.opt_config import OPTConfig  # noqa: E402
from dejavu.runtime.sampling import SamplingParams  # noqa: E402
from dejavu.runtime.selection import RandomSelector  # noqa: E402
from dejavu.runtime.sparse import Selection, selected_mlp  # noqa: E402
from dejavu.runtime.sparse_backend import use_backend  # noqa: E402
from dejavu.runtime.stage import Stage, allocate_cache  # noqa: E402
from dejavu.runtime.step import Row, Step  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=64, ignore_eos=True)
# The kernels run where the interpreter is (tests/conftest.py): on the CPU without CUDA,
# on the GPU with it.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny(dtype, device="cpu", *, pre_ln=True, seed=0):
    config = OPTConfig(hidden_size=64, num_attention_heads=4, ffn_dim=160, num_hidden_layers=2,
                       vocab_size=300, max_position_embeddings=64, word_embed_proj_dim=64,
                       do_layer_norm_before=pre_ln)
    model = OPTModel(config)
    model.init_weights(torch.Generator().manual_seed(seed), std=0.1)
    with torch.no_grad():  # non-trivial norms and biases, so a dropped one shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def test_bucket():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pre_ln", [True, False])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_fixed_shape_forward_equals_eager(dtype, pre_ln, backend):
    """Rows at different positions (one a reused slot with stale entries beyond its own
    length): the in-place decode attention equals the gathered, masked one. On the kernels
    (as on a GPU) the residual add and the MLP block's norm are one launch as well."""
    model = tiny(dtype, DEVICE, pre_ln=pre_ln)
    use_backend(model, backend)
    config = model.config
    eager_cache = allocate_cache(model, 4, 32)
    g = torch.Generator().manual_seed(3)
    # Fill the cache with a common history (including garbage past each row's end).
    eager_cache.k.copy_(torch.randn(eager_cache.k.shape, generator=g).to(dtype))
    eager_cache.v.copy_(torch.randn(eager_cache.v.shape, generator=g).to(dtype))
    fixed_cache = allocate_cache(model, 4, 32)
    fixed_cache.k.copy_(eager_cache.k)
    fixed_cache.v.copy_(eager_cache.v)
    slots = torch.tensor([2, 0, 3], device=DEVICE)
    positions = torch.tensor([[5], [17], [0]], device=DEVICE)
    h = torch.randn(3, 1, config.hidden_size, generator=g).to(DEVICE, dtype)
    with torch.inference_mode():
        want = model.run_layers(h, Batch(positions, slots, eager_cache))
        got = model.run_layers(h, Batch(positions, slots, fixed_cache, fixed_shape=True))
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < (5e-3 if dtype == torch.float16 else 3e-2)
    # The first layer's keys and values come from the same ops on both paths.
    assert torch.equal(fixed_cache.k[0], eager_cache.k[0])
    assert torch.equal(fixed_cache.v[0], eager_cache.v[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_step_equals_head_outputs(backend, dtype):
    """The captured step's attention (one stacked q/k/v product, q scaled in the decode
    kernel) equals the reference: three projections, q scaled, two cache
    writes, gathered attention, out_proj. Two rows share nothing; a third repeats the first
    (a padding row)."""
    model = tiny(dtype, DEVICE)
    use_backend(model, backend)
    attn = model.layers()[1].self_attn
    g = torch.Generator().manual_seed(7)
    caches = [allocate_cache(model, 4, 32) for _ in range(2)]
    history = torch.randn((2,) + caches[0].k.shape, generator=g).to(dtype)
    for cache in caches:
        cache.k.copy_(history[0])
        cache.v.copy_(history[1])
    slots = torch.tensor([1, 3, 1], device=DEVICE)
    positions = torch.tensor([[6], [11], [6]], device=DEVICE)
    x = torch.randn(2, 1, model.config.hidden_size, generator=g).to(DEVICE, dtype)
    x = torch.cat([x, x[:1]])
    with torch.inference_mode():
        stacked = attn.stacked_qkv()
        assert stacked is not None and stacked[0].shape == (3 * 64, 64)
        got = attn.decode_step(x, 1, Batch(positions, slots, caches[0], fixed_shape=True),
                               *stacked)
        want = attn.merge_heads(attn.head_outputs(x, 1, Batch(positions, slots, caches[1])))
    tol = 5e-3 if dtype == torch.float16 else 3e-2
    assert float((got.float() - want.float()).norm() / want.float().norm()) < tol
    for i in range(2):  # keys, then values
        kv_got, kv_want = caches[0].layer(1)[i], caches[1].layer(1)[i]
        assert not torch.equal(kv_got, history[i, 1].to(kv_got.device))  # this step wrote them
        assert torch.allclose(kv_got.float(), kv_want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("rows", [1, 3])
def test_device_only_mlp_equals_union_gather(rows):
    """The capturable sparse MLP (union compacted on the device, count read by the kernel)
    computes the same as the eager gather over the sorted union."""
    model = tiny(torch.float16, DEVICE)
    assert use_backend(model, "triton") == "triton"
    layer = model.layers()[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 1, model.config.hidden_size, generator=g).to(DEVICE, torch.float16)
    neurons = (torch.rand(rows, 1, model.config.ffn_dim, generator=g) < 0.2).to(DEVICE)
    with torch.inference_mode():
        want = selected_mlp(layer, x, neurons, True)
        got = selected_mlp(layer, x, neurons, True, device_only=True)
        dense_rows = layer.fc2(torch.relu(layer.fc1(x.float().to(torch.float16))))
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 3e-3
    assert not torch.allclose(got.float(), dense_rows.float(), rtol=1e-2)  # really sparse


@pytest.mark.parametrize("rows", [1, 3])
def test_device_only_mlp_adds_the_residual_in_a_given_workspace(rows):
    """A captured step's MLP: the residual added by the kernel (rounded once), each layer's
    workspace a row of one buffer zeroed once (no memset of its own), the other rows left
    alone."""
    from dejavu.kernels.mlp_chained import workspace_numel

    model = tiny(torch.float16, DEVICE)
    use_backend(model, "triton")
    c, f = model.config.hidden_size, model.config.ffn_dim
    workspaces = torch.zeros((2, workspace_numel(rows, c, f)), dtype=torch.int32,
                             device=DEVICE)
    g = torch.Generator().manual_seed(6)
    for i, layer in enumerate(model.layers()):
        x = torch.randn(rows, 1, c, generator=g).to(DEVICE, torch.float16)
        h = torch.randn(rows, 1, c, generator=g).to(DEVICE, torch.float16)
        neurons = (torch.rand(rows, 1, f, generator=g) < 0.2).to(DEVICE)
        with torch.inference_mode():
            want = h + selected_mlp(layer, x, neurons, True)
            got = selected_mlp(layer, x, neurons, True, device_only=True, residual=h,
                               workspace=workspaces[i])
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 3e-3
        assert workspaces[i].any() and not workspaces[i + 1:].any()


def test_random_selector_says_whether_it_keeps_every_head():
    assert RandomSelector(64, 4, 0.2, 1.0).keeps_every_head
    assert not RandomSelector(64, 4, 0.2, 0.5).keeps_every_head


def test_graphs_off_where_they_do_not_apply():
    model = tiny(torch.float16)
    stage = Stage(model, allocate_cache(model, 4, 32))
    assert not stage.graphs.enabled  # the CPU
    decode = Step(1, [Row("a", 0, [5], 3, True, GREEDY)])
    prefill = Step(1, [Row("a", 0, [5, 6], 3, True, GREEDY)])
    scored = Step(1, [Row("a", 0, [5], 3, True, GREEDY, score=True)])
    graphs = DecodeGraphs(model, allocate_cache(model, 4, 32))
    graphs.enabled = True  # pretend: which steps would it take?
    assert graphs.accepts(decode)
    assert not graphs.accepts(prefill)
    assert not graphs.accepts(scored)



class ProjectionSelector:
    """Deterministic neuron masks from the predictor input (about 20% per token), so that
    eager and captured runs select the same rows; optionally a head mask too."""

    def __init__(self, config, device, heads: bool = False, own: bool = False) -> None:
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(config.hidden_size, config.ffn_dim, generator=g).to(device)
        self.heads = heads
        self.num_heads = config.num_attention_heads
        self.keeps_every_head = not heads  # what lets runtime/graphs.py capture it
        self.own = own  # neurons from the layer's own MLP input (after attention)

    def mlp_reads_own_input(self, layer_id: int) -> bool:
        return self.own

    def select_neurons(self, layer_id: int, mlp_in: torch.Tensor) -> torch.Tensor:
        scores = mlp_in.float() @ self.w
        k = max(1, scores.shape[-1] // 5)
        return scores >= scores.topk(k, dim=-1).values[..., -1:]

    def __call__(self, layer_id: int, source: torch.Tensor) -> Selection:
        neurons = None if self.own else self.select_neurons(layer_id, source)
        heads = None
        if self.heads:
            heads = torch.ones(*source.shape[:2], self.num_heads, dtype=torch.bool,
                               device=source.device)
            heads[..., 0] = False
        return Selection(neurons=neurons, heads=heads)


def _decode(stage: Stage, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Teacher-forced decode (token 5 + step every time, so both stages see the same
    inputs whatever they would sample): each step's output hidden states."""
    rows = [Row(f"r{i}", i, p, 0, True, GREEDY) for i, p in enumerate(prompts)]
    stage.forward(Step(0, rows))
    outs = []
    for s in range(steps):
        # Rows drop out as the steps go on, so the batch size (and bucket) changes.
        live = [i for i in range(len(prompts)) if s < steps - 2 * i]
        step = Step(s + 1, [Row(f"r{i}", i, [5 + s], len(prompts[i]) + s, True, GREEDY)
                            for i in live])
        outs.append(stage.forward(step).float())
    return outs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_replay_equals_eager_stage(dtype):
    model = tiny(dtype, "cuda")
    prompts = [[2, 7, 9, 11], [2, 5], [2, 8, 8, 8, 8, 8, 1], [2, 3, 4]]
    eager = _decode(Stage(model, allocate_cache(model, 4, 48), cuda_graphs=False), prompts, 20)
    stage = Stage(model, allocate_cache(model, 4, 48))
    graphed = _decode(stage, prompts, 20)
    assert stage.graphs.enabled and set(stage.graphs.graphs) == {1, 2, 4}
    tol = 5e-3 if dtype == torch.float16 else 3e-2
    for want, got in zip(eager, graphed, strict=True):
        assert got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("own", [False, True], ids=["lookahead", "own-mlp-input"])
def test_sparse_graph_equals_eager_sparse_stage(own):
    """MLP-sparse decode captured (union compacted on the device) vs the eager sparse path
    with the same selections: same hidden states, same measured densities; neurons
    predicted from the lookahead source or from the layer's own MLP input."""
    model = tiny(torch.float16, "cuda")
    prompts = [[2, 7, 9, 11], [2, 5], [2, 8, 8, 8, 8, 8, 1], [2, 3, 4]]

    def stage(graphs):
        return Stage(model, allocate_cache(model, 4, 48, keep_inputs=True),
                     ProjectionSelector(model.config, "cuda", own=own), cuda_graphs=graphs)

    eager_stage, graph_stage = stage(False), stage(True)
    eager = _decode(eager_stage, prompts, 12)
    graphed = _decode(graph_stage, prompts, 12)
    assert graph_stage.graphs.enabled and set(graph_stage.graphs.graphs) == {1, 2, 4}
    for want, got in zip(eager, graphed, strict=True):
        assert float((got - want).norm() / want.norm()) < 5e-3
    assert 0.15 < graph_stage.sparse_stats.mlp_density < 0.9
    assert graph_stage.sparse_stats.mlp_density == pytest.approx(
        eager_stage.sparse_stats.mlp_density, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_head_selecting_stage_stays_eager():
    model = tiny(torch.float16, "cuda")
    prompts = [[2, 7, 9, 11], [2, 5]]

    def stage(graphs):
        return Stage(model, allocate_cache(model, 2, 48, keep_inputs=True),
                     ProjectionSelector(model.config, "cuda", heads=True), cuda_graphs=graphs)

    graph_stage = stage(True)
    graphed = _decode(graph_stage, prompts, 6)
    assert not graph_stage.graphs.enabled and not graph_stage.graphs.graphs
    eager = _decode(stage(False), prompts, 6)
    for want, got in zip(eager, graphed, strict=True):
        assert float((got - want).norm() / want.norm()) < 1e-3


PENALIZED = [SamplingParams(max_new_tokens=64, ignore_eos=True, repetition_penalty=1.3),
             SamplingParams(max_new_tokens=64, ignore_eos=True, frequency_penalty=0.8,
                            presence_penalty=0.5),
             SamplingParams(max_new_tokens=64, ignore_eos=True),
             SamplingParams(max_new_tokens=64, ignore_eos=True, temperature=0.9, seed=3,
                            repetition_penalty=0.8, frequency_penalty=-1.0)]


def _penalized_decode(stage: Stage, prompts: list[list[int]], steps: int):
    """Teacher-forced decode with penalties: each step's penalized logits of every row, then
    the per-slot counts the stage kept."""
    stage.run(Step(0, [Row(f"r{i}", i, p, 0, True, PENALIZED[i]) for i, p in
                       enumerate(prompts)]))
    fed: list[list[int]] = [[] for _ in prompts]
    outs = []
    for s in range(steps):
        live = [i for i in range(len(prompts)) if s < steps - 2 * i]  # buckets 4, 2, 1
        rows = []
        for i in live:
            token = (5 + s * (i + 1)) % 11  # repeats, so counts go above 1
            fed[i].append(token)
            rows.append(Row(f"r{i}", i, [token], len(prompts[i]) + s, True, PENALIZED[i]))
        step = Step(s + 1, rows)
        out = stage.forward(step)
        logits = stage._sampling_logits(step, out)
        # An eager stage leaves a plain greedy row's logits uncomputed (its argmax comes from
        # OPTModel.greedy_tokens): the raw logits are what it would have drawn from.
        outs.append(torch.stack([
            logits[b][1] if isinstance(logits[b], tuple)
            else stage.model.logits(out[b, len(rows[b].tokens) - 1]).float()
            for b in range(len(rows))]))
        stage.finish(step, out)
    return outs, stage.penalties, fed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_penalized_graph_decode_equals_eager_and_counts_each_token_once():
    """The captured last stage counts fed tokens (not warm-up's, not padding rows') and
    penalizes its logits as the eager stage does."""
    model = tiny(torch.float16, "cuda")
    prompts = [[2, 7, 9, 11], [2, 5], [2, 8, 8, 8, 8, 8, 1], [2, 3, 4]]
    eager, eager_pen, fed = _penalized_decode(
        Stage(model, allocate_cache(model, 4, 48), cuda_graphs=False), prompts, 14)
    stage = Stage(model, allocate_cache(model, 4, 48))
    graphed, pen, _ = _penalized_decode(stage, prompts, 14)
    assert stage.graphs.enabled and set(stage.graphs.graphs) == {1, 2, 4}
    for i, prompt in enumerate(prompts):
        want_prompt = torch.bincount(torch.tensor(prompt), minlength=300).float()
        want_output = torch.bincount(torch.tensor(fed[i]), minlength=300).float()
        if not PENALIZED[i].penalized:  # nothing to count for
            want_prompt, want_output = torch.zeros(300), torch.zeros(300)
        for p in (pen, eager_pen):
            assert torch.equal(p.prompt[i].cpu(), want_prompt), i
            assert torch.equal(p.output[i].cpu(), want_output), i
    for want, got in zip(eager, graphed, strict=True):
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        finite = ~torch.isinf(want)
        assert float((got[finite] - want[finite]).norm() / want[finite].norm()) < 5e-3


@pytest.mark.parametrize("real", [1, 3])
def test_padding_rows_do_not_widen_the_union(real):
    """A bucket of 4 rows running 1 or 3 real ones: the random selector draws for every
    row, but only the real rows' neurons are read and counted (each draws 10%)."""
    model = tiny(torch.float16, DEVICE)
    assert use_backend(model, "triton") == "triton"
    cache = allocate_cache(model, 4, 32)
    selector = RandomSelector(model.config.ffn_dim, model.config.num_attention_heads, 0.1, 1.0)
    graphs = DecodeGraphs(model, cache, selector)
    g = _Captured(model, cache, selector, 4, torch.device(DEVICE), torch.float16)
    graphs.load(g, Step(1, [Row(f"r{i}", i, [5 + i], 3, True, GREEDY) for i in range(real)]),
                None, None, None)
    assert g.live[:, 0, 0].tolist() == [i < real for i in range(4)]
    seen = []
    wrapped = g.sparse.selector

    def spy(layer_id, source):
        sel = wrapped(layer_id, source)
        seen.append(sel.neurons[:real].reshape(-1, model.config.ffn_dim).any(0))
        return sel

    g.sparse.selector = spy
    with torch.inference_mode():
        g._forward()
    k = model.config.ffn_dim // 10
    for union, real_rows in zip(g.sparse.union.tolist(), seen, strict=True):
        assert union == pytest.approx(int(real_rows.sum()) / model.config.ffn_dim)
        assert k <= int(real_rows.sum()) <= real * k
