"""Kernel scenario of `dejavu-run bench`: sparse MLP and sparse attention vs dense, one
layer of each OPT shape, resident weights, densities 5%..100%, batch 1 and 8.

Bytes counted are the fewest an implementation must read: the selected rows (fc1 row +
fc2 column + bias per neuron; q/k/v rows + out_proj columns per head), the KV cache of the
selected heads, activations in and out. Achieved GB/s is bytes over time; the fraction is
against the measured device-to-device copy bandwidth. Each timed call rotates through
several random selections so that repeated calls do not hit in L2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.mlp_chained import mlp_workspace
from ..kernels.sparse_attention import (
    HeadRows,
    decode_attention,
    sparse_attention,
    sparse_attention_reference,
)
from ..kernels.sparse_mlp import (
    NeuronRows,
    dense_mlp,
    finalize,
    sparse_mlp,
    sparse_mlp_reference,
)
from .bench_common import Shape, time_graph

ROTATE = 4
CONTEXT = 512  # cached positions each decode row attends over


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def mlp_weights(s: Shape, device: str, dtype=torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)
    return {"w1": rnd(s.ffn, s.hidden, std=s.hidden**-0.5), "b1": rnd(s.ffn, std=0.1),
            "w2t": rnd(s.ffn, s.hidden, std=s.ffn**-0.5), "b2": rnd(s.hidden, std=0.1)}


def attn_weights(s: Shape, device: str, dtype=torch.float16) -> HeadRows:
    g = torch.Generator(device=device).manual_seed(1)
    h, d, c = s.heads, s.head_dim, s.hidden
    wqkv = (torch.randn(3, h, d, c, generator=g, device=device) * c**-0.5).to(dtype)
    bqkv = (torch.randn(3, h, d, generator=g, device=device) * 0.1).to(dtype)
    wo = (torch.randn(h, d, c, generator=g, device=device) * c**-0.5).to(dtype)
    return HeadRows(wqkv, bqkv, wo)


def mlp_kwargs(cfg: dict[str, Any], ws: torch.Tensor | None) -> dict[str, Any]:
    """sparse_mlp keyword arguments of a bench config: ``"workspace": True`` means "pass a
    caller-owned workspace" (the chained kernel then needs no memset per call)."""
    kw = {k: v for k, v in cfg.items() if k != "workspace"}
    if cfg.get("workspace"):
        kw["workspace"] = ws
    return kw


def tune_mlp(s: Shape, device: str, configs: list[dict[str, Any]], density: float = 0.1,
             batches=(1, 8)) -> dict[str, Any]:
    """Time a few block shapes on one shape; return the best per batch and all timings.
    The best chained config is timed again with a workspace (no memset per call), and
    the best of each kernel family once more with a single neuron block (``k_min``): that
    call reads almost nothing, so its time is the fixed cost (launches, dependency chain)."""
    w = mlp_weights(s, device)
    rows = NeuronRows(w["w1"], w["w2t"], w["b1"])
    ws = mlp_workspace(max(batches), s.hidden, s.ffn, device)
    k = max(1, round(density * s.ffn))
    out: dict[str, Any] = {"shape": s.name, "density": density, "timings": [], "k_min": []}
    # The floor under any kernel in a graph: one tiny kernel per call (launch + drain).
    tiny = torch.zeros(1, 16, device=device)
    out["one_tiny_kernel_us"] = round(time_graph(lambda: [
        finalize(tiny, None, None, torch.float16) for _ in range(ROTATE)]) / ROTATE * 1e6, 2)

    def timed(cfg, x, sels):
        kw = mlp_kwargs(cfg, ws)
        return time_graph(lambda: [sparse_mlp(x, rows, j, bias2=w["b2"], **kw)
                                   for j in sels]) / ROTATE

    for b in batches:
        x = torch.randn(b, s.hidden, device=device).half()
        sels = [torch.randperm(s.ffn, device=device)[:k].int() for _ in range(ROTATE)]
        best: dict[str, tuple[float, dict]] = {}
        for cfg in [c for c in configs if c["block_n"] >= 16 or b == 1]:
            try:
                t = timed(cfg, x, sels)
            except Exception as exc:  # a config the compiler refuses is skipped, not fatal
                out["timings"].append({"batch": b, **cfg, "error": repr(exc)[:200]})
                continue
            out["timings"].append({"batch": b, **cfg, "time_us": round(t * 1e6, 2)})
            fam = "chained" if cfg.get("chained") else "split" if cfg.get("split_c") else "loop"
            if fam not in best or t < best[fam][0]:
                best[fam] = (t, cfg)
        if not best:
            continue
        out[f"best_batch{b}"] = min(best.values(), key=lambda tc: tc[0])[1]
        if "chained" in best:  # the same with a workspace: no memset, a self-cleaning kernel
            cfg = {**best["chained"][1], "workspace": True}
            t = timed(cfg, x, sels)
            out["timings"].append({"batch": b, **cfg, "time_us": round(t * 1e6, 2)})
            if t < best["chained"][0]:
                best["chained"] = (t, cfg)
                out[f"best_batch{b}"] = min(best.values(), key=lambda tc: tc[0])[1]
        for fam, (_, cfg) in best.items():
            few = [torch.randperm(s.ffn, device=device)[:16].int() for _ in range(ROTATE)]
            out["k_min"].append({"batch": b, "family": fam, "neurons": 16, **cfg,
                                 "time_us": round(timed(cfg, x, few) * 1e6, 2)})
    return out


def tune_attention(s: Shape, device: str, density: float = 0.5,
                   context: int = CONTEXT) -> list[dict[str, Any]]:
    """Batch 1: the looped QKV kernel vs the split one, one vs several programs per column
    block of out_proj, long vs short attention chunks."""
    rows = attn_weights(s, device)
    h, d, c = s.heads, s.head_dim, s.hidden
    ck = torch.randn(1, h, context, d, device=device).half()
    cv = torch.randn_like(ck)
    slots = torch.zeros(1, device=device, dtype=torch.int32)
    pos = torch.full((1,), context - 1, device=device, dtype=torch.int32)
    x = torch.randn(1, c, device=device).half()
    k = max(1, round(density * h))
    sels = [torch.randperm(h, device=device)[:k].int() for _ in range(ROTATE)]
    out = []
    for cfg in ({"qkv_split_c": 0, "split_h": 1, "chunk": 256},
                {"qkv_split_c": 512, "split_h": 1, "chunk": 64},
                {"qkv_split_c": 512, "split_h": None, "chunk": 64},
                {"qkv_split_c": 256, "split_h": None, "chunk": 64}):
        t = time_graph(lambda cfg=cfg: [sparse_attention(x, rows, i, i, ck, cv, slots, pos, **cfg)
                                        for i in sels]) / ROTATE
        out.append({**cfg, "density": density, "time_us": round(t * 1e6, 2)})
    return out


def mlp_case(s: Shape, device: str, batches, densities, tuned: dict[int, dict],
             hbm: float | None) -> list[dict[str, Any]]:
    w = mlp_weights(s, device)
    rows = NeuronRows(w["w1"], w["w2t"], w["b1"])
    ws = mlp_workspace(max(batches), s.hidden, s.ffn, device)
    results = []
    for b in batches:
        x = torch.randn(b, s.hidden, device=device).half()
        cfg = mlp_kwargs(tuned.get(b, {}), ws)
        # Correctness at this shape first (one density), against the fp32 reference.
        idx = torch.randperm(s.ffn, device=device)[: max(1, s.ffn // 10)].int()
        err = rel_err(sparse_mlp(x, rows, idx, bias2=w["b2"], **cfg),
                      sparse_mlp_reference(x, w["w1"], w["b1"], w["w2t"], idx, w["b2"]))
        t_dense = time_graph(lambda x=x: dense_mlp(x, w["w1"], w["b1"], w["w2t"], w["b2"]))
        dense_bytes = 2 * s.ffn * s.hidden * 2
        for dens in densities:
            k = max(1, round(dens * s.ffn))
            sels = [torch.randperm(s.ffn, device=device)[:k].int() for _ in range(ROTATE)]
            t = time_graph(lambda x=x, sels=sels, cfg=cfg: [
                sparse_mlp(x, rows, i, bias2=w["b2"], **cfg) for i in sels]) / ROTATE
            nbytes = k * (2 * s.hidden + 1) * 2 + 2 * b * s.hidden * 2
            results.append(_row("mlp", s, b, dens, t, t_dense, nbytes, dense_bytes, hbm, err))
    return results


def attn_case(s: Shape, device: str, batches, densities, hbm: float | None,
              context: int = CONTEXT, cfg: dict | None = None) -> list[dict[str, Any]]:
    rows = attn_weights(s, device)
    h, d, c = s.heads, s.head_dim, s.hidden
    bo = torch.randn(c, device=device).half() * 0.1
    wqkv2d = rows.wqkv.reshape(3 * c, c)
    bqkv1d = rows.bqkv.reshape(3 * c)
    wo2d = rows.wo.reshape(c, c)  # [(h, d), C]: attn [B, C] @ wo2d
    all_heads = torch.arange(h, device=device, dtype=torch.int32)
    results = []
    for b in batches:
        ck = torch.randn(b, h, context, d, device=device).half()
        cv = torch.randn(b, h, context, d, device=device).half()
        slots = torch.arange(b, device=device, dtype=torch.int32)
        pos = torch.full((b,), context - 1, device=device, dtype=torch.int32)
        x = torch.randn(b, c, device=device).half()

        def dense(x=x, ck=ck, cv=cv, slots=slots, pos=pos, b=b):
            qkv = F.linear(x, wqkv2d, bqkv1d).view(b, 3, h, d)
            q = (qkv[:, 0] * d**-0.5).contiguous()
            ck[slots.long(), :, pos.long()] = qkv[:, 1]
            cv[slots.long(), :, pos.long()] = qkv[:, 2]
            attn = decode_attention(q, all_heads, ck, cv, slots, pos)
            return torch.addmm(bo, attn.reshape(b, c), wo2d)

        # Correctness at this shape (a few heads), against the fp32 reference.
        sel = torch.randperm(h, device=device)[: max(1, h // 4)].int()
        ck_ref, cv_ref = ck.clone(), cv.clone()
        got = sparse_attention(x, rows, sel, sel, ck, cv, slots, pos, bias=bo)
        hf = _hf_weights(rows)
        ref = sparse_attention_reference(x, *hf, sel, ck_ref, cv_ref, slots, pos, bias=bo)
        err = rel_err(got, ref)
        t_dense = time_graph(dense)
        dense_bytes = 4 * c * c * 2 + 2 * b * h * context * d * 2
        for dens in densities:
            k = max(1, round(dens * h))
            sels = [torch.randperm(h, device=device)[:k].int() for _ in range(ROTATE)]
            t = time_graph(lambda x=x, ck=ck, cv=cv, slots=slots, pos=pos, sels=sels: [
                sparse_attention(x, rows, i, i, ck, cv, slots, pos, bias=bo, **(cfg or {}))
                for i in sels]) / ROTATE
            nbytes = k * 4 * d * c * 2 + 2 * b * k * context * d * 2
            results.append(_row("attention", s, b, dens, t, t_dense, nbytes, dense_bytes, hbm,
                                err))
    return results


def _hf_weights(rows: HeadRows) -> tuple[torch.Tensor, ...]:
    """HF-layout (wq, bq, wk, bk, wv, bv, wo) from split-layout head rows."""
    c = rows.wo.shape[2]
    out = []
    for i in range(3):
        out += [rows.wqkv[i].reshape(c, c), rows.bqkv[i].reshape(c)]
    out.append(rows.wo.reshape(c, c).T)
    return tuple(out)


def _row(kind, s, b, dens, t, t_dense, nbytes, dense_bytes, hbm, err) -> dict[str, Any]:
    rate = nbytes / t
    return {
        "kind": kind, "shape": s.name, "batch": b, "density": dens,
        "sparse_us": round(t * 1e6, 2), "dense_us": round(t_dense * 1e6, 2),
        "speedup_vs_dense": round(t_dense / t, 2),
        "sparse_bytes": nbytes, "sparse_gbps": round(rate / 1e9, 1),
        "sparse_hbm_fraction": None if hbm is None else round(rate / hbm, 3),
        "dense_gbps": round(dense_bytes / t_dense / 1e9, 1),
        "dense_hbm_fraction": None if hbm is None else round(dense_bytes / t_dense / hbm, 3),
        "rel_err_vs_reference": err,
    }
