"""Predictors: file format and model fingerprint, label collection, training, selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dejavu.runtime.model import Batch, OPTModel, full_positions
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.predictors import (
    PredictorError,
    PredictorSet,
    fingerprint,
)
from dejavu.runtime.selection import (
    PredictorSelector,
    RandomSelector,
    SelectionConfig,
    SelectionError,
    topk_mask,
)
from dejavu.runtime.sparse import SparseContext
from dejavu.tools.collect_labels import collect, pack_bits, unpack_bits
from dejavu.tools.train_predictors import (
    TrainConfig,
    counts_above,
    hits_at_k,
    layer_frequencies,
    leading_eigenvectors,
    svd_init,
    train_predictors,
)

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "opt-gutenberg-31m"

CFG = OPTConfig(vocab_size=89, hidden_size=32, num_hidden_layers=3, ffn_dim=84,
                num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)


def tiny_model(seed: int = 0, config: OPTConfig = CFG) -> OPTModel:
    torch.manual_seed(seed)
    model = OPTModel(config)
    model.init_weights(std=0.15)
    with torch.no_grad():  # float16-representable weights: the checkpoints' precision
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def windows(n: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (n, t), generator=g)


def test_bits_round_trip_odd_width():
    mask = torch.rand(7, 21) > 0.5
    bits = pack_bits(mask)
    assert bits.shape == (7, 3) and bits.dtype == torch.uint8
    assert torch.equal(unpack_bits(bits, 21), mask)


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    preds = PredictorSet.create(model, mlp_rank=5, head_rank=3)
    for m in list(preds.mlp.values()) + list(preds.heads.values()):
        torch.nn.init.normal_(m.up.weight)
    preds.points[1].mlp_k, preds.points[1].mlp_recall = 17, 0.93
    preds.report = {"note": "x"}
    path = preds.save(tmp_path / "p")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["num_layers"] == "3" and meta["mlp_rank"] == "5" and "wiring" in meta
    assert json.loads(meta["operating_points"])["1"]["mlp_k"] == 17
    back = PredictorSet.load(tmp_path / "p", model)
    assert back.points == preds.points and back.report == {"note": "x"}
    x = torch.randn(2, 3, CFG.hidden_size)
    for i in range(3):
        assert torch.equal(back.mlp[i](x), preds.mlp[i](x))
        assert torch.equal(back.heads[i](x), preds.heads[i](x))


def test_same_checkpoint_in_float16_matches():
    model = tiny_model()
    assert fingerprint(model.half()).model_hash == fingerprint(tiny_model()).model_hash


def test_predictors_for_another_model_are_refused(tmp_path):
    PredictorSet.create(tiny_model(seed=0), 4, 4).save(tmp_path / "p")
    with pytest.raises(PredictorError, match="another model"):
        PredictorSet.load(tmp_path / "p", tiny_model(seed=1))  # same shapes, other weights
    bigger = OPTConfig(**{**CFG.__dict__, "num_hidden_layers": 4})
    with pytest.raises(PredictorError, match="num_layers=3"):
        PredictorSet.load(tmp_path / "p", tiny_model(config=bigger))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(PredictorError, match="bad.safetensors"):
        PredictorSet.load(tmp_path / "bad.safetensors", tiny_model())
    with pytest.raises(PredictorError, match="no such predictor file"):
        PredictorSet.load(tmp_path / "missing", tiny_model())


def test_a_layer_span_loads_its_layers(tmp_path):
    model = tiny_model()
    PredictorSet.create(model, 4, 4).save(tmp_path / "p")
    span = OPTModel(CFG, range(1, 3))
    span.load_state_dict({k: v for k, v in model.state_dict().items()
                          if k in span.state_dict()})
    assert PredictorSet.load(tmp_path / "p", span).layer_ids == [1, 2]


def test_collection_records_the_runtime_wiring_and_exact_labels():
    model = tiny_model()
    ids = windows(2, 9)
    data = collect(model, ids, batch_size=2)
    # Recompute by hand: layer l's input is the residual entering layer l-1's MLP block.
    h = model.embed(ids, full_positions(2, 9, "cpu"))
    batch = Batch(full_positions(2, 9, "cpu"))
    source = h
    for layer in model.layers():
        i = layer.layer_id
        torch.testing.assert_close(data.inputs[i].float(), source.reshape(-1, 32),
                                   rtol=1e-3, atol=1e-3)  # stored as float16
        mid = layer.attention_block(h, batch)
        torch.testing.assert_close(data.mlp_inputs[i].float(), mid.reshape(-1, 32),
                                   rtol=1e-3, atol=1e-3)  # the "mlp_in" source
        pre = layer.fc1(layer.final_layer_norm(mid))
        assert torch.equal(unpack_bits(data.neuron_bits[i], 84), (pre > 0).reshape(-1, 84))
        attn = layer.self_attn
        x = layer.self_attn_layer_norm(h)
        q, k, v = (attn._split(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        w = attn.out_proj.weight.view(32, 4, 8)
        contrib = torch.einsum("bhtd,chd->bthc", o, w)  # [B, T, H, C]
        want = contrib.norm(dim=-1).reshape(-1, 4)
        torch.testing.assert_close(data.head_norms[i].float(), want, rtol=2e-3, atol=1e-4)
        source, h = mid, layer.mlp_block(mid)


def test_hits_at_k_matches_brute_force():
    scores, labels = torch.randn(5, 11), torch.rand(5, 11) > 0.6
    hits = hits_at_k(scores, labels)
    for k in (0, 1, 4, 11):
        top = scores.topk(k, -1).indices if k else torch.empty(5, 0, dtype=torch.long)
        assert hits[k] == labels.gather(-1, top).sum()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 11), (17, 13)])
def test_counts_above_thresholds_match_comparing_each(shape):
    g = torch.Generator().manual_seed(sum(shape))
    scores = torch.randn(shape, generator=g).round(decimals=1)  # ties with the thresholds
    labels = torch.rand(shape, generator=g) > 0.5
    thresholds = [0.3, -0.5, 0.3, 0.0, 2.5, -9.0, float(scores.reshape(-1)[0])]
    for chunk in (3, 2048):  # rows per pass: several, or all at once
        above, hits = counts_above(scores, labels, thresholds, chunk=chunk)
        for t, n, hit in zip(thresholds, above, hits, strict=True):
            assert n == int((scores > t).sum()) and hit == int(((scores > t) & labels).sum())


@pytest.mark.parametrize("f", [1, 8, 13, 72])
def test_layer_frequencies_count_every_bit_plane(f):
    g = torch.Generator().manual_seed(f)
    mask = torch.rand(9000, f, generator=g) > 0.7  # past one 8192-row chunk
    norms = torch.rand(9000, 5, generator=g).half()
    mlp, heads = layer_frequencies(pack_bits(mask), norms, f, 2)
    torch.testing.assert_close(mlp, (mask.double().sum(0) / 9000).float(), rtol=0, atol=0)
    want = topk_mask(norms.float(), 2).double().sum(0) / 9000
    torch.testing.assert_close(heads, want.float(), rtol=0, atol=0)


def test_training_learns_better_than_random_and_meets_calibrated_recall():
    model = tiny_model()
    ids = windows(60, 24, seed=3)
    docs = torch.arange(60) // 3  # 20 documents of 3 windows
    cfg = TrainConfig(mlp_rank=16, head_rank=8, epochs=6, batch_size=128, lr=1e-2,
                      mlp_recall=0.9, head_density=0.5, head_point=0.5)
    preds, report, _ = train_predictors(model, ids, docs, cfg, device=torch.device("cpu"),
                                     log=lambda *_: None)
    for row in report["layers"]:
        # A random choice of k neurons recalls k/F of the firing ones; heads: 0.5.
        assert row["mlp_recall"] > row["mlp_density"] + 0.1, row
        assert row["head_recall"] > 0.6, row
        assert 0 < row["mlp_k"] < CFG.ffn_dim
    table = preds.points[1].mlp_thresholds  # higher recall, lower threshold
    assert table["0.8"] >= table["0.9"] >= table["0.99"]
    # The file's operating points drive the selector: k neurons per token.
    sel = PredictorSelector(preds)
    src = torch.randn(1, 5, CFG.hidden_size)
    for layer in range(3):
        s = sel(layer, src)
        # The default wiring predicts neurons from the layer's own MLP input, later.
        assert s.neurons is None and sel.mlp_reads_own_input(layer)
        assert (sel.select_neurons(layer, src).sum(-1) == preds.points[layer].mlp_k).all()
        assert (s.heads.sum(-1) == 2).all()


def test_selector_settings_and_measured_density():
    model = tiny_model()
    preds = PredictorSet.create(model, 4, 4)
    sel = PredictorSelector(preds, SelectionConfig(mlp_density=0.25, head_density=0.5,
                                                   dense_layers=frozenset({0})))
    ctx = SparseContext(sel)
    ids = windows(2, 7)
    model(ids, Batch(full_positions(2, 7, "cpu"), sparse=ctx))
    per_layer = ctx.stats.as_dict()["layers"]
    assert per_layer["0"]["mlp_density"] == 1.0
    assert per_layer["1"]["mlp_density"] == pytest.approx(21 / 84)
    assert per_layer["2"]["head_density"] == 0.5
    assert ctx.stats.mlp_density == pytest.approx((1 + 2 * 21 / 84) / 3)
    rnd = RandomSelector(84, 4, 0.25, 0.5, seed=1)
    ctx = SparseContext(rnd)
    model(ids, Batch(full_positions(2, 7, "cpu"), sparse=ctx))
    assert ctx.stats.head_density == 0.5


def test_the_builder_resolves_and_applies_sparsity_settings(tmp_path):
    """runtime/build.py: --sparse/--dense/[sparsity] decide dense or sparse once
    (``resolve``), and the built selector has the configured densities and dense layers."""
    from dejavu.runtime.build import build_model, resolve
    from dejavu.runtime.checkpoint import save_model
    from dejavu.runtime.selection import SelectionError
    from dejavu.runtime.settings import make_settings

    model = tiny_model()
    save_model(model, tmp_path)

    def settings(**sparsity):
        return make_settings({"model.path": str(tmp_path)} |
                             {f"sparsity.{k}": v for k, v in sparsity.items()})

    on = settings()
    assert build_model(resolve(on)).selector is None  # no predictors: dense
    with pytest.raises(SelectionError, match="no predictors"):
        resolve(on, sparse=True)
    PredictorSet.create(model, 4, 4).save(tmp_path / "predictors")
    sel = build_model(resolve(settings(mlp_density=0.25, dense_layers="0, 2"))).selector
    assert sel.ks(1) == (21, 4) and sel.config.dense_layers == {0, 2}
    assert build_model(resolve(on, sparse=False)).selector is None
    assert build_model(resolve(settings(enabled=False))).selector is None
    with pytest.raises(SelectionError, match="dense_layers"):
        build_model(resolve(settings(dense_layers="one")))
    with pytest.raises(SelectionError, match="does not exist"):
        resolve(settings(predictors=str(tmp_path / "nope")))


def test_predictors_refused_for_a_bfloat16_load_say_what_to_do(tmp_path):
    """A bfloat16 load of the model the predictors were made for hashes differently (its
    weights round to another format): the refusal names the dtype and the ways out."""
    model = tiny_model()
    PredictorSet.create(model, 4, 4).save(tmp_path)
    with pytest.raises(PredictorError, match="loaded in bfloat16.*float16 or float32.*--dense"):
        PredictorSet.load(tmp_path, model.to(torch.bfloat16))
    with pytest.raises(PredictorError) as info:  # another model: no dtype hint
        PredictorSet.load(tmp_path, tiny_model(seed=1))
    assert "bfloat16" not in str(info.value)


def test_the_budget_knows_before_any_weight_whether_steps_skip_heads(tmp_path):
    """runtime/build.py ``steps_skip_heads`` (settings and the file's operating points, read
    by the launch's plan and each worker's budget) says what ``needs_kv_inputs`` of the
    selector ``build_model`` makes says: whether the cache keeps attention inputs."""
    from dataclasses import replace

    from dejavu.runtime.build import build_model, resolve, steps_skip_heads
    from dejavu.runtime.checkpoint import save_model
    from dejavu.runtime.settings import make_settings
    from dejavu.runtime.sparse import needs_kv_inputs

    model = tiny_model()
    save_model(model, tmp_path)
    preds = PredictorSet.create(model, 4, 4)
    preds.points[1] = replace(preds.points[1], head_k=2)  # layer 1 skips half its heads
    preds.save(tmp_path / "predictors")

    def both(**sparsity) -> tuple[bool, bool]:
        settings = resolve(make_settings({"model.path": str(tmp_path)} |
                                         {f"sparsity.{k}": v for k, v in sparsity.items()}))
        built = build_model(settings)
        return steps_skip_heads(settings, model.config), needs_kv_inputs(built.selector)

    assert both() == (True, True)  # the file's layer 1
    assert both(dense_layers="1") == (False, False)
    assert both(head_density=1.0) == (False, False)
    assert both(head_density=0.5, dense_layers="1") == (True, True)
    assert both(enabled=False) == (False, False)
    random = {"selector": "random", "mlp_density": 0.5}
    assert both(**random, head_density=1.0) == (False, False)
    assert both(**random, head_density=0.5) == (True, True)


def test_threshold_selection_keeps_what_the_predictor_scores_above_it(tmp_path):
    model = tiny_model()
    preds = PredictorSet.create(model, 4, 4)
    for m in preds.mlp.values():
        torch.nn.init.normal_(m.up.weight)
    preds.points[1].mlp_threshold = 0.3
    preds.mlp_select = "threshold"
    preds = PredictorSet.load(preds.save(tmp_path / "p"), model)
    src = torch.randn(2, 5, CFG.hidden_size)
    sel = PredictorSelector(preds)(1, src)
    assert torch.equal(sel.neurons, preds.mlp[1](src) > 0.3)
    assert 0 < sel.neurons.sum(-1).float().std()  # tokens keep different numbers
    preds.points[1].mlp_thresholds = {"0.9": 0.5}
    other = PredictorSelector(preds, SelectionConfig(mlp_recall=0.9))(1, src)
    assert torch.equal(other.neurons, preds.mlp[1](src) > 0.5)
    with pytest.raises(SelectionError, match="calibrated for recall"):
        PredictorSelector(preds, SelectionConfig(mlp_recall=0.7))(1, src)
    forced = PredictorSelector(preds, SelectionConfig(mlp_select="topk"))(1, src)
    assert forced.neurons is None  # the file's k, which for untrained predictors is all


def exact_own_input_predictors(model: OPTModel) -> PredictorSet:
    """Full-rank closed-form MLP predictors at threshold 0: they select exactly the neurons
    whose fc1 pre-activation is positive, when (and only when) fed the MLP's own input."""
    preds = PredictorSet.create(model, mlp_rank=CFG.hidden_size, head_rank=2)
    for layer in model.layers():
        svd_init(preds.mlp[layer.layer_id], layer)
        point = preds.points[layer.layer_id]
        point.mlp_source, point.mlp_threshold = "mlp_in", 0.0
    preds.mlp_select = "threshold"
    return preds


def test_svd_predictor_at_full_rank_scores_the_pre_activation():
    model = tiny_model()
    preds = exact_own_input_predictors(model)
    h = torch.randn(3, 5, CFG.hidden_size) * 4
    for layer in model.layers():
        want = layer.fc1(layer.final_layer_norm(h))
        torch.testing.assert_close(preds.mlp[layer.layer_id](h), want, rtol=1e-4, atol=1e-4)
    # Truncated, it keeps the top singular directions only: close, not equal.
    low = PredictorSet.create(model, mlp_rank=4, head_rank=2)
    layer = model.layers()[1]
    svd_init(low.mlp[1], layer)
    err = (low.mlp[1](h) - layer.fc1(layer.final_layer_norm(h))).norm()
    assert 0 < err < layer.fc1(layer.final_layer_norm(h)).norm()


def test_svd_init_is_the_svd_truncation_of_fc1_through_its_layer_norm():
    """The Gram-matrix eigenvectors give the same rank-r product as the plain SVD (the
    reference): up @ down = U_r S_r V_r^T of W diag(g), whichever signs the factors take.
    Rank 5 of 32: wide enough for the whole eigendecomposition (``leading_eigenvectors``)."""
    model = tiny_model()
    layer = model.layers()[1]
    with torch.no_grad():  # a layer norm that is not the identity, so the fold is exercised
        layer.final_layer_norm.weight.uniform_(0.5, 1.5)
        layer.final_layer_norm.bias.uniform_(-0.2, 0.2)
    low = PredictorSet.create(model, mlp_rank=5, head_rank=2)
    svd_init(low.mlp[1], layer)
    a = layer.fc1.weight.double() * layer.final_layer_norm.weight.double()
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    want = (u[:, :5] * s[:5]) @ vh[:5]
    got = low.mlp[1].up.weight.double() @ low.mlp[1].down.weight.double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _planted_gram(c: int, spectrum: torch.Tensor, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64)).Q
    return (basis * spectrum) @ basis.T


def test_leading_eigenvectors_by_subspace_iteration_match_the_whole_eigendecomposition():
    """Rank 8 of 128 takes subspace iteration: with a gap in the spectrum (eigenvalues
    halving past the rank) its subspace is the exact one to float64 rounding; without one
    it still captures nearly all the exact subspace's energy. Orthonormal, largest first,
    and the same in every run."""
    c, r = 128, 8
    decaying = 0.5 ** torch.arange(c, dtype=torch.float64) * 100 + 1e-3
    gram = _planted_gram(c, decaying)
    got = leading_eigenvectors(gram, r)
    vals, vecs = torch.linalg.eigh(gram)
    want = vecs[:, -r:].flip(1)
    assert got.shape == (c, r)
    torch.testing.assert_close(got.T @ got, torch.eye(r, dtype=torch.float64))
    torch.testing.assert_close(got @ got.T, want @ want.T, atol=1e-9, rtol=0)
    rayleigh = torch.diagonal(got.T @ gram @ got)
    assert torch.all(rayleigh[:-1] >= rayleigh[1:])  # largest first
    torch.testing.assert_close(rayleigh, vals[-r:].flip(0))
    assert torch.equal(leading_eigenvectors(gram, r), got)
    # a nearly flat spectrum (random weights' kind): slow to converge, never past the exact
    # subspace's energy (the most any r columns hold), 95.8% of it here
    flat = _planted_gram(c, torch.linspace(2.0, 1.0, c, dtype=torch.float64))
    approx = leading_eigenvectors(flat, r)
    exact = torch.linalg.eigh(flat)[1][:, -r:]
    energy = [float(torch.trace(v.T @ flat @ v)) for v in (approx, exact)]
    assert 0.95 * energy[1] <= energy[0] <= energy[1] * (1 + 1e-12)
    more = leading_eigenvectors(flat, r, iterations=60)
    assert float(torch.trace(more.T @ flat @ more)) > energy[0]  # iterating converges
    # wider ranks: the whole eigendecomposition, exactly
    assert torch.equal(leading_eigenvectors(gram, 17), vecs[:, -17:].flip(1))


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="no shipped model")
def test_subspace_start_captures_the_shipped_models_fc1_as_measured():
    """The figures ``leading_eigenvectors`` quotes: at rank 64 of 512, six iterations leave
    the captured energy of every layer's fc1 (through its layer norm) within 1e-3 of the
    exact subspace's."""
    from dejavu.runtime.checkpoint import load_model

    model = load_model(SHIPPED)
    for layer in model.layers():
        a = layer.fc1.weight.double() * layer.final_layer_norm.weight.double()
        gram = a.T @ a
        exact = torch.linalg.eigh(gram)[1][:, -64:]
        energy = [float((a @ v).pow(2).sum()) for v in (leading_eigenvectors(gram, 64), exact)]
        assert 1 - energy[0] / energy[1] < 1e-3, layer.layer_id


@pytest.mark.parametrize("mode", ["mask", "gather"])
def test_own_input_wiring_selects_the_firing_neurons_and_equals_dense(mode):
    model = tiny_model()
    ids = windows(2, 9)
    ctx = SparseContext(PredictorSelector(exact_own_input_predictors(model)), mode=mode)
    dense = model(ids, Batch(full_positions(2, 9, "cpu")))
    sparse = model(ids, Batch(full_positions(2, 9, "cpu"), sparse=ctx))
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    data = collect(model, ids)
    for i, stats in ctx.stats.as_dict()["layers"].items():
        fires = unpack_bits(data.neuron_bits[int(i)], CFG.ffn_dim)
        want = fires.double().mean() if mode == "mask" else fires.any(0).double().mean()
        assert stats["mlp_density"] == pytest.approx(float(want), abs=1e-3)
        assert stats["mlp_density"] < 1.0
    if mode == "gather":  # a union over 18 tokens: the lookahead one may pass dense_above
        return
    # Fed the lookahead source instead, the same predictors select other neurons.
    for point in ctx.selector.predictors.points.values():
        point.mlp_source = "lookahead"
    look = model(ids, Batch(full_positions(2, 9, "cpu"),
                            sparse=SparseContext(ctx.selector, mode=mode)))
    assert not torch.allclose(look, dense, rtol=1e-4, atol=1e-4)


def test_version_1_files_load_with_the_lookahead_source(tmp_path):
    model = tiny_model()
    preds = exact_own_input_predictors(model)
    path = preds.save(tmp_path / "v2")
    back = PredictorSet.load(path, model)
    assert all(p.mlp_source == "mlp_in" for p in back.points.values())
    # A version 1 file: the same tensors, the old tag, points without a source.
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    points = json.loads(meta["operating_points"])
    for p in points.values():
        del p["mlp_source"]
    from safetensors.torch import save_file
    v1 = tmp_path / "v1.safetensors"
    save_file(tensors, str(v1), metadata=dict(meta, format="dejavu-predictors/1",
                                              operating_points=json.dumps(points)))
    old = PredictorSet.load(v1, model)
    assert all(p.mlp_source == "lookahead" for p in old.points.values())
    assert not PredictorSelector(old).mlp_reads_own_input(1)
    for fmt, why in (("dejavu-predictors/3", "retrain"), ("dejavu-predictors/1", "mlp_source")):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata=dict(meta, format=fmt))
        with pytest.raises(PredictorError, match=why):
            PredictorSet.load(bad, model)
    points["1"]["mlp_source"] = "elsewhere"
    save_file(tensors, str(bad), metadata=dict(meta, operating_points=json.dumps(points)))
    with pytest.raises(PredictorError, match="elsewhere"):
        PredictorSet.load(bad, model)
