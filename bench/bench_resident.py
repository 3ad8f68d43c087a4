"""Resident scenario of `dejavu-run bench`: every weight on the GPU, one decode step of a
whole OPT-shaped decoder (random weights), batch 1.

  - ours dense: cuBLAS projections and MLP, our decode-attention kernel, layer norms; the
    whole step captured in one CUDA graph (no launch overhead);
  - ours sparse: our sparse attention + sparse MLP kernels, in one CUDA graph, with
    (a) fixed random selections, (b) low-rank predictors (C -> 128 -> F, C -> 64 -> H, the
    ranks `train-predictors` defaults to) + torch.topk, (c) the same predictors + a
    per-layer threshold compacted on the GPU (kernels/select.py), so that (b, c) pay for
    choosing the rows;
  - transformers dense: OPTForCausalLM (eager, SDPA attention) decoding one token with a
    KV cache of the same length.
Keys and values of heads that the sparse path skips are not written (DejaVu's head
sparsity; see kernels/sparse_attention.py). The LM head (dense GEMV) is in every variant.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.mlp_chained import mlp_workspace
from ..kernels.select import lowrank_threshold_select, lowrank_topk, threshold_select
from ..kernels.sparse_attention import HeadRows, decode_attention, sparse_attention
from ..kernels.sparse_mlp import NeuronRows, sparse_mlp
from .bench_common import Shape, cuda, time_eager, time_graph
from .bench_kernels import mlp_kwargs

CONTEXT = 512
PREDICTOR_RANK = 128  # the MLP predictor rank `train-predictors` defaults to
HEAD_PREDICTOR_RANK = 64


def _layers(s: Shape, n: int, device: str) -> list[dict[str, torch.Tensor]]:
    h, c, f = s.heads, s.hidden, s.ffn
    out = []
    for _ in range(n):
        def rnd(*shape, std):
            return torch.empty(*shape, device=device, dtype=torch.float16).normal_(0, std)
        out.append({
            "wqkv": rnd(3 * c, c, std=c**-0.5), "bqkv": rnd(3 * c, std=0.1),
            "wo": rnd(c, c, std=c**-0.5), "bo": rnd(c, std=0.1),
            "w1": rnd(f, c, std=c**-0.5), "b1": rnd(f, std=0.1),
            "w2t": rnd(f, c, std=f**-0.5), "b2": rnd(c, std=0.1),
            "ln1_w": torch.ones(c, device=device, dtype=torch.float16),
            "ln1_b": torch.zeros(c, device=device, dtype=torch.float16),
            "ln2_w": torch.ones(c, device=device, dtype=torch.float16),
            "ln2_b": torch.zeros(c, device=device, dtype=torch.float16),
            # predictors (only used by the sparse variant)
            "pn1": rnd(c, PREDICTOR_RANK, std=c**-0.5), "pn2": rnd(PREDICTOR_RANK, f, std=1.0),
            "ph1": rnd(c, HEAD_PREDICTOR_RANK, std=c**-0.5),
            "ph2": rnd(HEAD_PREDICTOR_RANK, h, std=1.0),
        })
    return out


def resident_case(s: Shape, device: str, hbm: float | None, *, mlp_density: float,
                  head_density: float, mlp_cfg: dict | None = None,
                  attn_cfg: dict | None = None, layers: int | None = None,
                  hf: bool = True) -> dict[str, Any]:
    # Ours first, in its own frame, so its weights are freed before transformers loads.
    res = _ours_resident(s, device, hbm, mlp_density, head_density, mlp_cfg, attn_cfg or {},
                         layers)
    if cuda():
        torch.cuda.empty_cache()
    if hf:
        try:
            t_hf = transformers_decode_time(s, res["layers"], device)
            t_sparse = res["ours_sparse_with_predictors_ms"] / 1e3
            res["transformers_dense_ms"] = round(t_hf * 1e3, 3)
            res["sparse_speedup_vs_transformers"] = round(t_hf / t_sparse, 2)
            res["dense_speedup_vs_transformers"] = round(t_hf / (res["ours_dense_ms"] / 1e3), 2)
        except Exception as exc:
            res["transformers_dense_ms"] = None
            res["transformers_error"] = repr(exc)[:300]
    return res


def _ours_resident(s: Shape, device: str, hbm: float | None, mlp_density: float,
                   head_density: float, mlp_cfg: dict | None, attn_cfg: dict,
                   layers: int | None) -> dict[str, Any]:
    n = layers or s.layers
    h, d, c = s.heads, s.head_dim, s.hidden
    ws = _layers(s, n, device)
    lm_head = torch.empty(s.vocab, c, device=device, dtype=torch.float16).normal_(0, 0.02)
    ck = torch.randn(n, 1, h, CONTEXT, d, device=device).half()
    cv = torch.randn(n, 1, h, CONTEXT, d, device=device).half()
    slots = torch.zeros(1, device=device, dtype=torch.int32)
    pos = torch.full((1,), CONTEXT - 1, device=device, dtype=torch.int32)
    all_heads = torch.arange(h, device=device, dtype=torch.int32)
    x0 = torch.randn(1, c, device=device).half()
    kn, kh = max(1, round(mlp_density * s.ffn)), max(1, round(head_density * h))
    fixed = [(torch.randperm(s.ffn, device=device)[:kn].int(),
              torch.randperm(h, device=device)[:kh].int()) for _ in range(n)]
    # One workspace serves every layer's chained MLP (one stream, calls in order).
    mlp_cfg = mlp_kwargs(dict(mlp_cfg or {}), mlp_workspace(1, c, s.ffn, device))

    def views(w):
        return (HeadRows(w["wqkv"].view(3, h, d, c), w["bqkv"].view(3, h, d),
                         w["wo"].view(h, d, c)), NeuronRows(w["w1"], w["w2t"], w["b1"]))
    tables = [views(w) for w in ws]

    def dense_step():
        x = x0
        for i, w in enumerate(ws):
            a = F.layer_norm(x, (c,), w["ln1_w"], w["ln1_b"])
            qkv = F.linear(a, w["wqkv"], w["bqkv"]).view(1, 3, h, d)
            q = (qkv[:, 0] * d**-0.5).contiguous()
            ck[i, 0, :, CONTEXT - 1] = qkv[0, 1]
            cv[i, 0, :, CONTEXT - 1] = qkv[0, 2]
            attn = decode_attention(q, all_heads, ck[i], cv[i], slots, pos)
            x = x + torch.addmm(w["bo"], attn.reshape(1, c), w["wo"])
            a = F.layer_norm(x, (c,), w["ln2_w"], w["ln2_b"])
            x = x + torch.relu(F.linear(a, w["w1"], w["b1"])) @ w["w2t"] + w["b2"]
        return F.linear(x, lm_head)

    # A device-side count needs the split or the chained kernels.
    split_cfg = mlp_cfg if mlp_cfg.get("split_c") or mlp_cfg.get("chained") else {
        "block_n": 16, "split_c": 512, "num_warps": 4}
    thresholds: list[float] = []
    capacity = min(s.ffn, 2 * kn)

    def sparse_step(mode: str):
        """mode: fixed (random selections), topk (predictors + torch.topk), calibrate
        (topk, eager, records each layer's k-th score as its threshold), threshold
        (predictors + GPU threshold compaction, no top-k), fused (the same with each
        predictor and its selection in one kernel), threshold_fixed_heads (the MLP
        as threshold, heads fixed: isolates the head predictor's cost)."""
        x = x0
        for i, w in enumerate(ws):
            hrows, nrows = tables[i]
            a = F.layer_norm(x, (c,), w["ln1_w"], w["ln1_b"])
            if mode in ("fixed", "threshold_fixed_heads"):
                heads = fixed[i][1]
            elif mode == "fused":  # predictor GEMVs + top-k in one kernel
                heads = lowrank_topk(a, w["ph1"], w["ph2"], kh)
            else:  # head top-k over a few dozen heads is cheap
                heads = torch.topk((a @ w["ph1"]) @ w["ph2"], kh, dim=1).indices[0]
            x = sparse_attention(a, hrows, heads, heads, ck[i], cv[i], slots, pos,
                                 bias=w["bo"], residual=x, **attn_cfg)
            a = F.layer_norm(x, (c,), w["ln2_w"], w["ln2_b"])
            if mode == "fixed":
                x = sparse_mlp(a, nrows, fixed[i][0], bias2=w["b2"], residual=x, **mlp_cfg)
                continue
            if mode == "fused":
                idx, count = lowrank_threshold_select(a, w["pn1"], w["pn2"], thresholds[i],
                                                      capacity)
                x = sparse_mlp(a, nrows, idx, bias2=w["b2"], residual=x, count=count,
                               **split_cfg)
                continue
            scores = (a @ w["pn1"]) @ w["pn2"]
            if mode.startswith("threshold"):
                idx, count = threshold_select(scores, thresholds[i], capacity)
                x = sparse_mlp(a, nrows, idx, bias2=w["b2"], residual=x, count=count,
                               **split_cfg)
                continue
            top = torch.topk(scores, kn, dim=1)
            if mode == "calibrate":
                thresholds.append(float(top.values[0, -1]))
            x = sparse_mlp(a, nrows, top.indices[0], bias2=w["b2"], residual=x, **mlp_cfg)
        return F.linear(x, lm_head)

    weight_bytes = n * (4 * c * c + 2 * c * s.ffn) * 2 + s.vocab * c * 2
    sparse_bytes = n * (kh * 4 * d * c + kn * (2 * c + 1)) * 2 + s.vocab * c * 2
    t_dense = time_graph(dense_step, reps=10)
    t_sparse_fixed = time_graph(lambda: sparse_step("fixed"), reps=10)
    t_sparse_topk = time_graph(lambda: sparse_step("topk"), reps=10)
    sparse_step("calibrate")
    t_sparse_pred = time_graph(lambda: sparse_step("threshold"), reps=10)
    # Each predictor and its selection in one kernel (kernels/select.py); a failure of this
    # variant is recorded, not fatal.
    try:
        t_fused = time_graph(lambda: sparse_step("fused"), reps=10)
        fused_error = None
    except Exception as exc:
        t_fused, fused_error = float("inf"), repr(exc)[:300]
    # The same without the head predictor: what the heads' GEMVs + top-k cost.
    t_fixed_heads = time_graph(lambda: sparse_step("threshold_fixed_heads"), reps=10)
    roofline = weight_bytes / hbm if hbm else None
    res: dict[str, Any] = {
        "shape": s.name, "layers": n, "batch": 1, "context": CONTEXT,
        "mlp_density": mlp_density, "head_density": head_density,
        "predictor_ranks": [PREDICTOR_RANK, HEAD_PREDICTOR_RANK],
        "weight_bytes": weight_bytes, "sparse_weight_bytes": sparse_bytes,
        "ours_dense_ms": round(t_dense * 1e3, 3),
        "ours_sparse_fixed_selection_ms": round(t_sparse_fixed * 1e3, 3),
        "ours_sparse_predictors_topk_ms": round(t_sparse_topk * 1e3, 3),
        "ours_sparse_threshold_ms": round(t_sparse_pred * 1e3, 3),
        "ours_sparse_fused_predictor_ms": None if fused_error else round(t_fused * 1e3, 3),
        "fused_predictor_error": fused_error,
        "ours_sparse_with_predictors_ms": round(min(t_sparse_pred, t_fused) * 1e3, 3),
        "ours_sparse_mlp_predictor_fixed_heads_ms": round(t_fixed_heads * 1e3, 3),
        "selection_for_headline": "predictors + GPU threshold compaction (thresholds "
                                  "calibrated to the density on one eager step), the faster "
                                  "of: predictor GEMVs then top-k / compaction (threshold), "
                                  "or each predictor and its selection in one kernel (fused)",
        "roofline_ms": None if roofline is None else round(roofline * 1e3, 3),
        "dense_time_over_roofline": None if roofline is None else round(t_dense / roofline, 3),
        "sparse_speedup_vs_dense": round(t_dense / min(t_sparse_pred, t_fused), 2),
        "sparse_fixed_speedup_vs_dense": round(t_dense / t_sparse_fixed, 2),
    }
    return res


def transformers_decode_time(s: Shape, layers: int, device: str) -> float:
    """Seconds per decode step of Hugging Face's OPTForCausalLM (eager) at batch 1."""
    from transformers import OPTConfig as HFConfig
    from transformers import OPTForCausalLM

    cfg = HFConfig(hidden_size=s.hidden, ffn_dim=s.ffn, num_attention_heads=s.heads,
                   num_hidden_layers=layers, vocab_size=s.vocab, word_embed_proj_dim=s.hidden,
                   max_position_embeddings=2048)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = OPTForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        ids = torch.randint(3, s.vocab, (1, CONTEXT - 1), device=device)
        out = model(input_ids=ids, use_cache=True)
        state = {"pkv": out.past_key_values, "tok": ids[:, -1:]}

        def step():
            o = model(input_ids=state["tok"], past_key_values=state["pkv"], use_cache=True)
            state["pkv"] = o.past_key_values
        t = time_eager(step, reps=5, warmup=2)
    if cuda():
        torch.cuda.empty_cache()
    return t
