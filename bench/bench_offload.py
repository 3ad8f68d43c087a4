"""Offload scenario of `dejavu-run bench`: an OPT-shaped model larger than its GPU budget,
random weights in pinned host memory, decode at batch 1 and 8.

Allocating and pinning a whole OPT-30B (60 GB) takes much of a short lease, so a few
layers are built and timed, and the whole model is extrapolated per layer; every result
says how many layers were measured. The budget is the whole model's (24 GiB): what must
stay on the GPU anyway (embeddings, LM head, KV cache, workspace) is taken off first, the
rest is shared evenly by the layers (every layer has the same selection law, so the
greedy placement gives every layer the same share; the measured layers get theirs).

Selections follow a stated synthetic law (bench_common.SelectionLaw), since no measured
firing statistics of a real model exist yet: profiled on ``PROFILE_TOKENS`` tokens to plan
the placement, then fresh tokens are timed. Batch rows read the union of their rows.

Compared: ours (hot rows cached on the GPU, cold rows read in place from pinned memory by
the kernels), dense streaming (as many whole layers resident as the budget allows, the
others copied whole from pinned memory each step, double-buffered, computed by our
kernels at 100% density), and Hugging Face accelerate's CPU offload.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.sparse_attention import sparse_attention
from ..kernels.sparse_mlp import sparse_mlp
from ..runtime.weight_store import (
    GIB,
    HostLayer,
    LayerFrequencies,
    RecordLayout,
    ResidentLayer,
    StagedRows,
    neuron_rows,
    plan_placement,
)
from .bench_common import SelectionLaw, Shape, cuda, frequencies, sync, time_eager, time_graph

PROFILE_TOKENS = 256
TIMED_STEPS = 6
CONTEXT = 512
WORKSPACE = 1 * GIB
MLP_LAW = SelectionLaw(density=0.10, skew=1.0)
HEAD_LAW = SelectionLaw(density=0.50, skew=0.5)


def reserved_bytes(s: Shape, batch: int) -> int:
    """GPU bytes outside the row caches for the whole model: tied embeddings/LM head,
    positions, final norm, KV cache (batch slots x CONTEXT positions), workspace."""
    emb = (s.vocab + 2050) * s.hidden * 2
    kv = 2 * s.layers * batch * CONTEXT * s.hidden * 2
    return emb + kv + WORKSPACE


def fill_pinned(t: torch.Tensor, device: str, std: float = 0.02) -> None:
    """Random (not zero) contents, generated on the GPU in chunks and copied down."""
    rows = max(1, (256 << 20) // (t.shape[1] * t.element_size()))
    if not cuda():
        t.normal_(0, std)
        return
    buf = torch.empty(rows, t.shape[1], device=device, dtype=t.dtype).normal_(0, std)
    for r in range(0, t.shape[0], rows):
        n = min(rows, t.shape[0] - r)
        t[r:r + n].copy_(buf[:n])
    sync()


def build_host_layers(s: Shape, n: int, device: str) -> tuple[RecordLayout, list[HostLayer]]:
    lay = RecordLayout(s.hidden, s.ffn, s.heads)
    pin = cuda()
    layers = []
    for i in range(n):
        neurons = torch.empty(s.ffn, lay.neuron_len, dtype=torch.float16, pin_memory=pin)
        heads = torch.empty(s.heads, lay.head_len, dtype=torch.float16, pin_memory=pin)
        fill_pinned(neurons, device)
        fill_pinned(heads, device)
        small = {k: torch.zeros(s.hidden, dtype=torch.float16) for k in ("out_proj_b", "fc2_b",
                                                                          "ln1_b", "ln2_b")}
        small["ln1_w"] = torch.ones(s.hidden, dtype=torch.float16)
        small["ln2_w"] = torch.ones(s.hidden, dtype=torch.float16)
        layers.append(HostLayer(i, neurons, heads, small))
    return lay, layers


def offload_case(s: Shape, device: str, *, bench_layers: int, batches=(1, 8),
                 budget_gib: float | None = 24.0, h2d: float | None,
                 mlp_cfgs: dict[int, dict] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    lay, hosts = build_host_layers(s, bench_layers, device)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    n_weights = [MLP_LAW.weights(s.ffn, g) for _ in hosts]
    h_weights = [HEAD_LAW.weights(s.heads, g) for _ in hosts]
    freqs = [LayerFrequencies(frequencies(MLP_LAW.sample(nw, PROFILE_TOKENS, g), s.ffn).float(),
                              frequencies(HEAD_LAW.sample(hw, PROFILE_TOKENS, g), s.heads).float())
             for nw, hw in zip(n_weights, h_weights, strict=True)]
    layer_bytes = lay.layer_bytes(2)
    out: dict[str, Any] = {
        "shape": s.name, "model_layers": s.layers, "measured_layers": bench_layers,
        "budget_gib": budget_gib or "dry run: reserved + 40% of the rows",
        "mlp_law": vars(MLP_LAW), "head_law": vars(HEAD_LAW),
        "profile_tokens": PROFILE_TOKENS, "host_build_s": round(build_s, 1),
        "layer_record_bytes": layer_bytes, "runs": [],
    }
    for batch in batches:
        mlp_cfg = (mlp_cfgs or {}).get(batch, {})
        reserved = reserved_bytes(s, batch)
        # No budget (the dry run): room for 40% of the layer rows beyond the reserved part.
        budget = budget_gib * GIB if budget_gib else reserved + 0.4 * s.layers * layer_bytes
        share = (budget - reserved) / s.layers  # per layer, for the row caches
        plan = plan_placement(lay, freqs, list(range(bench_layers)),
                              budget_bytes=int(share * bench_layers), reserved_bytes=0,
                              element_size=2)
        run = {"batch": batch, "reserved_gib": round(reserved / GIB, 2),
               "cache_gib_per_layer": round(share / GIB, 3),
               "cached_fraction": round(plan.cache_bytes() / (layer_bytes * bench_layers), 3),
               "planned_host_bytes_per_step_per_layer":
                   plan.bytes_per_step(batch)["host_bytes"] / bench_layers}
        try:
            run["mlp_blocks"] = mlp_cfg
            run.update(_ours(s, lay, hosts, plan, n_weights, h_weights, batch, device, g,
                             mlp_cfg))
            lm = _lm_head_time(s, batch, device)
            per_layer = run["ours_step_ms"] / 1e3 / bench_layers
            full = per_layer * s.layers + lm
            run["ours_full_model_step_ms_extrapolated"] = round(full * 1e3, 2)
            run["ours_tokens_per_s_extrapolated"] = round(batch / full, 3)
            run["ours_host_bytes_per_token_full_model"] = \
                run["measured_host_bytes_per_step"] / bench_layers * s.layers / batch
            if h2d:
                run["ours_h2d_fraction_during_steps"] = round(
                    run["measured_host_bytes_per_step"] / (run["ours_step_ms"] / 1e3) / h2d, 3)
            run.update(_dense_streaming(s, lay, hosts, batch, device, share, lm, mlp_cfg))
        except Exception as exc:
            run["error"] = repr(exc)[:400]
        out["runs"].append(run)
    if cuda():
        try:
            out["cold_path"] = cold_paths(s, lay, hosts[0], device, h2d,
                                          mlp_cfg=(mlp_cfgs or {}).get(1, {}))
        except Exception as exc:
            out["cold_path"] = {"error": repr(exc)[:400]}
    return out


def _union(rows: torch.Tensor) -> torch.Tensor:
    return torch.unique(rows.reshape(-1))


def _ours(s, lay, hosts, plan, n_weights, h_weights, batch, device, g, mlp_cfg):
    layers = [ResidentLayer(h, p, lay, device) for h, p in zip(hosts, plan.layers, strict=True)]
    n = len(layers)
    c = s.hidden
    ck = torch.randn(n, batch, s.heads, CONTEXT, s.head_dim, device=device).half()
    cv = torch.randn_like(ck)
    slots = torch.arange(batch, device=device, dtype=torch.int32)
    pos = torch.full((batch,), CONTEXT - 1, device=device, dtype=torch.int32)
    # Fresh tokens (not the profile): per step and layer, the union over the batch rows.
    steps, host_bytes = [], []
    for _ in range(TIMED_STEPS + 1):
        per_layer, moved = [], 0
        for i, layer in enumerate(layers):
            nsel = _union(MLP_LAW.sample(n_weights[i], batch, g))
            hsel = _union(HEAD_LAW.sample(h_weights[i], batch, g))
            nl, hl = layer.neuron_loc.cpu()[nsel], layer.head_loc.cpu()[hsel]
            moved += int((nl < 0).sum()) * lay.neuron_len * 2
            moved += int((hl < 0).sum()) * lay.head_len * 2
            per_layer.append(tuple(t.to(device) for t in (hsel, hl, nl)))
        steps.append(per_layer)
        host_bytes.append(moved)
    x0 = torch.randn(batch, c, device=device).half()
    state = {"t": 0}

    def step():
        sel = steps[state["t"] % len(steps)]
        state["t"] += 1
        x = x0
        for i, layer in enumerate(layers):
            sm = layer.small
            hsel, hl, nl = sel[i]
            a = F.layer_norm(x, (c,), sm["ln1_w"], sm["ln1_b"])
            x = sparse_attention(a, layer.head_tables[0], hsel, hl, ck[i], cv[i], slots, pos,
                                 host=layer.head_tables[1], bias=sm["out_proj_b"], residual=x)
            a = F.layer_norm(x, (c,), sm["ln2_w"], sm["ln2_b"])
            x = sparse_mlp(a, layer.neuron_tables[0], nl, host=layer.neuron_tables[1],
                           bias2=sm["fc2_b"], residual=x, **mlp_cfg)
        return x

    step()  # compile and warm up (step 0, not timed)
    sync()
    times = []
    for _ in range(TIMED_STEPS):
        times.append(time_eager(step, reps=1, warmup=0))
    t = sorted(times)[len(times) // 2]
    measured = sum(host_bytes[1:]) / TIMED_STEPS
    return {"ours_step_ms": round(t * 1e3, 3), "measured_host_bytes_per_step": measured,
            "ours_measured_h2d_gbps": round(measured / t / 1e9, 2)}


def _lm_head_time(s: Shape, batch: int, device: str) -> float:
    w = torch.empty(s.vocab, s.hidden, device=device, dtype=torch.float16).normal_(0, 0.02)
    x = torch.randn(batch, s.hidden, device=device).half()
    t = time_graph(lambda: F.linear(x, w), reps=10)
    return t


def _dense_streaming(s, lay, hosts, batch, device, share, lm, mlp_cfg):
    """Whole layers: as many resident as the per-layer shares allow, the rest streamed."""
    layer_bytes = lay.layer_bytes(2)
    resident_full = int(share * s.layers // layer_bytes)
    c = s.hidden
    bufs = [(torch.empty_like(hosts[0].neurons, device=device),
             torch.empty_like(hosts[0].heads, device=device)) for _ in range(2)]
    ck = torch.randn(batch, s.heads, CONTEXT, s.head_dim, device=device).half()
    cv = torch.randn_like(ck)
    slots = torch.arange(batch, device=device, dtype=torch.int32)
    pos = torch.full((batch,), CONTEXT - 1, device=device, dtype=torch.int32)
    all_n = torch.arange(s.ffn, device=device, dtype=torch.int32)
    all_h = torch.arange(s.heads, device=device, dtype=torch.int32)
    x0 = torch.randn(batch, c, device=device).half()
    from ..runtime.weight_store import head_rows

    def compute(nbuf, hbuf, x):
        x = sparse_attention(x, head_rows(hbuf, c, s.head_dim), all_h, all_h, ck, cv, slots,
                             pos, residual=x)
        return sparse_mlp(x, neuron_rows(nbuf, c), all_n, residual=x, **mlp_cfg)

    copy = torch.cuda.Stream() if cuda() else None

    def stream_layers():
        x = x0
        ready = []
        for i, host in enumerate(hosts):
            nb, hb = bufs[i % 2]
            ev = torch.cuda.Event()
            with torch.cuda.stream(copy):
                if len(ready) >= 2:  # buffer i % 2 was last read by layer i - 2
                    copy.wait_event(ready[-2])
                nb.copy_(host.neurons, non_blocking=True)
                hb.copy_(host.heads, non_blocking=True)
                ev.record(copy)
            torch.cuda.current_stream().wait_event(ev)
            x = compute(nb, hb, x)
            done = torch.cuda.Event()
            done.record()
            ready.append(done)
        return x

    if not cuda():
        return {"dense_streaming": "needs CUDA"}
    t_stream = time_eager(stream_layers, reps=3, warmup=1) / len(hosts)
    t_resident = time_graph(lambda: compute(bufs[0][0], bufs[0][1], x0), reps=10)
    full = resident_full * t_resident + (s.layers - resident_full) * t_stream + lm
    return {"dense_stream_layer_ms": round(t_stream * 1e3, 3),
            "dense_resident_layer_ms": round(t_resident * 1e3, 3),
            "dense_resident_layers_full_model": resident_full,
            "dense_streaming_step_ms_extrapolated": round(full * 1e3, 2),
            "dense_streaming_tokens_per_s_extrapolated": round(batch / full, 3)}


def cold_paths(s: Shape, lay: RecordLayout, host: HostLayer, device: str,
               h2d: float | None, density: float = 0.10,
               mlp_cfg: dict | None = None) -> dict[str, Any]:
    """Cold MLP rows of one layer read (a) in place from mapped pinned memory by the
    kernel, (b) gathered on the CPU into a pinned buffer, copied, then read on the GPU."""
    from ..kernels.host_memory import device_view
    c = s.hidden
    k = max(1, round(density * s.ffn))
    x = torch.randn(1, c, device=device).half()
    mapped = neuron_rows(device_view(host.neurons), c)
    empty = neuron_rows(torch.empty(0, lay.neuron_len, dtype=torch.float16, device=device), c)
    sels = [torch.randperm(s.ffn)[:k] for _ in range(4)]
    locs = [(-(i + 1)).int().to(device) for i in sels]
    nbytes = k * lay.neuron_len * 2
    cfg = mlp_cfg or {}
    t_mapped = time_graph(lambda: [sparse_mlp(x, empty, loc, host=mapped, **cfg)
                                   for loc in locs], reps=10) / len(locs)
    staged = StagedRows(k, lay.neuron_len, torch.float16, device)
    staged_locs = (-(torch.arange(k) + 1)).int().to(device)
    state = {"i": 0}

    def staged_call():
        ids = sels[state["i"] % len(sels)]
        state["i"] += 1
        done = staged.stage(host.neurons, ids)
        torch.cuda.current_stream().wait_event(done)
        return sparse_mlp(x, empty, staged_locs, host=neuron_rows(staged.gpu[:k], c), **cfg)
    # The CPU gather is on the critical path: time wall-clock around a synchronised call.
    staged_call()
    sync()
    t0 = time.perf_counter()
    for _ in range(8):
        staged_call()
    sync()
    t_staged = (time.perf_counter() - t0) / 8
    res = {"density": density, "bytes": nbytes, "mlp_blocks": cfg,
           "mapped_gbps": round(nbytes / t_mapped / 1e9, 2),
           "staged_gbps": round(nbytes / t_staged / 1e9, 2),
           "h2d_copy_gbps": None if h2d is None else round(h2d / 1e9, 2)}
    res["chosen"] = "mapped" if t_mapped <= t_staged else "staged"
    best = nbytes / min(t_mapped, t_staged)
    res["chosen_h2d_fraction"] = None if h2d is None else round(best / h2d, 3)
    return res
