"""Where one decode step's time goes, in process: ``Stage.run`` vs the model's forward alone
vs the bare layer matmuls, and a torch-profiler table of the step.

    python -m dejavu.bench.profile_step --shape opt-1.3b --batch 1,8 --out /tmp/prof

A random-weight model of the named shape is built on the device; each batch row gets a
32-token prompt, then ``--steps`` decode steps are timed (after a warm-up), with the device
synchronised around each timed loop. Three numbers per batch size:

- ``stage_ms``: ``Stage.run`` (host batch tensors, forward, LM head, sampling): what a
  worker spends per step, with decode CUDA graphs (runtime/graphs.py) and without
  (``stage_eager_ms``);
- ``forward_ms``: ``OPTModel.run_layers`` on a ready-made batch (no host tensors, no
  sampling);
- ``matmul_ms``: the layers' weight matmuls alone (dense), the floor a dense step pays.

``--mlp-density D`` makes the stages sparse at density D with every head: ``--select
random`` draws uniformly random neurons (topk over random scores per layer: a baseline whose
own selection costs time), ``--select predictors`` runs low-rank predictors of the ranks
`train-predictors` makes (random weights, each layer's threshold calibrated to D on the
prompt), which a captured step runs as one fused kernel per layer (kernels/select.py).
``--out`` writes profiler tables of five decode steps, by host time and by device time.

What this does not measure: sockets, the scheduler, or several processes
(bench/bench_pipeline.py does).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..runtime.model import Batch, OPTModel, full_positions
from ..runtime.opt_config import OPTConfig
from ..runtime.predictors import PredictorSet
from ..runtime.sampling import SamplingParams
from ..runtime.selection import PredictorSelector, RandomSelector
from ..runtime.sparse import Selection, SparseContext, needs_kv_inputs
from ..runtime.stage import Stage, allocate_cache
from ..runtime.step import Row, Step
from .bench_pipeline import SHAPES

PROMPT = 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn(i)`` over ``steps`` calls."""
    _sync(device)
    started = time.perf_counter()
    for i in range(steps):
        fn(i)
    _sync(device)
    return (time.perf_counter() - started) / steps


def build(shape: str, device: torch.device, dtype: torch.dtype) -> OPTModel:
    kw = SHAPES[shape]
    config = OPTConfig(word_embed_proj_dim=kw["hidden_size"], **kw)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: an OPT-13B shape in fp32 is 52 GB
    try:
        with torch.device(device):
            model = OPTModel(config)
    finally:
        torch.set_default_dtype(default)
    model.init_weights(torch.Generator(device).manual_seed(0))
    return model.eval().requires_grad_(False)


def predictor_selector(model: OPTModel, density: float, device: torch.device,
                       prompt: int = PROMPT) -> PredictorSelector:
    """Random low-rank predictors (ranks 128 and 64) selecting by threshold, each layer's
    threshold the mean over a random prompt's tokens of their k-th best score (k = density x
    F): about ``density`` of the neurons per token, every head kept."""
    c = model.config
    param = next(model.parameters())
    preds = PredictorSet.create(model, 128, 64).to(device, param.dtype)
    preds.mlp_select = "threshold"
    sources: dict[int, torch.Tensor] = {}

    def record(layer_id: int, source: torch.Tensor) -> Selection:
        sources[layer_id] = source
        return Selection()  # dense: the prompt runs as the model does

    ids = torch.randint(3, c.vocab_size, (1, prompt), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    pos = full_positions(1, prompt, device)
    with torch.inference_mode():
        model.run_layers(model.embed(ids, pos), Batch(pos, sparse=SparseContext(record)))
        k = max(1, round(density * c.ffn_dim))
        for lid, source in sources.items():
            scores = preds.mlp[lid](source).float().reshape(-1, c.ffn_dim)
            kth = scores.kthvalue(c.ffn_dim - k + 1, dim=-1).values
            preds.points[lid].mlp_threshold = float(kth.mean())
    return PredictorSelector(preds)


def _stage_loop(model: OPTModel, batch: int, steps: int, device: torch.device, *,
                graphs: bool, mlp_density: float | None = None, select: str = "random"):
    """Seconds per decode step of ``Stage.run`` after a prompt and a warm-up; also returns
    the stage and its step function, for the profiler, and the sparse statistics of the
    timed steps alone. ``mlp_density``: sparse, with
    uniformly random neurons at that density and every head (random weights have no
    predictors), on a cache that keeps attention inputs, as a sparse worker runs."""
    max_len = PROMPT + steps + 128
    selector = None
    if mlp_density is not None and select == "predictors":
        selector = predictor_selector(model, mlp_density, device)
    elif mlp_density is not None:
        c = model.config
        selector = RandomSelector(c.ffn_dim, c.num_attention_heads, mlp_density, 1.0)
    cache = allocate_cache(model, batch, max_len, keep_inputs=needs_kv_inputs(selector))
    stage = Stage(model, cache, selector, cuda_graphs=graphs)
    params = SamplingParams(max_new_tokens=max_len, ignore_eos=True)
    rows = [Row(f"r{b}", b, [2] + [(7 * b + j) % 1000 + 3 for j in range(PROMPT - 1)], 0,
                True, params) for b in range(batch)]
    last = {r.request_id: r.token for r in stage.run(Step(0, rows)).results}
    pos = PROMPT

    def decode(i: int) -> None:
        nonlocal pos
        step = Step(i + 1, [Row(f"r{b}", b, [last[f"r{b}"]], pos, True, params)
                            for b in range(batch)])
        for r in stage.run(step).results:
            last[r.request_id] = r.token
        pos += 1

    for i in range(3):
        decode(i)
    # The densities of the timed decode steps alone: the prompt's prefill (a union of
    # PROMPT tokens, near dense) and later untimed forwards must not be averaged in.
    before = stage.sparse_stats.snapshot()
    seconds = _timed(decode, steps, device)
    return seconds, stage, decode, stage.sparse_stats.since(before)


def profile_batch(model: OPTModel, batch: int, steps: int, device: torch.device,
                  out: Path | None, mlp_density: float | None = None,
                  select: str = "random") -> dict:
    eager_s, _, _, eager_stats = _stage_loop(model, batch, steps, device, graphs=False,
                                             mlp_density=mlp_density, select=select)
    stage_s, stage, decode, stage_stats = _stage_loop(model, batch, steps, device, graphs=True,
                                                      mlp_density=mlp_density, select=select)
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    pos = PROMPT + steps + 3
    # The model's forward alone on a fixed decode batch (rewrites one position).
    ids, b = stage.batch(Step(0, [Row(f"r{i}", i, [5], pos, True, params)
                                  for i in range(batch)]))
    with torch.inference_mode():
        hidden = model.embed(ids, b.positions)
        forward_s = _timed(lambda _: model.run_layers(hidden, b), steps, device)
        x = hidden.reshape(batch, -1)

        def matmuls(_: int) -> None:
            for layer in model.layers():
                a = layer.self_attn
                for lin in (a.q_proj, a.k_proj, a.v_proj, a.out_proj):
                    lin(x)
                layer.fc2(layer.fc1(x))

        matmul_s = _timed(matmuls, steps, device)

    row = {"batch": batch, "mlp_density": mlp_density,
           "select": select if mlp_density is not None else None,
           "stage_ms": round(stage_s * 1e3, 3),
           "stage_eager_ms": round(eager_s * 1e3, 3), "graphs": sorted(stage.graphs.graphs),
           "forward_ms": round(forward_s * 1e3, 3), "matmul_ms": round(matmul_s * 1e3, 3)}
    if mlp_density is not None:  # what each stage measured over its timed decode steps
        row["measured_mlp_density"] = round(stage_stats.mlp_density, 4)
        row["measured_mlp_density_eager"] = round(eager_stats.mlp_density, 4)
    if out is not None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(5):
                decode(100 + i)
            _sync(device)
        name = f"b{batch}-" + ("dense" if mlp_density is None else f"{select}{mlp_density:g}")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (out / f"profile-{name}.txt").write_text(table)
        if device.type == "cuda":  # the step's kernels, by device time
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
            (out / f"profile-{name}-cuda.txt").write_text(table)
            print(f"--- {name}: top kernels of 5 decode steps by device time\n{table}",
                  flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="profile_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="opt-1.3b", choices=sorted(SHAPES))
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, else float32")
    parser.add_argument("--out", default=None, help="write profiler tables here")
    parser.add_argument("--mlp-density", type=float, default=None,
                        help="run sparse: neurons at this density, every head")
    parser.add_argument("--select", default="random", choices=("random", "predictors"),
                        help="with --mlp-density: uniformly random neurons, or random-weight "
                             "predictors with calibrated thresholds (the fused kernel)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    model = build(args.shape, device, dtype)
    rows = [profile_batch(model, int(b), args.steps, device, out, args.mlp_density, args.select)
            for b in args.batch.split(",")]
    for row in rows:
        print(json.dumps({"shape": args.shape, "device": str(device), **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
