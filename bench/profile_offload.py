"""Where an offloaded decode step goes, and what hot-row placement saves.

    python -m dejavu.bench.profile_offload placement            # CPU: bytes, shipped model
    python -m dejavu.bench.profile_offload step --shape opt-13b --gpu-memory-gib 14 \\
        --checkpoint-dir /dev/shm/dejavu-e2e-opt-13b             # GPU: one decode step
    TRITON_INTERPRET=1 python -m dejavu.bench.profile_offload count --heads 1.0,0.5

``placement`` (CPU, counted not timed): the shipped model's own predictors select rows on
held-out text; the first half of the tokens measures each neuron's firing frequency (what
``train-predictors`` writes as frequencies.safetensors), the second half counts the host
bytes a decode token reads for the offloaded layers (neuron and head records not on the
GPU), with no hot rows, and with each offloaded layer's ``--hot-fraction`` most frequent
neurons held on the GPU; the same with uniform random selections at the same per-layer
densities.

``step`` (GPU): the in-process engine built as ``generate --gpu-memory-gib`` builds it
(runtime/build.py), decode steps at batch 1 under torch.profiler: step time, the gathers'
time and GB/s over the link, the sparse kernels' time, K/V completion, launches and
host synchronisations (cudaStreamSynchronize, cudaMemcpy D2H) per step.

``count`` (CPU under Triton's interpreter, or a GPU): per offloaded layer and decode step, the
host synchronisations (aten calls that read the device: nonzero, item, masked_select, boolean
indexing, tolist...) and the launches (aten calls that are not views or allocations, plus
Triton kernels; on a GPU also the profiler's device events), at batch 1 after a prefill of
half the heads, with every head or a share of them selected per step. A small random model
(fp16) runs two spans, 2 and 4 offloaded layers after a resident one; per layer = difference
/ 2. Selections are drawn before the step (no selector work counted): only the runtime's.

What this does not know: the peers (bench_e2e.py) or a worker's own profile (a worker
writes one with DEJAVU_PROFILE_DIR, workers/runner.py).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import sys
import time
from pathlib import Path

import torch

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "opt-gutenberg-31m"
HELDOUT = "../shared/data/gutenberg/heldout.jsonl.xz"  # from a checkout, as README's eval


def _texts(path: Path, limit: int) -> list[str]:
    out = []
    with lzma.open(path, "rt") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) >= limit:
                break
    return out


def record_selections(model_dir: Path, data: Path, tokens: int, window: int = 256
                      ) -> tuple[dict[int, list[torch.Tensor]], dict[int, list[torch.Tensor]],
                                 object]:
    """Per layer, the neuron and head masks [T, n] the shipped predictors choose for
    ``tokens`` held-out tokens (windows of ``window`` tokens, mask mode)."""
    from ..runtime.build import build_model, resolve
    from ..runtime.model import Batch
    from ..runtime.settings import make_settings
    from ..runtime.sparse import SparseContext
    from ..runtime.tokenizer import load_tokenizer

    settings = resolve(make_settings({"model.path": str(model_dir), "model.device": "cpu"}),
                       sparse=True)
    built = build_model(settings)
    model, inner = built.model, built.selector
    neurons: dict[int, list[torch.Tensor]] = {}
    heads: dict[int, list[torch.Tensor]] = {}

    def recording(lid, source):
        sel = inner(lid, source)
        f = sel.neurons if sel.neurons is not None else torch.ones(
            *source.shape[:2], model.config.ffn_dim, dtype=torch.bool)
        h = sel.heads if sel.heads is not None else torch.ones(
            *source.shape[:2], model.config.num_attention_heads, dtype=torch.bool)
        neurons.setdefault(lid, []).append(f.reshape(-1, f.shape[-1]))
        heads.setdefault(lid, []).append(h.reshape(-1, h.shape[-1]))
        return sel

    tok = load_tokenizer(model_dir)
    seen = 0
    with torch.inference_mode():
        for text in _texts(data, 10_000):
            ids = tok.encode(text)[:window]
            if len(ids) < 16:
                continue
            x = torch.tensor([ids])
            pos = torch.arange(len(ids))[None]
            model(x, Batch(pos, None, None, SparseContext(recording, mode="mask")))
            seen += len(ids)
            if seen >= tokens:
                break
    return ({k: torch.cat(v) for k, v in neurons.items()},
            {k: torch.cat(v) for k, v in heads.items()}, model.config)


def host_bytes(neurons: torch.Tensor, heads: torch.Tensor, hot: torch.Tensor,
               neuron_bytes: int, head_bytes: int) -> float:
    """Mean host bytes per token of one layer: its selected neurons not in ``hot`` (bool
    [F]) and its selected heads (heads stay out of the static rows, as fit_gib places)."""
    cold = (neurons & ~hot).sum(1).double()
    return float((cold * neuron_bytes + heads.sum(1).double() * head_bytes).mean())


def placement(args) -> dict:
    from ..runtime.weight_store import RecordLayout

    neurons, heads, config = record_selections(Path(args.model), Path(args.data), args.tokens)
    layout = RecordLayout.of(config)
    e = 2  # bytes per weight in the offloaded (float16/bfloat16) records
    nb, hb = layout.neuron_len * e, layout.head_len * e
    offloaded = [int(v) for v in args.offload.split(",")]
    out = {"model": str(args.model), "tokens": int(next(iter(neurons.values())).shape[0]),
           "offloaded_layers": offloaded, "hot_fraction": args.hot_fraction, "layers": {}}
    totals = {"none": 0.0, "placed": 0.0, "uniform_none": 0.0, "uniform_placed": 0.0}
    g = torch.Generator().manual_seed(0)
    for lid in offloaded:
        f, h = neurons[lid], heads[lid]
        half = f.shape[0] // 2
        freq = f[:half].double().mean(0)
        k = int(args.hot_fraction * config.ffn_dim)
        hot = torch.zeros(config.ffn_dim, dtype=torch.bool)
        hot[freq.topk(k).indices] = True
        test_f, test_h = f[half:], h[half:]
        # Uniform selections of the same per-token counts.
        counts = test_f.sum(1)
        ranks = torch.rand(test_f.shape, generator=g).argsort(1).argsort(1)
        uni = ranks < counts[:, None]
        none = torch.zeros_like(hot)
        row = {"mlp_density": float(test_f.double().mean()),
               "head_density": float(test_h.double().mean()),
               "none": host_bytes(test_f, test_h, none, nb, hb),
               "placed": host_bytes(test_f, test_h, hot, nb, hb),
               "uniform_none": host_bytes(uni, test_h, none, nb, hb),
               "uniform_placed": host_bytes(uni, test_h, hot, nb, hb),
               "hot_share_of_firings": float(test_f[:, hot].double().sum()
                                             / max(float(test_f.double().sum()), 1.0))}
        for key in totals:
            totals[key] += row[key]
        out["layers"][str(lid)] = row
    out["host_bytes_per_token"] = totals
    out["gain_real"] = totals["none"] / totals["placed"] if totals["placed"] else None
    out["gain_uniform"] = totals["uniform_none"] / totals["uniform_placed"] \
        if totals["uniform_placed"] else None
    return out


def _host_split(engine, steps: int, path: str) -> dict:
    """Decode steps without torch.profiler: their wall time, the host's time to issue each
    (until ``engine.step`` returns, before a device synchronisation) and the device's
    (CUDA events around the step), then the same steps under cProfile, whose functions by
    own time are written to ``path``: where the host's share goes, time blocked reading
    the device included (``item``, ``tolist``, synchronisations)."""
    import cProfile
    import io
    import pstats

    cuda = torch.cuda.is_available()
    walls, issues, device = [], [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        engine.step()
        issued = time.perf_counter() - t0
        if cuda:
            end.record()
            torch.cuda.synchronize()
            device.append(start.elapsed_time(end) / 1e3)
        walls.append(time.perf_counter() - t0)
        issues.append(issued)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    if cuda:
        torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    Path(path).write_text(text.getvalue())

    def med(xs: list[float]) -> float | None:
        return sorted(xs)[len(xs) // 2] if xs else None

    return {"plain_step_s": med(walls), "plain_host_issue_s": med(issues),
            "plain_device_s": med(device), "cprofile": path}


def step_profile(args) -> dict:
    """Decode steps at batch 1 of the in-process engine under torch.profiler (GPU)."""
    from ..runtime.offload import host_bytes_read
    from ..runtime.sampling import SamplingParams
    from .bench_e2e import E2EOptions, _built_engine, _prompt
    from .bench_pipeline import random_checkpoint

    device_ok = torch.cuda.is_available()
    model_dir, _ = random_checkpoint(args.shape, Path(args.checkpoint_dir), torch.float16)
    opts = E2EOptions(shape=args.shape, streams=1)
    built, engine = _built_engine(model_dir, "random:0.1" if args.heads >= 1 else
                                  f"random:0.1:{args.heads}", args.gpu_memory_gib, opts, 64)
    params = SamplingParams(max_new_tokens=3 * args.steps + 4, ignore_eos=True)
    rid = engine.add(_prompt(16), params)
    for _ in range(4):  # prefill and warm-up decode steps (compiles)
        engine.step()
    plain = _host_split(engine, args.steps, args.cprofile) if args.cprofile else None
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device_ok:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    b0, t0 = host_bytes_read(built.model), time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            engine.step()
        if device_ok:
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    read = (host_bytes_read(built.model) - b0) / args.steps
    engine.scheduler.forget(rid)
    events = prof.key_averages()

    def total(match, cuda=True) -> tuple[float, int]:
        t, n = 0.0, 0
        for ev in events:
            if match(ev.key):
                t += (getattr(ev, "device_time_total", 0) if cuda else ev.cpu_time_total)
                n += ev.count
        return t / 1e6 / args.steps, n // args.steps

    gather_s, gathers = total(lambda k: "gather_rows" in k)
    copy_s, copies = total(lambda k: "Memcpy HtoD" in k)
    syncs = total(lambda k: k in ("cudaStreamSynchronize", "cudaDeviceSynchronize"), False)[1]
    d2h = total(lambda k: "Memcpy DtoH" in k)[1]
    launches = total(lambda k: k in ("cudaLaunchKernel", "cuLaunchKernel",
                                     "cudaLaunchKernelExC"), False)[1]
    mlp_s, _ = total(lambda k: "_mlp" in k and "kernel" in k)
    attn_s, _ = total(lambda k: ("qkv" in k or "attention" in k or "out_proj" in k)
                      and "kernel" in k)
    out = {"shape": args.shape, "gpu_memory_gib": args.gpu_memory_gib,
           "offloaded_layers": len(built.offloaded), "step_s": seconds,
           "host_bytes_per_step": read, "link_bytes_per_s_over_step": read / seconds,
           "gather_s": gather_s, "gathers": gathers,
           "gather_bytes_per_s": read / gather_s if gather_s else None,
           "whole_copies_s": copy_s, "whole_copies": copies,
           "mlp_kernels_s": mlp_s, "attention_kernels_s": attn_s,
           "syncs_per_step": syncs, "d2h_copies_per_step": d2h,
           "launches_per_step": launches}
    if plain is not None:
        out.update(plain)
    if args.table:
        print(events.table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return out


def _count_config(layers: int):
    from ..runtime.opt_config import OPTConfig

    return OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=layers, ffn_dim=256,
                     num_attention_heads=8, max_position_embeddings=64,
                     word_embed_proj_dim=64)


class _Drawn:
    """Masks drawn before a step: ``heads`` of the heads and ``mlp`` of the neurons per
    token, per offloaded layer, from a seeded generator (new masks after each ``redraw``);
    the resident layer 0 stays dense, so that it counts the same in every span."""

    def __init__(self, config, heads: float, mlp: float, device, seed: int = 0) -> None:
        self.config, self.heads, self.mlp, self.device = config, heads, mlp, device
        self.g = torch.Generator().manual_seed(seed)
        self.masks: dict[int, tuple] = {}

    def redraw(self, batch: int, tokens: int) -> None:
        c = self.config
        self.masks = {lid: (self._mask(batch, tokens, c.num_attention_heads, self.heads),
                            self._mask(batch, tokens, c.ffn_dim, self.mlp))
                      for lid in range(1, c.num_hidden_layers)}

    def _mask(self, b: int, t: int, n: int, share: float):
        k = max(1, round(share * n))
        top = torch.rand(b, t, n, generator=self.g).topk(k, -1).indices
        mask = torch.zeros(b, t, n, dtype=torch.bool).scatter_(-1, top, True)
        return mask.to(self.device)

    def __call__(self, layer_id: int, source):
        from ..runtime.sparse import Selection

        if layer_id not in self.masks:
            return Selection()
        heads, neurons = self.masks[layer_id]
        return Selection(heads=heads, neurons=neurons)


def count_span(layers: int, heads: float, device: torch.device, prompt: int = 12,
               steps: int = 2, offload: bool = True) -> dict:
    """Syncs and launches of one decode step (the last of ``steps``) of a model whose
    layers 1.. are offloaded (layer 0 resident), after a prefill of ``prompt`` tokens.
    ``offload`` False: every layer resident on the kernels' path (Triton's interpreter on a
    CPU under TRITON_INTERPRET=1), layers 1.. head-sparse the same way."""
    from ..runtime.model import Batch, KVCache, OPTModel
    from ..runtime.offload import OffloadSelector, move_resident, offload_layers
    from ..runtime.sparse import SparseContext, SparseStats
    from ..runtime.sparse_backend import use_backend
    from .count_launches import _count_cuda, counting

    config = _count_config(layers)
    model = OPTModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.to(torch.float16).eval().requires_grad_(False)
    offloaded = list(range(1, layers))
    drawn = _Drawn(config, 0.5, 0.3, device)
    if offload:
        offload_layers(model, offloaded, device=device)
        move_resident(model, device)
        use_backend(model, "triton" if device.type == "cuda" else "auto")
        selector = OffloadSelector(drawn, offloaded, config)
    else:
        model.to(device)
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        use_backend(model, "triton" if device.type == "cuda" or interpret else "auto")
        selector = drawn
    cache = KVCache(config, model.layer_ids, 1, config.max_position_embeddings,
                    dtype=torch.float16, device=device, keep_inputs=True)
    slots = torch.zeros(1, dtype=torch.long, device=device)

    def run(tokens, start: int):
        t = tokens.shape[1]
        pos = torch.arange(start, start + t, device=device)[None]
        ctx = SparseContext(selector, stats=SparseStats(), dense_above=1.01)
        return model(tokens, Batch(pos, slots, cache, ctx, length=start + t))

    with torch.inference_mode():
        drawn.redraw(1, prompt)  # the prefill skips half the heads: decode completes them
        logits = run(torch.arange(4, 4 + prompt, device=device)[None], 0)
        drawn.heads = heads
        for i in range(steps):
            drawn.redraw(1, 1)
            tok = logits[:, -1].argmax(-1)[:, None]
            if i < steps - 1:
                logits = run(tok, prompt + i)
        step = prompt + steps - 1
        mode = counting(lambda: run(tok, step))
        events = _count_cuda(lambda: run(tok, step)) if device.type == "cuda" else None
    return {"launches": mode.count, "syncs": mode.syncs, "sync_ops": mode.sync_ops,
            "device_events": events}


def count(args) -> dict:
    """``count_span`` at 3 and 5 layers (2 and 4 offloaded): per offloaded layer; then the
    same with every layer resident, skipped heads' K/V completed by each of the two passes
    (lazy_kv.COMPLETION: "batched" is what a GPU decode step runs, "loop" the reference)."""
    from ..runtime import lazy_kv

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": device.type, "rows": []}
    cases = [("offloaded", True, lazy_kv.COMPLETION)]
    cases += [("resident", False, c) for c in ("batched", "loop")]
    for where, offload, completion in cases:
        for heads in (float(h) for h in args.heads.split(",")):
            lazy_kv.COMPLETION, before = completion, lazy_kv.COMPLETION
            try:
                low, high = (count_span(n, heads, device, offload=offload) for n in (3, 5))
            finally:
                lazy_kv.COMPLETION = before
            row = {"layers": where, "kv_completion": completion, "heads": heads}
            for key in ("launches", "syncs", "device_events"):
                if low[key] is not None:
                    row[f"{key}_per_layer"] = (high[key] - low[key]) / 2
                    row[f"{key}_step_2_sparse"] = low[key]
            row["sync_ops_4_sparse"] = high["sync_ops"]
            out["rows"].append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="profile_offload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("placement")
    p.add_argument("--model", default=str(SHIPPED))
    p.add_argument("--data", default=str(HELDOUT))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--offload", default="3,4,5,6", help="offloaded layer ids")
    p.add_argument("--hot-fraction", type=float, default=0.25,
                   help="neurons per offloaded layer held on the GPU")
    s = sub.add_parser("step")
    s.add_argument("--shape", default="opt-13b")
    s.add_argument("--gpu-memory-gib", type=float, default=14.0)
    s.add_argument("--checkpoint-dir", default="/dev/shm/dejavu-e2e-opt-13b")
    s.add_argument("--heads", type=float, default=1.0)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--table", action="store_true")
    s.add_argument("--cprofile", default=None, metavar="FILE",
                   help="first time the steps without torch.profiler (wall, host issue, "
                        "device) and write their cProfile (own time, cumulative) to FILE")
    c = sub.add_parser("count")
    c.add_argument("--heads", default="1.0,0.5", help="head shares, comma-separated")
    for q in (p, s, c):
        q.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    res = {"placement": placement, "step": step_profile, "count": count}[args.what](args)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
