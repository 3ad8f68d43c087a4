"""Offloaded layers (host records, kernels' host-row path) against the resident model.

A layer moved to the host loses its module weights (meta tensors), so equal outputs show
that its rows really came from the records. Without a GPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported) over CPU "host" records.
"""

import pytest
import torch
from test_sparse_backend import (  # noqa: E402
    CFG,
    DEVICE,
    TOL,
    decode_run,
    rel_err,
    selector,
    tiny_model,
)

from dejavu.runtime import sparse_backend  # noqa: E402
from dejavu.runtime.offload import (  # noqa: E402
    OffloadSelector,
    fit_budget,
    kv_recomputed,
    move_resident,
    offload_layers,
    plan_offload,
)
from dejavu.runtime.opt_config import OPTConfig  # noqa: E402
from dejavu.runtime.sampling import SamplingParams  # noqa: E402
from dejavu.runtime.selection import RandomSelector  # noqa: E402
from dejavu.runtime.sparse import Selection  # noqa: E402
from dejavu.runtime.weight_store import LayerPlacement, PlacementError, gib  # noqa: E402
from dejavu.scheduler.engine import Engine  # noqa: E402


def layer_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.layers()[0].parameters())


def other_bytes(model):
    inner = {id(p) for layer in model.layers() for p in layer.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inner)


def test_plan_offload_keeps_what_fits_the_budget():
    model = tiny_model(torch.float16)
    base, layer = other_bytes(model), layer_bytes(model)
    assert plan_offload(model, base + 2 * layer) == []
    assert plan_offload(model, base + layer + 100, reserved_bytes=100) == [1]
    assert plan_offload(model, base + layer - 1) == [0, 1]
    with pytest.raises(PlacementError, match="gpu_memory_gib"):
        plan_offload(model, gib(1.0), reserved_bytes=gib(2.0))


def test_resident_layers_are_spread_between_the_offloaded_ones():
    """As many layers as fit stay resident, one in the middle of each equal stretch of the
    depth, so that the host's time on them passes while the link carries offloaded rows."""
    from dejavu.runtime.offload import spread_resident

    assert spread_resident(40, 11) == [1, 4, 8, 12, 15, 19, 23, 26, 30, 34, 37]
    assert spread_resident(4, 3) == [0, 2, 3]
    for n in range(1, 50):
        for kept in range(1, n + 1):
            got = spread_resident(n, kept)
            assert got == sorted(set(got)) and len(got) == kept, (n, kept)
            for i, pos in enumerate(got):  # one in each of kept equal stretches of n
                assert i * n <= pos * kept < (i + 1) * n, (n, kept, got)
    config = OPTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=8, ffn_dim=72,
                       num_attention_heads=4, max_position_embeddings=32,
                       word_embed_proj_dim=32)
    model = tiny_model(torch.float16, config=config)
    base, layer = other_bytes(model), layer_bytes(model)
    assert plan_offload(model, base + 3 * layer + 10) == [1, 2, 4, 5, 7]  # 0, 3, 6 kept


@pytest.mark.parametrize("offloaded,batch", [([1], 3), ([0, 1], 1)])
def test_offloaded_layers_equal_resident_prefill_and_decode(offloaded, batch):
    dtype = torch.float16
    ref, ref_tokens, ref_stats = decode_run(tiny_model(dtype), "torch", batch)
    model = tiny_model(dtype, "cpu")  # loaded on the CPU, the offloaded layers never move
    offload_layers(model, offloaded, device=DEVICE)
    move_resident(model, DEVICE)
    for lid in offloaded:
        layer = model.layers()[lid]
        assert layer.fc1.weight.is_meta and layer.self_attn.q_proj.weight.is_meta
        assert sparse_backend.is_offloaded(layer)
    out, tokens, stats = decode_run(model, "torch", batch)  # resident layers on torch
    for step in range(out.shape[0]):
        assert rel_err(out[step], ref[step]) < TOL[dtype], f"step {step}"
    assert tokens == ref_tokens
    staged = kv_recomputed(model)  # decode steps of offloaded layers count on the device
    # So do resident layers' one-pass completions on a GPU: fold them in first.
    stats.settle()
    ref_stats.settle()
    recomputed = [s.kv_recomputed + staged.get(lid, 0) for lid, s in stats.layers.items()]
    ref_recomputed = [s.kv_recomputed for s in ref_stats.layers.values()]
    # A streamed prefill writes every head's K/V (the whole layer is on the device), so
    # offloaded layers complete fewer heads later; resident layers exactly as often.
    for lid, (n, ref_n) in enumerate(zip(recomputed, ref_recomputed, strict=True)):
        assert n <= ref_n if lid in offloaded else n == ref_n
    assert sum(recomputed[i] for i in offloaded) > 0


def test_hot_rows_on_the_device_and_the_rest_on_the_host():
    """Some rows in the layer's GPU cache, the others read from the host table: the same
    result as all-host and as the resident model."""
    dtype = torch.float16
    ref, ref_tokens, _ = decode_run(tiny_model(dtype), "torch", 2, steps=2)
    model = tiny_model(dtype, "cpu")
    hot = LayerPlacement(1, torch.tensor([3, 70, 0, 41]), torch.tensor([2]), False)
    offload_layers(model, [1], device=DEVICE, placements={1: hot})
    move_resident(model, DEVICE)
    out, tokens, _ = decode_run(model, "torch", 2, steps=2)
    assert rel_err(out, ref) < TOL[dtype] and tokens == ref_tokens


def test_offloaded_engine_tokens_equal_resident_engine():
    """The in-process engine over a model whose second layer exceeds the budget: the same
    greedy tokens as the resident engine, also where the selector keeps a block dense."""
    prompts = [[2, 9, 4], [2, 40, 41, 42, 7], [2, 13]]
    params = SamplingParams(max_new_tokens=4, temperature=0.0)

    def sel():  # layer 1's neurons dense: the offloaded layer must compute every neuron
        inner = selector()

        def call(lid, x):
            s = inner(lid, x)
            return s if lid != 1 else Selection(heads=s.heads)
        return call

    resident = tiny_model(torch.float16)
    sparse_backend.use_backend(resident, "torch")
    ref = [c.tokens for c in Engine(resident, max_batch=3, max_len=32,
                                    selector=sel()).run(prompts, params)]
    model = tiny_model(torch.float16, "cpu")
    layers = fit_budget(model, other_bytes(model) + layer_bytes(model), device=DEVICE)
    assert layers == [1]
    engine = Engine(model, max_batch=3, max_len=32,
                    selector=OffloadSelector(sel(), layers, CFG))
    assert [c.tokens for c in engine.run(prompts, params)] == ref
    assert engine.stage.sparse_stats.layers[1].mlp_computed == \
        engine.stage.sparse_stats.layers[1].tokens  # every neuron, on every token


def test_offload_refuses_float32_and_unknown_layers():
    with pytest.raises(sparse_backend.BackendError, match="float16 and bfloat16"):
        offload_layers(tiny_model(torch.float32), [1], device="cpu")
    with pytest.raises(ValueError, match="layer 7"):
        offload_layers(tiny_model(torch.float16), [7], device="cpu")


def test_offload_selector_fills_dense_blocks_only_for_offloaded_layers():
    inner = RandomSelector(CFG.ffn_dim, CFG.num_attention_heads, 1.0, 0.25, seed=0)
    wrapped = OffloadSelector(inner, [1], CFG)
    x = torch.zeros(2, 3, 32)
    assert wrapped(0, x).neurons is None
    sel = wrapped(1, x)
    assert sel.neurons.shape == (2, 3, CFG.ffn_dim) and bool(sel.neurons.all())
    assert int(sel.heads.sum()) == 2 * 3  # the inner head selection is kept
