"""The product's offload paths end to end, beside the peers a user would pick instead, on one
random-weight checkpoint and one GPU budget, in one run (`dejavu-run bench --only e2e`).

    python -m dejavu.bench.bench_e2e --shape opt-13b --gpu-memory-gib 14 \\
        --checkpoint-dir /dev/shm/dejavu-e2e-opt-13b --out bench/results
    python -m dejavu.bench.bench_e2e --small      # the CPU dry run (tiny shapes)

Rows, each with tokens/s at batch 1 and with 8 streams, time to first token for a 32- and a
512-token prompt, host bytes per generated token, the link-bound limit (those bytes over the
host-to-device bandwidth measured in the same run) and the fraction of it reached:

- ``engine``: the in-process engine as ``generate --gpu-memory-gib`` builds it (settings
  through runtime/build.py's ``build_stage``, then ``Engine.from_stage``), once per
  selection: random 10% of neurons with every head, and with Deja Vu's 50% of heads; and
  once more with the decode MLP's rows read in place by the kernel instead of gathered to
  the device first (``OffloadedLayer.stage_neurons`` False). Decode is timed after a few
  warm-up decode steps at each batch size (Triton compiles decode kernels on first use;
  the kernels any timed span still compiled are listed with its row);
  the time to first token also against its bound (offloaded record bytes / bandwidth + the
  resident layers' own prefill time, timed per layer in the same prefill);
- ``launch``: ``launch --workers 1`` with the same budget, through a client;
- ``accelerate``: Hugging Face accelerate's ``device_map`` with the same GPU budget over the
  same checkpoint;
- ``flexgen``: FlexGen's OPT runner (``flexgen.flex_opt``; random "dummy" weights of the same
  shape, its own feature) with its weight split set to our budget's resident fraction; when
  it cannot run, the row says exactly why;
- ``resident``: the engine's decode step with the whole model on the GPU, sparse (random 10%
  of neurons, every head) against dense (CUDA graphs where they apply).

Random weights have no predictors, so selections are uniformly random at the stated
densities (bench_pipeline.py's ``--select random:M[:H]``). The JSON carries, besides every
row, the headline keys for batch 1 with every head: ``e2e_offload_link_fraction``,
``e2e_offload_speedup_vs_accelerate``, ``e2e_ttft512_over_bound``,
``engine_sparse_speedup_vs_dense_opt13b``.

What this does not measure: real text's selections (placement from the model's frequencies
needs a trained model and its predictors) or more than one GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..kernels.compiles import Compiles
from .bench_common import h2d_bandwidth

SELECTS = ("random:0.1", "random:0.1:0.5")


@dataclass
class E2EOptions:
    shape: str = "opt-13b"
    # 14 GiB at OPT-13B with 8 slots of ~530 positions (5.2 GB of KV cache and inputs):
    # 29 of 40 layers offloaded. None: the dry run's budget (60% of the layers offloaded).
    gpu_memory_gib: float | None = 14.0
    checkpoint_dir: Path | None = None  # default: /dev/shm (RAM), else a temporary directory
    out_dir: Path = Path("bench/results")
    small: bool = False
    tokens: int = 16  # new tokens per stream in the decode measurements
    streams: int = 8  # the concurrent streams of the batched row
    prompts: tuple[int, int] = (32, 512)  # the time-to-first-token prompts
    time_budget_s: float = 460.0  # rows that would start past it are skipped, with the reason
    peers: tuple[str, ...] = ("launch", "accelerate", "flexgen", "resident")
    command: str = field(default_factory=lambda: " ".join(sys.argv))

    @classmethod
    def dry_run(cls, out_dir: Path) -> E2EOptions:
        return cls(shape="tiny", gpu_memory_gib=None, out_dir=out_dir, small=True, tokens=3,
                   streams=2, prompts=(8, 24), time_budget_s=900.0)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [2] + [(17 * salt + 5 * j) % 1000 + 3 for j in range(n - 1)]


def small_budget_gib(config, dtype_bytes: int, slots: int, max_len: int) -> float:
    """A budget that keeps 40% of the layers resident, with room for the prefill buffer."""
    from ..scheduler.planner import (
        embed_bytes,
        layer_bytes,
        offload_reserved_bytes,
        stream_buffer_bytes,
    )
    n = config.num_hidden_layers
    fixed = (offload_reserved_bytes(config, n, slots, max_len, dtype_bytes)
             + embed_bytes(config, dtype_bytes) + stream_buffer_bytes(config, dtype_bytes))
    return (fixed + int(0.4 * n) * layer_bytes(config, dtype_bytes) + 1) / 2**30


def gather_bandwidth(rows: int = 49152, length: int = 10256) -> dict[str, float]:
    """Bytes/s of gathering half the rows (neuron records of the OPT-13B shape) of a pinned
    host table into device memory: kernels/gather_rows.py against torch.index_select, both
    reading the mapped table in place (what staged decode reads at)."""
    from ..kernels.gather_rows import gather_rows
    from ..kernels.host_memory import device_view
    from .bench_common import time_eager

    host = torch.empty((rows, length), dtype=torch.float16, pin_memory=True)
    view = device_view(host)
    ids = torch.randperm(rows, device="cuda")[: rows // 2].sort().values
    out = torch.empty((rows // 2, length), dtype=torch.float16, device="cuda")
    nbytes = out.numel() * out.element_size()
    t_kernel = time_eager(lambda: gather_rows(view, ids, out), reps=3)
    t_torch = time_eager(lambda: torch.index_select(view, 0, ids, out=out), reps=3)
    return {"gather_rows_bytes_per_s": nbytes / t_kernel,
            "index_select_bytes_per_s": nbytes / t_torch}


# --- the in-process engine (what `generate --gpu-memory-gib` runs) ---------------------------


class LayerTimer:
    """Per decoder layer wall time of forward passes (CUDA events on a GPU), while on."""

    def __init__(self, model) -> None:
        self.times: dict[int, float] = {}
        self.on = False
        self._open: dict[int, Any] = {}
        self.handles = []
        for layer in model.layers():
            self.handles.append(layer.register_forward_pre_hook(self._pre(layer.layer_id)))
            self.handles.append(layer.register_forward_hook(self._post(layer.layer_id)))

    def _now(self):
        if _cuda():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _pre(self, lid):
        def hook(_m, _a):
            if self.on:
                self._open[lid] = self._now()
        return hook

    def _post(self, lid):
        def hook(_m, _a, _o):
            if self.on:
                self._open[lid] = (self._open[lid], self._now())
        return hook

    def collect(self) -> dict[int, float]:
        _sync()
        for lid, (a, b) in self._open.items():
            dt = a.elapsed_time(b) / 1e3 if _cuda() else b - a
            self.times[lid] = self.times.get(lid, 0.0) + dt
        self._open.clear()
        return self.times

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _first_token_s(engine, prompt: list[int]) -> float:
    from ..runtime.sampling import SamplingParams

    _sync()
    t0 = time.perf_counter()
    for event in engine.stream(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True)):
        if event.error is not None:  # the step failed: its reason, not a time
            raise RuntimeError(f"the {len(prompt)}-token prompt failed: {event.error}")
        if event.token is not None:
            break
    _sync()
    return time.perf_counter() - t0


def _decode(engine, streams: int, tokens: int, prompt_len: int, bytes_read) -> dict[str, float]:
    """Decode tokens/s and host bytes per generated token for ``streams`` streams, counted
    from the step after every stream has its first token (prefill excluded)."""
    from ..runtime.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    ids = [engine.add(_prompt(prompt_len, s), params) for s in range(streams)]
    seen = {rid: 0 for rid in ids}
    t0 = b0 = None
    generated = 0
    while engine.scheduler.has_work():
        for event in engine.step():
            if event.token is not None:
                seen[event.request_id] += 1
                if t0 is not None:
                    generated += 1
        if t0 is None and all(n >= 1 for n in seen.values()):
            _sync()
            t0, b0 = time.perf_counter(), bytes_read()
    _sync()
    seconds = time.perf_counter() - t0
    for rid in ids:
        engine.scheduler.forget(rid)
    return {"tokens_per_s": generated / seconds if seconds else 0.0,
            "host_bytes_per_token": (bytes_read() - b0) / max(generated, 1),
            "decode_tokens": generated}


def _built_engine(model_dir: Path, select: str, budget: float, opts: E2EOptions,
                  max_len: int):
    """The engine ``generate --gpu-memory-gib`` runs: settings -> runtime/build.py's
    ``build_stage`` -> ``Engine.from_stage`` (the same builder every worker uses)."""
    from ..runtime.build import build_stage, resolve
    from ..runtime.settings import make_settings
    from ..scheduler.engine import Engine
    from .bench_pipeline import parse_select

    # The device as `generate --device` sets it: without it the engine is built on the CPU.
    device = "cuda" if _cuda() else "cpu"
    settings = make_settings({"model.path": str(model_dir), "model.dtype": "float16",
                              "model.device": device, "pipeline.gpu_memory_gib": budget,
                              **parse_select(select)})
    built = build_stage(resolve(settings), slots=opts.streams, max_len=max_len)
    if built.stage.device.type != device:
        raise RuntimeError(f"the engine was built on {built.stage.device}, not {device}")
    return built, Engine.from_stage(built.stage)


def _warm_decode(engine, opts: E2EOptions) -> None:
    """A few decode steps at each timed batch size before anything is timed: Triton
    compiles the decode kernels on their first call (seconds on a fresh machine, while a
    worker started later finds them in Triton's disk cache) and CUDA graphs are captured
    per batch size."""
    for streams in (1, opts.streams):
        _decode(engine, streams, 3, 8, lambda: 0)


def engine_rows(model_dir: Path, opts: E2EOptions, h2d: float | None, dtype: torch.dtype,
                log) -> list[dict[str, Any]]:
    """One build per selection through the product's builder; the default decode reads
    (staged: selected rows gathered to the device ahead of the kernels), then, on the same
    built engine, the MLP's rows read in place by the kernel (``stage_neurons`` False)."""
    from ..runtime.offload import host_bytes_read
    from .bench_pipeline import shape_config

    max_len = max(opts.prompts) + opts.tokens + 8
    budget = opts.gpu_memory_gib or small_budget_gib(shape_config(opts.shape), 2, opts.streams,
                                                     max_len)
    rows = []
    for select, variants in ((SELECTS[0], (True, False)), (SELECTS[1], (True,))):
        t0 = time.perf_counter()
        built, engine = _built_engine(model_dir, select, budget, opts, max_len)
        model, offloaded = built.model, built.offloaded
        config = model.config
        load_s = time.perf_counter() - t0
        log(f"engine {select}: built in {load_s:.1f} s, {len(offloaded)} of "
            f"{config.num_hidden_layers} layers offloaded")
        held = [layer.offloaded for layer in model.layers() if layer.offloaded is not None]
        record_bytes = sum(ops.rows.layout.layer_bytes(dtype.itemsize) for ops in held)
        for staged in variants:
            for ops in held:
                ops.stage_neurons = staged
            row: dict[str, Any] = {"path": "engine", "select": select, "gpu_memory_gib": budget,
                                   "mlp_cold_rows": "staged" if staged else "in place",
                                   "built_by": "runtime.build.build_stage",
                                   "offloaded_layers": len(offloaded),
                                   "resident_layers": config.num_hidden_layers - len(offloaded),
                                   "load_s": round(load_s, 1),
                                   "expected_host_bytes_per_token":
                                       built.report["host_bytes_per_step"]}
            _first_token_s(engine, _prompt(8, 99))  # warm-up: compiles, caches
            timer = LayerTimer(model)
            for n in opts.prompts:
                timer.times.clear()
                timer.on = True
                with Compiles() as compiled:
                    row[f"ttft{n}_s"] = _first_token_s(engine, _prompt(n, n))
                timer.on = False
                row[f"ttft{n}_compiles"] = compiled.names
                times = timer.collect()
                if n == max(opts.prompts):
                    resident_s = sum(t for lid, t in times.items() if lid not in offloaded)
                    row["ttft_bound_s"] = (record_bytes / h2d if h2d else 0.0) + resident_s
                    row["ttft_resident_layers_s"] = resident_s
                    row["ttft_over_bound"] = row[f"ttft{n}_s"] / row["ttft_bound_s"] \
                        if row["ttft_bound_s"] else None
            timer.remove()  # no hooks on the layers while decode is timed
            _warm_decode(engine, opts)
            for streams in (1, opts.streams):
                with Compiles() as compiled:
                    d = _decode(engine, streams, opts.tokens, min(opts.prompts),
                                lambda m=model: host_bytes_read(m))
                row[_key(streams)] = _with_bound(d, streams, h2d)
                row[f"{_key(streams)}_compiles"] = compiled.names
            rows.append(row)
            log(f"engine {select} {row['mlp_cold_rows']}: {json.dumps(_short(row))}")
        del engine, built, model, held
        gc.collect()
        if _cuda():
            torch.cuda.empty_cache()
    return rows


def _key(streams: int) -> str:
    """A row's entry for a decode measurement: "b1", or "batched" (``streams`` inside)."""
    return "b1" if streams == 1 else "batched"


def _with_bound(d: dict[str, float], streams: int, h2d: float | None) -> dict[str, Any]:
    """Adds the link-bound limit: a step reads host_bytes_per_token * streams bytes, so at
    the measured bandwidth no faster than h2d / that many steps per second."""
    out = dict(d, streams=streams)
    step_bytes = d["host_bytes_per_token"] * streams
    if h2d and step_bytes:
        out["link_bound_tokens_per_s"] = h2d / step_bytes * streams
        out["link_fraction"] = d["tokens_per_s"] / out["link_bound_tokens_per_s"]
    return out


def _short(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
            if not isinstance(v, dict)}


# --- launch --workers 1 + a client --------------------------------------------------------------


def launch_rows(model_dir: Path, opts: E2EOptions, h2d: float | None, dtype: str,
                budget: float, log) -> list[dict[str, Any]]:
    from ..runtime.sampling import SamplingParams
    from ..runtime.settings import make_settings
    from ..scheduler.config import PipelineConfig
    from ..scheduler.launch import Cluster
    from ..scheduler.zmq_client import PipelineConnection
    from .bench_pipeline import parse_select

    rows = []
    max_len = max(opts.prompts) + opts.tokens + 8
    watchdog = {"watchdog_s": 3600.0} if os.environ.get("TRITON_INTERPRET") == "1" else {}
    select = SELECTS[0]
    settings = make_settings({"model.path": str(model_dir), "model.dtype": dtype,
                              "pipeline.gpu_memory_gib": budget, **parse_select(select)})
    config = PipelineConfig(settings, workers=1, slots=opts.streams, max_len=max_len,
                            **watchdog)
    row: dict[str, Any] = {"path": "launch", "select": select, "gpu_memory_gib": budget}
    t0 = time.perf_counter()
    with Cluster(config).start(timeout_s=600) as cluster, \
            PipelineConnection(cluster.address) as conn:
        row["load_s"] = round(time.perf_counter() - t0, 1)
        one = SamplingParams(max_new_tokens=1, ignore_eos=True)
        conn.run([_prompt(8, 99)], one)  # warm-up
        for n in opts.prompts:
            t = time.perf_counter()
            for event in conn.stream(_prompt(n, n), one):
                if event.token is not None:
                    break
            row[f"ttft{n}_s"] = time.perf_counter() - t
        for streams in (1, opts.streams):
            prompts = [_prompt(min(opts.prompts), s) for s in range(streams)]
            before = sum(conn.health().paged_bytes)
            t = time.perf_counter()
            short = conn.run(prompts, SamplingParams(max_new_tokens=1, ignore_eos=True))
            prefill_s, mid = time.perf_counter() - t, sum(conn.health().paged_bytes)
            t = time.perf_counter()
            out = conn.run(prompts, SamplingParams(max_new_tokens=opts.tokens,
                                                   ignore_eos=True))
            seconds = time.perf_counter() - t
            paged = sum(conn.health().paged_bytes) - mid
            errors = [c.error for c in out + short if c.error]
            generated = sum(len(c.tokens) for c in out)
            # The decode part: the long run less a run of the same prompts to one token.
            decode_s = max(seconds - prefill_s, 1e-9)
            decode_tokens = generated - streams
            d = {"tokens_per_s": decode_tokens / decode_s,
                 "host_bytes_per_token": (paged - (mid - before)) / max(decode_tokens, 1),
                 "decode_tokens": decode_tokens, "with_prefill_tokens_per_s":
                     generated / seconds}
            if errors:
                d["errors"] = errors[:2]
            row[_key(streams)] = _with_bound(d, streams, h2d)
    rows.append(row)
    log(f"launch {select}: {json.dumps(_short(row))}")
    return rows


# --- peers -----------------------------------------------------------------------------------


def accelerate_row(model_dir: Path, opts: E2EOptions, h2d: float | None, budget: float,
                   log) -> dict[str, Any]:
    """transformers + accelerate over the same checkpoint: device_map "auto" with the GPU
    budget, the rest of the layers on the CPU (moved to the GPU per forward by its hooks)."""
    if not _cuda():
        raise RuntimeError("accelerate's CPU offload needs a GPU")
    from transformers import OPTForCausalLM

    t0 = time.perf_counter()
    model = OPTForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float16, device_map="auto",
        max_memory={0: f"{budget}GiB", "cpu": "400GiB"}).eval()
    row: dict[str, Any] = {"path": "accelerate", "select": "dense", "gpu_memory_gib": budget,
                           "load_s": round(time.perf_counter() - t0, 1)}
    dmap = getattr(model, "hf_device_map", {})
    row["offloaded_modules"] = sum(1 for d in dmap.values() if d in ("cpu", "disk"))
    # What crosses the link per forward: every parameter of the modules mapped to the CPU.
    on_cpu = [name for name, d in dmap.items() if d in ("cpu", "disk")]
    step_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if any(n == m or n.startswith(m + ".") for m in on_cpu))

    def gen(prompts: list[list[int]], new: int, hf=model) -> float:
        ids = torch.tensor(prompts, device="cuda")
        _sync()
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        _sync()
        return time.perf_counter() - t

    gen([_prompt(8, 99)], 2)  # warm-up
    for n in opts.prompts:
        row[f"ttft{n}_s"] = gen([_prompt(n, n)], 1)
    # Few tokens: each of its steps reads the offloaded layers whole (seconds a step).
    tokens = min(opts.tokens, 4)
    for streams in (1, opts.streams):
        prompts = [_prompt(min(opts.prompts), s) for s in range(streams)]
        first = gen(prompts, 1)
        total = gen(prompts, tokens)
        decode_tokens = streams * (tokens - 1)
        d = {"tokens_per_s": decode_tokens / max(total - first, 1e-9),
             "host_bytes_per_token": step_bytes / streams, "decode_tokens": decode_tokens}
        row[_key(streams)] = _with_bound(d, streams, h2d)
    log(f"accelerate: {json.dumps(_short(row))}")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def flexgen_row(opts: E2EOptions, resident_fraction: float, log,
                timeout_s: float = 240.0) -> dict[str, Any]:
    """FlexGen's OPT engine (flexgen.flex_opt.OptLM, as its own benchmark builds it) at our
    shape, its weight split (percent on GPU / CPU, pinned) set to the resident fraction of
    our budget, KV cache and activations on the GPU, I/O overlapped. Weights are its
    "_DUMMY_" random ones (it reads only its own numpy layout), and prompts are token ids
    (its benchmark would fetch the OPT tokenizer from the Hub). Run in a child process
    (``_flexgen_child``): its prefill latency for the longer prompt at batch 1 is the time
    to first token, and its decode throughput the tokens/s."""
    row: dict[str, Any] = {"path": "flexgen", "select": "dense"}
    try:
        import flexgen  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (any import failure is the row's answer)
        row["error"] = (f"flexgen cannot be imported here: {type(exc).__name__}: {exc} "
                        "(pip install --no-deps the carried flexgen wheel)")
        return row
    if not _cuda():
        row["error"] = "flexgen needs a CUDA GPU"
        return row
    gpu_pct = max(0, min(100, int(resident_fraction * 100)))
    row["weights_gpu_percent"] = gpu_pct
    deadline = time.perf_counter() + timeout_s
    for streams in (1, opts.streams):
        cmd = [sys.executable, "-m", "dejavu.bench.bench_e2e", "--flexgen-child",
               f"{opts.shape},{max(opts.prompts)},{opts.tokens},{streams},{gpu_pct}"]
        left = deadline - time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            row[_key(streams)] = {"streams": streams,
                                  "error": f"timed out after {left:.0f} s (the time budget)"}
            continue
        text = proc.stdout + proc.stderr
        found = re.search(r"FLEXGEN (\{.*\})", text)
        if proc.returncode or not found:
            row[_key(streams)] = {"streams": streams,
                                  "error": f"exit {proc.returncode}: " + text[-1500:]}
            continue
        got = json.loads(found[1])
        row[_key(streams)] = {"streams": streams, **got}
        if streams == 1:
            row[f"ttft{max(opts.prompts)}_s"] = got["prefill_latency_s"]
    log(f"flexgen: {json.dumps(_short(row))}")
    return row


def _flexgen_child(spec: str) -> None:
    """One FlexGen generation (see ``flexgen_row``); prints ``FLEXGEN {json}``."""
    from flexgen.compression import CompressionConfig
    from flexgen.flex_opt import OptLM, Policy, get_opt_config
    from flexgen.pytorch_backend import TorchDevice, TorchDisk, TorchMixedDevice
    from flexgen.timer import timers
    from flexgen.utils import ExecutionEnv

    shape, prompt_len, gen_len, batch, gpu_pct = spec.split(",")
    prompt_len, gen_len, batch, gpu_pct = int(prompt_len), int(gen_len), int(batch), int(gpu_pct)
    gpu, cpu = TorchDevice("cuda:0"), TorchDevice("cpu")
    disk = TorchDisk("/tmp/flexgen_offload")
    env = ExecutionEnv(gpu=gpu, cpu=cpu, disk=disk, mixed=TorchMixedDevice([gpu, cpu, disk]))
    comp = CompressionConfig(num_bits=4, group_size=64, group_dim=0, symmetric=False)
    policy = Policy(batch, 1, gpu_pct, 100 - gpu_pct, 100, 0, 100, 0, True, True, True,
                    False, 1.0, False, comp, False, comp)
    model = OptLM(get_opt_config("facebook/" + shape), env, "_DUMMY_", policy)
    try:
        model.generate([[2] + [5] * 31] * batch, max_new_tokens=1)  # warm-up
        timers("generate").reset()
        inputs = [[2] + [(7 * b + j) % 1000 + 3 for j in range(prompt_len - 1)]
                  for b in range(batch)]
        model.generate(inputs, max_new_tokens=gen_len)
        costs = timers("generate").costs
    finally:
        env.close_copy_threads()
    decode = sum(costs[1:])
    print("FLEXGEN " + json.dumps({
        "prefill_latency_s": costs[0], "decode_s": decode,
        "tokens_per_s": batch * (gen_len - 1) / decode if decode else None}), flush=True)


def resident_row(model_dir: Path, opts: E2EOptions, dtype: torch.dtype,
                 log) -> dict[str, Any]:
    """The engine's own decode step (Stage.run, CUDA graphs where they apply) with every
    layer on the GPU: dense against sparse (random 10% of neurons, every head), batch 1."""
    from ..runtime.checkpoint import load_model
    from .profile_step import _stage_loop

    device = torch.device("cuda" if _cuda() else "cpu")
    model = load_model(model_dir, dtype=dtype, device=device)
    steps = 3 if opts.small else 20
    dense, _, _, _ = _stage_loop(model, 1, steps, device, graphs=True)
    sparse, _, _, stats = _stage_loop(model, 1, steps, device, graphs=True, mlp_density=0.10)
    # The same density chosen by predictors (random weights, calibrated thresholds): the
    # selection a user's model runs, one fused kernel per layer in the captured step.
    pred, _, _, pred_stats = _stage_loop(model, 1, steps, device, graphs=True,
                                         mlp_density=0.10, select="predictors")
    row = {"path": "resident", "dense_step_ms": dense * 1e3, "sparse_step_ms": sparse * 1e3,
           "sparse_speedup_vs_dense": dense / sparse,
           "measured_mlp_density": stats.mlp_density,
           "predictors_step_ms": pred * 1e3, "predictors_speedup_vs_dense": dense / pred,
           "predictors_measured_mlp_density": pred_stats.mlp_density}
    log(f"resident: {json.dumps(_short(row))}")
    del model
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()
    return row


# --- the run ---------------------------------------------------------------------------------


def run_e2e(opts: E2EOptions, log=lambda m: print(m, file=sys.stderr, flush=True)
            ) -> dict[str, Any]:
    import tempfile

    from .bench_common import environment
    from .bench_pipeline import random_checkpoint, shape_config

    start = time.perf_counter()
    dtype = torch.float16
    res: dict[str, Any] = {"environment": environment(), "command": opts.command,
                           "small_dry_run": opts.small, "shape": opts.shape, "rows": [],
                           "skipped": {}}
    h2d = h2d_bandwidth()
    res["h2d_pinned_bytes_per_s"] = h2d
    try:
        res["gather_from_host"] = gather_bandwidth() if _cuda() else None
    except Exception as exc:  # noqa: BLE001 (a probe, not a row: recorded, the run goes on)
        res["gather_from_host"] = {"error": repr(exc)[:300]}
    where = opts.checkpoint_dir
    if where is None:
        shm = Path("/dev/shm")
        root = shm if shm.is_dir() and not opts.small else Path(tempfile.gettempdir())
        where = root / f"dejavu-e2e-{opts.shape}"
    model_dir, write_s = random_checkpoint(opts.shape, Path(where), dtype, log=log)
    res["checkpoint"] = {"dir": str(model_dir), "write_s": round(write_s, 1)}
    config = shape_config(opts.shape)
    max_len = max(opts.prompts) + opts.tokens + 8
    budget = opts.gpu_memory_gib or small_budget_gib(config, 2, opts.streams, max_len)
    res["gpu_memory_gib"] = budget

    def attempt(name: str, fn) -> None:
        used = time.perf_counter() - start
        if used > opts.time_budget_s:
            res["skipped"][name] = f"time budget: {used:.0f} s used of {opts.time_budget_s:g} s"
            log(f"{name} skipped: {res['skipped'][name]}")
            return
        try:
            out = fn()
            res["rows"].extend(out if isinstance(out, list) else [out])
        except Exception as exc:  # noqa: BLE001 (a failed row is recorded, the rest run)
            res["rows"].append({"path": name, "error": f"{type(exc).__name__}: {exc}"[:800]})
            log(f"{name} failed: {exc!r}")
        # After every row: a run stopped by a time limit keeps what it measured.
        res.update(headline(res, opts))
        res["total_s"] = round(time.perf_counter() - start, 1)
        write_results(res, opts.out_dir)

    attempt("engine", lambda: engine_rows(model_dir, opts, h2d, dtype, log))
    resident = next((r["resident_layers"] for r in res["rows"] if "resident_layers" in r), 0)
    # Headline rows first; FlexGen (two child processes that build their own weights) last,
    # within what the time budget leaves.
    if "resident" in opts.peers:
        attempt("resident", lambda: resident_row(model_dir, opts, dtype, log))
    if "accelerate" in opts.peers:
        attempt("accelerate", lambda: accelerate_row(model_dir, opts, h2d, budget, log))
    if "launch" in opts.peers:
        attempt("launch", lambda: launch_rows(model_dir, opts, h2d, "float16", budget, log))
    if "flexgen" in opts.peers:
        left = opts.time_budget_s - (time.perf_counter() - start)
        attempt("flexgen", lambda: flexgen_row(opts, resident / config.num_hidden_layers, log,
                                               timeout_s=max(30.0, left)))
    res.update(headline(res, opts))
    res["total_s"] = round(time.perf_counter() - start, 1)
    return res


def _row(res: dict[str, Any], path: str, select: str | None = None,
         **match: Any) -> dict[str, Any]:
    for r in res["rows"]:
        if r.get("path") == path and (select is None or r.get("select") == select) \
                and "error" not in r and all(r.get(k) == v for k, v in match.items()):
            return r
    return {}


def headline(res: dict[str, Any], opts: E2EOptions) -> dict[str, Any]:
    """The issue's keys for the batch-1, every-head case (None where not measured)."""
    eng, acc = _row(res, "engine", SELECTS[0], mlp_cold_rows="staged"), \
        _row(res, "accelerate")
    resident = _row(res, "resident")
    # The engine's sparse step as the product runs it: predictors selecting through the
    # fused kernel (a random selector's own draws are a baseline's cost, kept beside it).
    sparse = resident.get("predictors_speedup_vs_dense", resident.get("sparse_speedup_vs_dense"))
    out = {"e2e_offload_link_fraction": eng.get("b1", {}).get("link_fraction"),
           "e2e_offload_speedup_vs_accelerate": None,
           "e2e_ttft512_over_bound": eng.get("ttft_over_bound"),
           "engine_sparse_speedup_vs_dense_opt13b": sparse if opts.shape == "opt-13b"
           else None,
           "engine_random_selector_speedup_vs_dense_opt13b":
               resident.get("sparse_speedup_vs_dense") if opts.shape == "opt-13b" else None}
    if eng.get("b1") and acc.get("b1"):
        out["e2e_offload_speedup_vs_accelerate"] = \
            eng["b1"]["tokens_per_s"] / acc["b1"]["tokens_per_s"]
    return out


def write_results(res: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    env = res["environment"]
    gpu = (env.get("gpu") or "cpu").replace("NVIDIA ", "").replace(" ", "-").lower()
    stem = f"{env['date_utc'][:10]}-{gpu}-e2e" + ("-small" if res["small_dry_run"] else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    jpath.write_text(json.dumps(res, indent=1, default=str) + "\n")
    mpath.write_text(markdown(res))
    return jpath, mpath


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    h2d = res.get("h2d_pinned_bytes_per_s")
    lines = [f"# End-to-end offload, {res['shape']}, {env['date_utc']}", "",
             f"GPU {env.get('gpu')} (driver {env.get('driver')}), torch {env['torch']}, triton "
             f"{env.get('triton')}, transformers {env.get('transformers')}, accelerate "
             f"{env.get('accelerate')}. Budget {_f(res.get('gpu_memory_gib'))} GiB; pinned "
             f"host-to-device {_f(h2d / 1e9 if h2d else None)} GB/s measured in this run "
             f"(gathers from mapped host rows: {res.get('gather_from_host')}). "
             f"Command: `{res['command']}`. Total {res.get('total_s')} s.", ""]
    if res["small_dry_run"]:
        lines += ["**Dry run (--small): tiny shapes on the CPU, numbers are meaningless.**", ""]
    lines += ["| key | value |", "|---|---|"]
    for k in ("e2e_offload_link_fraction", "e2e_offload_speedup_vs_accelerate",
              "e2e_ttft512_over_bound", "engine_sparse_speedup_vs_dense_opt13b"):
        lines.append(f"| {k} | {_f(res.get(k))} |")
    lines += ["", "| path | select | tok/s b1 | tok/s batched | TTFT 32 / 512 s | host MB/token b1 "
              "| link-bound tok/s b1 | reached | TTFT bound s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['path']} | | error: {r['error'][:200]} | | | | | | |")
            continue
        if r["path"] == "resident":
            pred = r.get("predictors_step_ms")
            lines.append(f"| resident | dense {_f(r['dense_step_ms'])} ms, random 10% "
                         f"{_f(r['sparse_step_ms'])} ms, predictors 10% "
                         f"{_f(pred) if pred is not None else '-'} ms | | | | | | | |")
            continue
        b1, b8 = r.get("b1", {}), r.get("batched", {})
        ttft = " / ".join(_f(v) for k, v in r.items() if k.startswith("ttft") and
                          k.endswith("_s") and k[4:-2].isdigit())
        mb = b1.get("host_bytes_per_token")
        lines.append(
            f"| {r['path']} | {r.get('select', '')} {r.get('mlp_cold_rows', '')} | "
            f"{_f(b1.get('tokens_per_s'))} | "
            f"{_f(b8.get('tokens_per_s'))} | {ttft} | {_f(mb / 1e6 if mb else None)} | "
            f"{_f(b1.get('link_bound_tokens_per_s'))} | {_f(b1.get('link_fraction'))} | "
            f"{_f(r.get('ttft_bound_s'))} |")
    # An engine row's timed spans (ttft32, ttft512, b1, batched) and what compiled in each.
    compiled = [f"{r['path']} {r.get('select', '')} {r.get('mlp_cold_rows', '')}: "
                f"{k.removesuffix('_compiles')} {', '.join(v)}"
                for r in res["rows"] for k, v in r.items() if k.endswith("_compiles") and v]
    lines += ["", "Triton compiles inside timed spans (after the warm-up): "
              + ("; ".join(compiled) if compiled else "none")]
    if res["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items())]
    return "\n".join(lines) + "\n"


def main(opts: E2EOptions) -> tuple[Path, Path]:
    res = run_e2e(opts)
    paths = write_results(res, opts.out_dir)
    print(json.dumps({k: res.get(k) for k in ("e2e_offload_link_fraction",
                                              "e2e_offload_speedup_vs_accelerate",
                                              "e2e_ttft512_over_bound",
                                              "engine_sparse_speedup_vs_dense_opt13b")},
                     indent=1))
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="opt-13b")
    parser.add_argument("--gpu-memory-gib", type=float, default=14.0)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--peers", default="launch,accelerate,flexgen,resident")
    parser.add_argument("--time-budget-s", type=float, default=460.0)
    parser.add_argument("--small", action="store_true", help="the CPU dry run (tiny shapes)")
    parser.add_argument("--flexgen-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flexgen_child:  # the flexgen row's child process
        _flexgen_child(args.flexgen_child)
        return 0
    if args.small:
        opts = E2EOptions.dry_run(Path(args.out))
    else:
        opts = E2EOptions(shape=args.shape, gpu_memory_gib=args.gpu_memory_gib,
                          checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir
                          else None, out_dir=Path(args.out), tokens=args.tokens,
                          time_budget_s=args.time_budget_s)
    opts.peers = tuple(p for p in args.peers.split(",") if p)
    main(opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
