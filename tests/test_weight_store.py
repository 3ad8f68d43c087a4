"""Weight store: record layout round trips, placement policy, bytes-moved estimate, and
an offloaded layer (hot rows cached, the rest on the host) against the model's own blocks.
"""


import pytest
import torch

from dejavu.runtime.model import Batch, KVCache, OPTDecoderLayer  # noqa: E402
from dejavu.runtime.opt_config import OPTConfig  # noqa: E402
from dejavu.runtime.weight_store import (  # noqa: E402
    LayerFrequencies,
    PlacementError,
    RecordLayout,
    ResidentLayer,
    head_rows,
    host_layer_from_module,
    neuron_rows,
    pack_heads,
    pack_neurons,
    plan_placement,
    unpack_heads,
    unpack_neurons,
)

CFG = OPTConfig(hidden_size=40, num_attention_heads=5, ffn_dim=71, num_hidden_layers=2,
                vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=40)


def layer(seed=0):
    torch.manual_seed(seed)
    m = OPTDecoderLayer(CFG, 0)
    for p in m.parameters():
        torch.nn.init.normal_(p)
    return m


def test_records_are_aligned_and_round_trip():
    lay = RecordLayout.of(CFG)
    assert lay.neuron_len % 16 == 0 and lay.neuron_len >= 2 * 40 + 1
    assert lay.head_len % 16 == 0 and lay.head_len >= 4 * 8 * 40 + 3 * 8
    m = layer()
    host = host_layer_from_module(m, lay, dtype=torch.float32, pin=False)
    fc1, b1, fc2 = unpack_neurons(host.neurons, 40)
    assert torch.equal(fc1, m.fc1.weight) and torch.equal(b1, m.fc1.bias)
    assert torch.equal(fc2, m.fc2.weight)
    # Neuron n is one contiguous record: fc1 row n, then fc2 column n, then bias n.
    n = 17
    rec = host.neurons[n]
    assert torch.equal(rec[:40], m.fc1.weight[n])
    assert torch.equal(rec[40:80], m.fc2.weight[:, n])
    assert rec[80] == m.fc1.bias[n]
    a = m.self_attn
    back = unpack_heads(host.heads, 40, 8)
    for name, lin in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj)):
        assert torch.equal(back[f"{name}_w"], lin.weight)
        assert torch.equal(back[f"{name}_b"], lin.bias)
    assert torch.equal(back["o_w"], a.out_proj.weight)
    # Head 3's record holds its q rows first and its out_proj columns (as rows) later.
    assert torch.equal(host.heads[3, :8 * 40], a.q_proj.weight[24:32].reshape(-1))
    assert torch.equal(head_rows(host.heads, 40, 8).wo[3], a.out_proj.weight[:, 24:32].T)
    assert host.small["fc2_b"].shape == (40,)


def test_kernel_views_of_records_match_hf_weights():
    m = layer(1)
    lay = RecordLayout.of(CFG)
    rec = pack_neurons(m.fc1.weight, m.fc1.bias, m.fc2.weight,
                       torch.empty(71, lay.neuron_len))
    rows = neuron_rows(rec, 40)
    assert torch.equal(rows.w1, m.fc1.weight) and torch.equal(rows.w2t, m.fc2.weight.T)
    assert rows.w1.stride(0) == rows.w2t.stride(0) == lay.neuron_len
    a = m.self_attn
    hrec = pack_heads((a.q_proj.weight, None), (a.k_proj.weight, None),
                      (a.v_proj.weight, None), a.out_proj.weight, torch.empty(5, lay.head_len))
    hr = head_rows(hrec, 40, 8)
    assert torch.equal(hr.wqkv[1].reshape(40, 40), a.k_proj.weight)
    assert torch.count_nonzero(hr.bqkv) == 0  # no biases -> zeros


def freqs(seed, f=71, h=5):
    g = torch.Generator().manual_seed(seed)
    return LayerFrequencies(torch.rand(f, generator=g) ** 3, torch.rand(h, generator=g))


def test_policy_respects_budget_and_keeps_the_most_frequent_rows():
    lay = RecordLayout.of(CFG)
    fr = [freqs(0), freqs(1)]
    e = 2
    full = 2 * lay.layer_bytes(e)
    for frac in (0.0, 0.1, 0.37, 0.8):
        budget = 1000 + int(frac * full)
        p = plan_placement(lay, fr, [4, 5], budget_bytes=budget, reserved_bytes=1000,
                           element_size=e)
        assert p.gpu_bytes() <= budget
        # Nothing left out is more frequent than anything kept (neuron rows, all layers).
        all_kept = torch.cat([f.neurons[lp.hot_neurons] for lp, f in zip(p.layers, fr,
                                                                           strict=True)])
        all_cold = torch.cat([f.neurons[torch.tensor([i for i in range(71) if i not in
                                                      set(lp.hot_neurons.tolist())],
                                                     dtype=torch.long)]
                              for lp, f in zip(p.layers, fr, strict=True)])
        if all_kept.numel() and all_cold.numel():
            assert float(all_kept.min()) >= float(all_cold.max())
        # The leftover budget could not fit one more row of the next kind.
        left = budget - p.gpu_bytes()
        if p.cache_bytes() < full:
            assert left < lay.head_len * e
    p = plan_placement(lay, fr, [4, 5], budget_bytes=full + 1000, reserved_bytes=1000,
                       element_size=e)
    assert all(lp.dense_resident for lp in p.layers)
    assert p.bytes_per_step(1)["host_bytes"] == 0


def test_bytes_moved_estimate_matches_a_direct_count():
    lay = RecordLayout.of(CFG)
    # Frequencies of 0 or 1 make the expectation exact: count the rows by hand.
    nf = torch.zeros(71)
    nf[:30] = 1.0
    hf = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    fr = [LayerFrequencies(nf, hf)]
    budget = 10 * lay.neuron_len * 2 + 1 * lay.head_len * 2
    p = plan_placement(lay, fr, [0], budget_bytes=budget, reserved_bytes=0, element_size=2)
    hot_n, hot_h = p.layers[0].hot_neurons.numel(), p.layers[0].hot_heads.numel()
    cold = (30 - hot_n) * lay.neuron_len * 2 + (3 - hot_h) * lay.head_len * 2
    hot = hot_n * lay.neuron_len * 2 + hot_h * lay.head_len * 2
    moved = p.bytes_per_step(1)
    assert moved["host_bytes"] == cold and moved["resident_bytes"] == hot
    # Batch 4 with independent draws: a row of frequency f is read with 1 - (1 - f)^4.
    fr2 = [LayerFrequencies(torch.full((71,), 0.5), torch.zeros(5))]
    p2 = plan_placement(lay, fr2, [0], budget_bytes=0, reserved_bytes=0, element_size=2)
    assert p2.bytes_per_step(4)["host_bytes"] == pytest.approx(
        71 * (1 - 0.5**4) * lay.neuron_len * 2)
    report = p2.report(4)
    assert report["gpu_bytes"] == 0 and report["dense_resident_layers"] == 0


def test_policy_refuses_impossible_budgets_and_bad_stats():
    lay = RecordLayout.of(CFG)
    with pytest.raises(PlacementError, match="gpu_memory_gib"):
        plan_placement(lay, [freqs(0)], [0], budget_bytes=10, reserved_bytes=11, element_size=2)
    with pytest.raises(PlacementError, match="shapes"):
        plan_placement(lay, [LayerFrequencies(torch.zeros(3), torch.zeros(5))], [0],
                       budget_bytes=10, reserved_bytes=0, element_size=2)
    with pytest.raises(PlacementError, match=r"\[0, 1\]"):
        plan_placement(lay, [LayerFrequencies(torch.full((71,), 2.0), torch.zeros(5))], [0],
                       budget_bytes=10, reserved_bytes=0, element_size=2)


def test_resident_layer_location_maps():
    lay = RecordLayout.of(CFG)
    host = host_layer_from_module(layer(2), lay, dtype=torch.float32, pin=False)
    p = plan_placement(lay, [freqs(3)], [0], budget_bytes=6 * lay.neuron_len * 4,
                       reserved_bytes=0, element_size=4)
    r = ResidentLayer(host, p.layers[0], lay, "cpu")
    hot = p.layers[0].hot_neurons
    locs = r.neuron_locs(torch.arange(71))
    for n in range(71):
        loc = int(locs[n])
        row = r.cache_neurons[loc] if loc >= 0 else host.neurons[-loc - 1]
        assert torch.equal(row, host.neurons[n])
    assert (locs >= 0).sum() == hot.numel()


@pytest.mark.parametrize("pre_ln", [True, False])
def test_offloaded_layer_with_every_row_selected_equals_the_model(pre_ln):
    # Hot rows in the cache, the rest in host records, every neuron and head selected:
    # the two blocks must equal runtime/model.py's (fp32 model, fp16 records -> fp16 tol).
    cfg = OPTConfig(hidden_size=32, num_attention_heads=2, ffn_dim=48, num_hidden_layers=1,
                    vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=32,
                    do_layer_norm_before=pre_ln)
    torch.manual_seed(0)
    m = OPTDecoderLayer(cfg, 0)
    for name, p in m.named_parameters():
        torch.nn.init.normal_(p, std=0.3 if "weight" in name else 0.1)
    lay = RecordLayout.of(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    host = host_layer_from_module(m, lay, dtype=torch.float16, pin=device == "cuda")
    fr = LayerFrequencies(torch.linspace(1, 0, 48), torch.tensor([0.2, 0.9]))
    p = plan_placement(lay, [fr], [0], budget_bytes=20 * lay.neuron_len * 2 + lay.head_len * 2,
                       reserved_bytes=0, element_size=2)
    assert 0 < p.layers[0].hot_neurons.numel() < 48 and p.layers[0].hot_heads.tolist() == [1]
    r = ResidentLayer(host, p.layers[0], lay, device)
    h = torch.randn(3, 32)
    cache = KVCache(cfg, [0], slots=3, max_len=8, dtype=torch.float32, device="cpu")
    cache.k.normal_()
    cache.v.normal_()
    slots, pos = torch.tensor([1, 2, 0]), torch.tensor([0, 4, 7])
    ck, cv = cache.k[0].half().to(device), cache.v[0].half().to(device)
    with torch.no_grad():
        want_a = m.attention_block(h[:, None], Batch(pos[:, None], slots, cache))[:, 0]
        want_m = m.mlp_block(want_a[:, None])[:, 0]
    hd = h.half().to(device)
    got_a = r.attention_block(hd, torch.arange(2, device=device), ck, cv,
                              slots.int().to(device), pos.int().to(device))
    got_m = r.mlp_block(want_a.half().to(device), torch.arange(48, device=device))
    for got, want in ((got_a, want_a), (got_m, want_m)):
        err = float((got.float().cpu() - want).norm() / want.norm())
        assert err < 5e-3, err
    # The new keys landed where the model put them.
    torch.testing.assert_close(ck.float().cpu(), cache.k[0], atol=2e-2, rtol=1e-2)


def test_dynamic_slots_follow_recent_tokens_and_keep_results_exact():
    lay = RecordLayout.of(CFG)
    fr = [LayerFrequencies(torch.linspace(1, 0, 71), torch.zeros(5))]
    budget = 20 * lay.neuron_len * 2
    p = plan_placement(lay, fr, [0], budget_bytes=budget, reserved_bytes=0, element_size=2,
                       dynamic_fraction=0.25)
    lp = p.layers[0]
    assert lp.dynamic_neurons == 5 and lp.hot_neurons.numel() == 15
    assert p.gpu_bytes() <= budget and p.report()["dynamic_neuron_slots"] == 5
    # The kernels run on the GPU when there is one, else in Triton's interpreter.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    host = host_layer_from_module(layer(4), lay, dtype=torch.float16, pin=device == "cuda")
    r = ResidentLayer(host, lp, lay, device)
    cold = torch.tensor([70, 69, 50], device=device)
    assert (r.neuron_locs(cold) < 0).all()
    h = torch.randn(2, 40).half().to(device)
    sel = torch.cat([cold, torch.tensor([0, 3], device=device)])
    before = r.mlp_block(h, sel)
    assert r.admit(sel) == 3  # the hot ones (0, 3) are not copied again
    locs = r.neuron_locs(cold)
    assert (locs >= r.n_hot).all()
    for n, loc in zip(cold.tolist(), locs.tolist(), strict=True):
        assert torch.equal(r.cache_neurons[loc].cpu(), host.neurons[n].cpu())
    torch.testing.assert_close(r.mlp_block(h, sel), before, atol=2e-3, rtol=2e-3)
    # Five slots: admitting four more cold rows evicts the least recently used (70).
    r.admit(torch.tensor([69, 50], device=device))  # touch: now 70 is the oldest
    assert r.admit(torch.tensor([60, 61, 62], device=device)) == 3
    assert int(r.neuron_locs(torch.tensor([70], device=device))) == -71
    assert (r.neuron_locs(torch.tensor([69, 50, 60, 61, 62], device=device)) >= r.n_hot).all()
    with pytest.raises(PlacementError, match="dynamic_fraction"):
        plan_placement(lay, fr, [0], budget_bytes=budget, reserved_bytes=0, element_size=2,
                       dynamic_fraction=1.0)
