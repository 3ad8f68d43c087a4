"""The sparse ops' Triton backend against their torch reference, through the real model.

The same tiny random OPT runs prefill and several decode steps (with lazily completed K/V
for heads skipped earlier) once with backend "torch" and once with "triton"; logits must
agree within a tolerance named per dtype, and greedy tokens must be identical. Selections
come from a seeded RandomSelector, so both runs select the same rows whatever their
rounding. Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported): shapes stay tiny. GPU-marked tests repeat this on CUDA.
"""

import pytest
import torch

from dejavu.runtime import sparse_backend  # noqa: E402
from dejavu.runtime.model import Batch, KVCache, OPTModel  # noqa: E402
from dejavu.runtime.opt_config import OPTConfig  # noqa: E402
from dejavu.runtime.sampling import SamplingParams  # noqa: E402
from dejavu.runtime.selection import RandomSelector  # noqa: E402
from dejavu.runtime.settings import SettingsError, load_settings  # noqa: E402
from dejavu.runtime.sparse import SparseContext, SparseStats  # noqa: E402
from dejavu.scheduler.engine import Engine  # noqa: E402

# 4 heads of 8, an ffn of 72 (not a multiple of the kernels' 32-neuron blocks), a prime vocab.
CFG = OPTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, ffn_dim=72,
                num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)
# Relative error of the logits ||triton - torch|| / ||torch||: both round the same
# intermediates to the model dtype; what differs is accumulation order (the kernels sum in
# fp32 in another order), compounded over two layers.
TOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2}
DTYPES = [torch.float16, torch.bfloat16]
# The CPU tests run on the GPU too when there is one (real kernels instead of interpreted).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT_LEN = 5


def tiny_model(dtype, device=DEVICE, config=CFG, seed=0):
    torch.manual_seed(seed)
    model = OPTModel(config)
    model.init_weights(std=0.2)
    with torch.no_grad():  # non-zero biases, so that a dropped bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.to(device=device, dtype=dtype).eval()


def selector(config=CFG):
    # One head of four per token: the batch's union leaves heads out, and decode steps
    # select heads skipped earlier (their K/V completed lazily).
    return RandomSelector(config.ffn_dim, config.num_attention_heads, 0.3, 0.25, seed=1)


class Calls:
    """Counts launches of the kernel entry points the backend uses."""

    def __init__(self, monkeypatch):
        import dejavu.kernels.sparse_attention as attn
        import dejavu.kernels.sparse_mlp as mlp

        self.n = {"mlp": 0, "attention": 0}
        for module, name, kind in ((mlp, "sparse_mlp", "mlp"),
                                   (attn, "decode_attention", "attention")):
            real = getattr(module, name)

            def counted(*args, _real=real, _kind=kind, **kwargs):
                self.n[_kind] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)


def decode_run(model, backend, batch, steps=3, prompt_len=PROMPT_LEN, config=CFG, feed=None):
    """Prefill, then ``steps`` greedy decode steps, through the model and a KV cache that
    keeps attention inputs. Returns (last-position logits per step [steps+1, B, V] in fp32,
    tokens, stats). ``feed``: tokens to decode instead of the greedy ones (teacher forcing,
    so that one near-tie cannot send two runs down different paths)."""
    sparse_backend.use_backend(model, backend)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    sel, stats = selector(config), SparseStats()
    cache = KVCache(config, model.layer_ids, 2 * batch, config.max_position_embeddings,
                    dtype=dtype, device=device, keep_inputs=True)
    slots = (torch.arange(batch) * 2 + 1).to(device)  # not 0..B-1: rows keep their slots
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, config.vocab_size, (batch, prompt_len), generator=g).to(device)
    out, tokens = [], []
    with torch.inference_mode():
        pos = torch.arange(prompt_len, device=device).expand(batch, prompt_len)
        for step in range(steps + 1):
            # dense_above > 1: every block gathers (a wide union would otherwise run dense
            # and skip the kernels this test counts).
            ctx = SparseContext(sel, stats=stats, dense_above=1.01)
            logits = model(ids, Batch(pos, slots, cache, ctx))
            out.append(logits[:, -1].float())
            ids = logits[:, -1].argmax(-1)[:, None]
            tokens.append(ids[:, 0].tolist())
            if feed is not None:
                ids = torch.tensor(feed[step], device=device)[:, None]
            pos = torch.full((batch, 1), prompt_len + step, device=device)
    return torch.stack(out), tokens, stats


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_triton_backend_equals_torch_prefill_and_decode(dtype, batch, monkeypatch):
    model = tiny_model(dtype)
    ref, ref_tokens, ref_stats = decode_run(model, "torch", batch)
    calls = Calls(monkeypatch)
    out, tokens, stats = decode_run(model, "triton", batch)
    # The kernels ran: the MLP on the prefill (B*5 <= 16 rows) and every decode step, the
    # attention on every decode step, in both layers.
    assert calls.n == {"mlp": 2 * 4, "attention": 2 * 3}
    for step in range(4):
        assert rel_err(out[step], ref[step]) < TOL[dtype], f"step {step}"
    assert tokens == ref_tokens
    # Heads skipped earlier were completed lazily: by the reference for every skipped
    # position, by the kernels' decode steps (padded unions: every head's K/V written at
    # each position) only where the prefill skipped them. Counted on the device: settled.
    stats.settle()
    ref_stats.settle()
    recomputed = [s.kv_recomputed for s in stats.layers.values()]
    reference = [s.kv_recomputed for s in ref_stats.layers.values()]
    assert all(a <= b for a, b in zip(recomputed, reference, strict=True))
    assert sum(reference) > 0
    if batch == 1:  # one row's prefill skips heads (three rows' union covers them all)
        assert sum(recomputed) > 0


def test_fused_mlp_variant_equals_torch(monkeypatch):
    """The one-kernel MLP variant (a loop over C per program) instead of the split pair."""
    model = tiny_model(torch.float16)
    ref, ref_tokens, _ = decode_run(model, "torch", 2, steps=2)
    monkeypatch.setattr(sparse_backend, "MLP_ARGS", {"block_n": 16, "block_c": 16})
    out, tokens, _ = decode_run(model, "triton", 2, steps=2)
    assert rel_err(out, ref) < TOL[torch.float16]
    assert tokens == ref_tokens


def test_long_prefill_falls_back_to_torch_and_decode_still_uses_kernels(monkeypatch):
    """3 rows x 7 tokens exceed one launch's 16 rows: the prefill runs on torch (bitwise the
    reference), the decode steps on the kernels."""
    model = tiny_model(torch.float16)
    ref, ref_tokens, _ = decode_run(model, "torch", 3, steps=1, prompt_len=7)
    calls = Calls(monkeypatch)
    out, tokens, _ = decode_run(model, "triton", 3, steps=1, prompt_len=7)
    assert torch.equal(out[0], ref[0])
    assert calls.n == {"mlp": 2, "attention": 2}
    assert rel_err(out[1], ref[1]) < TOL[torch.float16]
    assert tokens == ref_tokens


def test_engine_greedy_tokens_identical_across_backends():
    """The in-process engine (scheduler, Stage, continuous batching of 3 requests of
    different lengths) generates the same greedy tokens with either backend."""
    model = tiny_model(torch.float16)
    prompts = [[2, 9, 4], [2, 40, 41, 42, 7], [2, 13]]
    params = SamplingParams(max_new_tokens=4, temperature=0.0)

    def run(backend):
        sparse_backend.use_backend(model, backend)
        engine = Engine(model, max_batch=3, max_len=32, selector=selector())
        return [c.tokens for c in engine.run(prompts, params)]

    ref = run("torch")
    assert run("triton") == ref
    assert all(len(t) == 4 for t in ref)


def storage(t):
    return t.untyped_storage().data_ptr()


def test_kernel_layout_is_adopted_in_place_once_and_follows_reloads():
    """The tables are the parameters' own memory (no second copy of the weights), built
    once, with the parameters' values unchanged; a reload rebuilds them."""
    model = tiny_model(torch.float16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model.layers()[0]
    attn = layer.self_attn
    sparse_backend.use_backend(model, "triton")
    rows = sparse_backend.mlp_rows(layer)
    heads = sparse_backend.head_table(attn)
    assert sparse_backend.mlp_rows(layer) is rows  # cached, not rebuilt per call
    assert sparse_backend.head_table(attn) is heads
    assert rows.w2t.is_contiguous() and torch.equal(rows.w2t, layer.fc2.weight.T)
    assert storage(rows.w2t) == storage(layer.fc2.weight)
    assert storage(rows.w1) == storage(layer.fc1.weight)
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
        assert storage(p) == storage(heads.wqkv)
    assert storage(attn.out_proj.weight) == storage(heads.wo)
    assert torch.equal(heads.wqkv[1].reshape(32, 32), attn.k_proj.weight)
    assert torch.equal(heads.bqkv[2].reshape(32), attn.v_proj.bias)
    assert torch.equal(heads.wo.reshape(32, 32).T, attn.out_proj.weight)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # A reload in place (load_state_dict copies into the parameters) must not leave stale
    # tables behind.
    new = {k: v * 2 if k.endswith("weight") else v for k, v in before.items()}
    model.load_state_dict(new)
    assert torch.equal(sparse_backend.mlp_rows(layer).w2t, new["decoder.layers.0.fc2.weight"].T)
    wo = sparse_backend.head_table(attn).wo
    assert torch.equal(wo.reshape(32, 32).T, new["decoder.layers.0.self_attn.out_proj.weight"])


def test_dense_and_torch_paths_unchanged_by_the_kernel_layout():
    """After the layout is adopted, the dense model and the torch backend compute what they
    computed before (they read the same values through other strides)."""
    model = tiny_model(torch.float16)
    ids = torch.randint(4, 61, (2, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    pos = torch.arange(6, device=DEVICE).expand(2, 6)
    with torch.no_grad():
        dense = model(ids, Batch(pos)).float()
    ref, ref_tokens, _ = decode_run(model, "torch", 2, steps=2)
    decode_run(model, "triton", 1, steps=1)  # adopts the layout in every layer
    assert not model.layers()[1].self_attn.out_proj.weight.is_contiguous()
    assert not model.layers()[1].fc2.weight.is_contiguous()
    with torch.no_grad():
        assert rel_err(model(ids, Batch(pos)).float(), dense) < 1e-3
    out, tokens, _ = decode_run(model, "torch", 2, steps=2)
    assert rel_err(out, ref) < 1e-3 and tokens == ref_tokens


def test_backend_resolution_and_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sparse_backend.resolve("auto", cpu, torch.float16) == "torch"
    assert sparse_backend.resolve("auto", cuda, torch.float16) == "triton"
    assert sparse_backend.resolve("auto", cuda, torch.float32) == "torch"
    assert sparse_backend.resolve("torch", cuda, torch.bfloat16) == "torch"
    with pytest.raises(sparse_backend.BackendError, match="float16 and bfloat16"):
        sparse_backend.resolve("triton", cuda, torch.float32)
    with pytest.raises(sparse_backend.BackendError, match="'cuda'"):
        sparse_backend.resolve("cuda", cpu, torch.float16)
    # An fp32 model never reaches the kernels on "auto"; asking for them is an error.
    model = tiny_model(torch.float32)
    assert sparse_backend.use_backend(model, "auto") == "torch"
    with pytest.raises(sparse_backend.BackendError, match=r"dtype = \"float16\""):
        sparse_backend.use_backend(model, "triton")


def test_backend_setting_is_validated(tmp_path):
    path = tmp_path / "dejavu.toml"
    path.write_text('[sparsity]\nbackend = "triton"\n')
    assert load_settings(path).sparsity.backend == "triton"
    assert load_settings(None, {"sparsity.backend": None}).sparsity.backend == "auto"
    path.write_text('[sparsity]\nbackend = "cuda"\n')
    with pytest.raises(SettingsError, match="backend"):
        load_settings(path)


def test_the_builder_applies_the_backend(tmp_path):
    from dejavu.runtime.build import build_model, resolve
    from dejavu.runtime.checkpoint import save_model
    from dejavu.runtime.predictors import PredictorSet
    from dejavu.runtime.selection import SelectionError
    from dejavu.runtime.settings import make_settings

    model = tiny_model(torch.float16, "cpu")
    save_model(model, tmp_path)
    PredictorSet.create(model, 4, 4).save(tmp_path / "predictors")

    def build(backend, dtype="float16"):
        return build_model(resolve(make_settings({
            "model.path": str(tmp_path), "model.dtype": dtype, "model.device": DEVICE,
            "sparsity.backend": backend}))).model

    assert sparse_backend.backend_of(build("triton").layers()[1]) == "triton"
    assert sparse_backend.backend_of(build("torch").layers()[1].self_attn) == "torch"
    # A backend that cannot run is the user's error, named as such (the CLI reports it).
    with pytest.raises(SelectionError, match=r"backend = 'triton'.*float32"):
        build("triton", "float32")


# --- on a GPU ---------------------------------------------------------------------------------

GPU_CFG = OPTConfig(vocab_size=211, hidden_size=256, num_hidden_layers=3, ffn_dim=1024,
                    num_attention_heads=8, max_position_embeddings=128,
                    word_embed_proj_dim=256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_gpu_triton_backend_equals_torch(dtype, batch, monkeypatch):
    model = tiny_model(dtype, "cuda", GPU_CFG)
    assert sparse_backend.use_backend(model, "auto") == "triton"  # the default on CUDA
    compare_backends(model, dtype, batch, monkeypatch)


def compare_backends(model, dtype, batch, monkeypatch, steps=6):
    """Teacher-forced with the reference's tokens: logits within tolerance at every step,
    and the same greedy token wherever the reference's top-2 margin exceeds the difference
    (atomic adds on a GPU make the kernels' sums order-dependent)."""
    ref, ref_tokens, _ = decode_run(model, "torch", batch, steps=steps, prompt_len=2,
                                    config=GPU_CFG)
    calls = Calls(monkeypatch)
    out, tokens, _ = decode_run(model, "triton", batch, steps=steps, prompt_len=2,
                                config=GPU_CFG, feed=ref_tokens)
    layers = GPU_CFG.num_hidden_layers
    prefill_mlp = 1 if 2 * batch <= 16 else 0  # more token rows stay on torch
    assert calls.n == {"mlp": layers * (steps + prefill_mlp), "attention": layers * steps}
    for step in range(steps + 1):
        assert rel_err(out[step], ref[step]) < TOL[dtype], f"step {step}"
        top2 = ref[step].topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * (out[step] - ref[step]).abs().max()
        same = torch.tensor(tokens[step]) == torch.tensor(ref_tokens[step])
        assert bool(same[clear.cpu()].all()), f"step {step}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_greedy_tokens_identical_across_backends():
    model = tiny_model(torch.float16, "cuda", GPU_CFG)
    prompts = [[2, 9, 4, 100], [2, 40, 41, 42, 7, 150], [2, 13]]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)

    def run(backend):
        sparse_backend.use_backend(model, backend)
        engine = Engine(model, max_batch=3, max_len=64, selector=selector(GPU_CFG))
        return [c.tokens for c in engine.run(prompts, params)]

    assert run("triton") == run("torch")
