"""Pipeline benchmark: tokens/s for 1 and 8 concurrent streams through 1, 2 and 4 workers,
with per-stage compute and per-hop transfer times, on whatever devices the machine has;
optionally with a GPU budget per worker that offloads layers to pinned host memory.

    python -m dejavu.bench.bench_pipeline --shape opt-1.3b --workers 1,2,4 --out bench/results
    python -m dejavu.bench.bench_pipeline --shape opt-30b --workers 4 --gpu-memory-gib 10 \\
        --dtype float16 --select random:0.1,dense --checkpoint-dir /dev/shm/opt-30b

A random-weight checkpoint of the named OPT shape is written layer by layer (one
safetensors shard per layer plus one for the embeddings, and the index; never the whole
model in memory), to ``--checkpoint-dir`` (kept, and reused when it already holds that
shape) or to a temporary directory; or ``--model DIR`` is used. Each worker then reads
only its own span. Each configuration starts a real ``launch`` (scheduler and worker
processes over ZeroMQ) with one KV-cache slot per stream, warms up, then times greedy
decoding of ``--tokens`` new tokens per stream. ``--select random:M`` runs sparse with
uniformly random neurons at density M and every head (``random:M:H``: heads at density H
too; [sparsity] selector = "random", a baseline: random weights have no predictors), so
offloaded layers page only those rows;
a comma-separated list (``random:0.1,dense``) runs each over the same checkpoint.

Results: one JSON and one Markdown file named after the date and the device, with the
command, rewritten after every row (a run stopped by a time limit keeps what it measured).
Each row has tokens/s, stage and hop ms, and with a budget the offloaded layers per worker,
their host bytes, the GPU memory and host bytes per token each worker expected, the CUDA
memory it held once loaded, and the bytes actually read per generated token: with the
prompt's prefill (an offloaded layer prefills token by token) and, when --tokens exceeds
the warm-up's 4, for decode steps alone (per stream). A configuration that cannot start (a
budget too small for its cache, say) is a row with its error.

What this measures: the pipeline as a user runs it, including the scheduler loop, the
sockets and the device->host->device copies at each hop. It does not tune anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..runtime.checkpoint import INDEX_NAME, expected_shapes
from ..runtime.opt_config import OPTConfig
from ..runtime.sampling import SamplingParams
from ..runtime.settings import make_settings
from ..scheduler.config import PipelineConfig
from ..scheduler.launch import Cluster, LaunchError
from ..scheduler.zmq_client import PipelineConnection

# Hugging Face facebook/opt-* config.json values (hidden, layers, ffn, heads); the others
# keep OPTConfig's defaults (vocab 50272, 2048 positions).
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=8, ffn_dim=256, num_attention_heads=4,
                 vocab_size=1024, max_position_embeddings=512),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                     num_attention_heads=12),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                     num_attention_heads=32),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384,
                     num_attention_heads=32),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, ffn_dim=20480,
                    num_attention_heads=40),
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, ffn_dim=28672,
                    num_attention_heads=56),
    "opt-66b": dict(hidden_size=9216, num_hidden_layers=64, ffn_dim=36864,
                    num_attention_heads=72),
}
WARMUP = 4  # tokens per stream of the untimed first run (Triton compiles, caches fill)
MARKER = "bench_random.json"  # written last: a checkpoint directory that has it is complete
# Launch log lines kept in a row: the printed plan and each worker's expectations.
PLAN_LINES = ("plan: ", "  worker ", "layer(s) resident", "ready: layers")


def shape_config(shape: str) -> OPTConfig:
    kw = SHAPES[shape]
    return OPTConfig(word_embed_proj_dim=kw["hidden_size"], **kw)


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str,
                   generator: torch.Generator) -> torch.Tensor:
    """OPTModel.init_weights' values: zero biases, unit norms, normal(0, 0.02) for matrices,
    drawn directly in ``dtype`` on ``device`` and returned on the CPU."""
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # a layer norm's weight
        return torch.ones(shape, dtype=dtype)
    t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
    return t.cpu()


def write_random_checkpoint(config: OPTConfig, out: Path, dtype: torch.dtype, *,
                            seed: int = 0, device: str | None = None,
                            log=lambda msg: None) -> Path:
    """A random-weight checkpoint of ``config`` in ``out``: config.json, one shard with the
    embeddings and final norm, one shard per decoder layer, and the index
    (runtime/checkpoint.py's layout), written one shard at a time so that memory holds one
    layer at most. Tensors are drawn on ``device`` (default: the GPU when there is one)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    groups: dict[int, list[tuple[str, tuple[int, ...]]]] = {}  # -1: not in a layer
    for name, shape in expected_shapes(config).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the head
        layer = re.match(r"decoder\.layers\.(\d+)\.", name)
        groups.setdefault(int(layer[1]) if layer else -1, []).append((name, shape))
    order = sorted(groups)
    generator = torch.Generator(device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    started = time.perf_counter()
    for i, group in enumerate(order, 1):
        file = f"model-{i:05d}-of-{len(order):05d}.safetensors"
        tensors = {}
        for name, shape in groups[group]:
            key = name if name.startswith("lm_head.") else f"model.{name}"
            tensors[key] = _random_tensor(name, shape, dtype, device, generator)
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        log(f"wrote {file} ({total / 2**30:.2f} GiB, {time.perf_counter() - started:.1f} s)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf["tie_word_embeddings"] = config.tie_word_embeddings
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    (out / MARKER).write_text(json.dumps({"config": hf, "seed": seed}) + "\n")
    return out


def random_checkpoint(shape: str, out: Path, dtype: torch.dtype, log=print) -> tuple[Path, float]:
    """``out`` holding a random ``shape`` checkpoint in ``dtype`` (reused when complete and
    the same); returns it and the seconds spent writing (0 when reused)."""
    config = shape_config(shape)
    marker = out / MARKER
    if marker.is_file():
        stored = json.loads(marker.read_text())["config"]
        want = config.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch."),
                                      "tie_word_embeddings": config.tie_word_embeddings}
        if stored == json.loads(json.dumps(want)):
            log(f"reusing the random {shape} checkpoint in {out}")
            return out, 0.0
    started = time.perf_counter()
    write_random_checkpoint(config, out, dtype, log=log)
    return out, time.perf_counter() - started


def parse_select(text: str) -> dict:
    """"dense" | "random:M" | "random:M:H" -> [sparsity] settings: random neurons at density
    M and every head, or heads at density H too. (Every head is the shipped model's
    default, and the steps a CUDA graph can capture: runtime/graphs.py.)"""
    if text == "dense":
        return {"sparsity.enabled": False}
    kind, *values = text.split(":")
    try:
        densities = [float(v) for v in values]
    except ValueError:
        densities = []
    if kind != "random" or len(densities) not in (1, 2) or not all(
            0.0 < d <= 1.0 for d in densities):
        raise SystemExit(f"--select {text!r}: expected dense, random:M or random:M:H with "
                         "densities in (0, 1]")
    return {"sparsity.enabled": True, "sparsity.selector": "random",
            "sparsity.mlp_density": densities[0],
            "sparsity.head_density": densities[1] if len(densities) == 2 else 1.0}


class GpuUtilization:
    """Samples each GPU's utilisation (the fraction of time a kernel ran, nvidia-smi) every
    100 ms while open; ``mean()`` is the average per GPU index. Without nvidia-smi it
    measures nothing (an empty dict)."""

    def __enter__(self) -> GpuUtilization:
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        self.samples: dict[int, list[float]] = {}
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        for line in out.splitlines():
            index, _, value = line.partition(",")
            try:
                self.samples.setdefault(int(index), []).append(float(value))
            except ValueError:
                continue

    def mean(self) -> dict[int, float]:
        return {i: round(sum(v) / len(v), 1) for i, v in sorted(self.samples.items()) if v}


def run_one(model: Path, workers: int, streams: int, tokens: int, dtype: str,
            prompt_len: int, *, gpu_memory_gib: float | None = None, select: str = "dense",
            log_dir: Path | None = None, devices: list[str] | None = None,
            data_plane: str = "auto", lookahead: bool = False,
            share_gpu: bool = False, micro_batches: int = 0) -> dict:
    row: dict = {"workers": workers, "streams": streams, "select": select,
                 "gpu_memory_gib": gpu_memory_gib, "lookahead": lookahead}
    # One cache slot per stream: with a GPU budget, unused slots would crowd out layers.
    # Kernels interpreted on a CPU (TRITON_INTERPRET=1) make an offloaded prefill take
    # minutes; the default 60 s step watchdog would stop the cluster mid-run.
    watchdog = {"watchdog_s": 3600.0} if os.environ.get("TRITON_INTERPRET") == "1" else {}
    settings = make_settings({"model.path": str(model), "model.dtype": dtype,
                              "pipeline.gpu_memory_gib": gpu_memory_gib,
                              "pipeline.data_plane": data_plane,
                              "sparsity.lookahead": lookahead, **parse_select(select)})
    # --share-gpu: every worker on the first GPU (the pipeline's hops and prefetch measured
    # on a machine with one GPU).
    if share_gpu and devices is None:
        devices = ["cuda:0"] * workers
    config = PipelineConfig(settings, workers=workers, slots=streams, devices=devices,
                            max_len=prompt_len + max(tokens, WARMUP),
                            micro_batches=micro_batches, **watchdog)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    prompts = [[2] + [(17 * i + 5 * j) % 1000 + 3 for j in range(prompt_len - 1)]
               for i in range(streams)]
    log = (log_dir / f"launch-w{workers}-s{streams}.log") if log_dir else None
    try:
        with Cluster(config).start(timeout_s=900, log=log) as cluster, \
                PipelineConnection(cluster.address) as conn:
            start = sum(conn.health().paged_bytes)
            warm = conn.run(prompts, SamplingParams(max_new_tokens=WARMUP, ignore_eos=True))
            failed = [c.error for c in warm if c.error]
            if failed:  # a cluster that failed its warm-up would time nothing real
                return row | {"error": f"warm-up failed: {failed[0]}"}
            before = sum(conn.health().paged_bytes)
            with GpuUtilization() as util:
                started = time.perf_counter()
                out = conn.run(prompts, params)
                seconds = time.perf_counter() - started
            health = conn.health()
    except (LaunchError, TimeoutError) as exc:
        return row | {"error": str(exc)}
    generated = sum(len(c.tokens) for c in out)
    errors = [c.error for c in out if c.error]
    paged = sum(health.paged_bytes) - before
    # The warm-up read the prefill plus WARMUP - 1 decode steps, the timed run the same
    # prefill plus tokens - 1 steps: the difference is decode alone.
    warmup = before - start
    decode = (paged - warmup) / (tokens - WARMUP) / streams if tokens > WARMUP else None
    row.update({
        "tokens": generated, "seconds": round(seconds, 4),
        "tokens_per_s": round(generated / seconds, 2) if seconds else 0.0,
        "devices": [w.device for w in health.workers],
        "micro_batches": health.micro_batches,
        "layers": [list(w.layers) for w in health.workers],
        "offloaded_layers": [w.offloaded_layers for w in health.workers],
        "host_gib": [round(w.host_bytes / 2**30, 3) for w in health.workers],
        "expected_gpu_gib": [round(w.expected_gpu_bytes / 2**30, 3) for w in health.workers],
        "gpu_gib_loaded": [round(w.gpu_bytes / 2**30, 3) for w in health.workers],
        "expected_paged_mib_per_token": [round(w.expected_paged_per_token / 2**20, 3)
                                         for w in health.workers],
        "paged_mib_per_token": round(paged / max(generated, 1) / 2**20, 3),
        "decode_paged_mib_per_token": None if decode is None else round(decode / 2**20, 3),
        "densities": [list(d) for d in health.densities],
        "stage_ms": [round(s * 1000, 3) for s in health.stage_s],
        "hop_ms": [round(s * 1000, 3) for s in health.hop_s],
        "queue_ms": [round(s * 1000, 3) for s in health.queue_s],
        "round_trip_ms": round(health.round_trip_s * 1000, 3),
        "in_flight_peak": health.in_flight_peak,
        "busy_fraction": [round(w.stats.busy_fraction, 3) if w.stats else None
                          for w in health.workers],
        "ahead_used_wasted": [(w.stats.ahead_used, w.stats.ahead_wasted) if w.stats else None
                              for w in health.workers],
        "prefetch_used_wasted": [(w.stats.prefetch_used, w.stats.prefetch_wasted)
                                 if w.stats else None for w in health.workers],
        # nvidia-smi's GPU index (PCI bus order) for each GPU, during the timed run.
        "gpu_util_pct": util.mean(),
    })
    if errors:
        row["errors"] = errors[:3]
    if log is not None and log.exists():  # the printed plan and each worker's expectations
        row["plan"] = [line.split(" INFO ", 1)[1] for line in log.read_text().splitlines()
                       if " INFO " in line and any(k in line for k in PLAN_LINES)]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="opt-1.3b", choices=sorted(SHAPES))
    parser.add_argument("--model", default=None, help="an existing checkpoint directory")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="write (or reuse) the random checkpoint here and keep it")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="GPU budget per worker; layers beyond it are offloaded")
    parser.add_argument("--select", default="dense",
                        help="comma-separated: dense | random:M (neurons at density M, every "
                             "head) | random:M:H (heads at density H too), each a set of rows")
    parser.add_argument("--lookahead", default="off",
                        help="comma-separated on | off: [sparsity] lookahead (an offloaded "
                             "layer's rows read one layer early, and selections sent ahead "
                             "to the next worker), each a set of rows")
    parser.add_argument("--share-gpu", action="store_true",
                        help="every worker on cuda:0 (several workers on one GPU)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    lookaheads = [_on_off(v) for v in args.lookahead.split(",")]
    selects = args.select.split(",")
    for select in selects:  # a bad value fails before any checkpoint is written
        parse_select(select)
    gpus = torch.cuda.device_count()
    workers = [int(w) for w in args.workers.split(",")]
    if not args.share_gpu:
        workers = [w for w in workers if w <= max(gpus, 1) or gpus == 0]
    device = torch.cuda.get_device_name(0).replace(" ", "-") if gpus else platform.machine()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-offload" if args.gpu_memory_gib is not None else ""
    base = out / f"{stamp}-{device}-pipeline-{args.shape}{suffix}"
    meta = {"date": stamp, "device": device, "gpus": gpus, "shape": args.shape,
            "model": args.model, "dtype": args.dtype, "tokens": args.tokens,
            "prompt_len": args.prompt_len, "gpu_memory_gib": args.gpu_memory_gib,
            "select": args.select, "lookahead": args.lookahead,
            "share_gpu": args.share_gpu, "checkpoint_write_s": None, "torch": torch.__version__,
            "command": "python -m dejavu.bench.bench_pipeline " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        if args.model:
            model = Path(args.model)
        else:
            where = Path(args.checkpoint_dir) if args.checkpoint_dir else tmp / args.shape
            model, write_s = random_checkpoint(args.shape, where, getattr(torch, args.dtype),
                                               log=lambda m: print(m, file=sys.stderr))
            meta["checkpoint_write_s"] = round(write_s, 1)
        for select, w, s, ahead in itertools.product(
                selects, workers, [int(x) for x in args.streams.split(",")], lookaheads):
            row = run_one(model, w, s, args.tokens, args.dtype, args.prompt_len,
                          gpu_memory_gib=args.gpu_memory_gib, select=select, log_dir=tmp,
                          lookahead=ahead, share_gpu=args.share_gpu)
            print(json.dumps(row), flush=True)
            rows.append(row)
            # After every row: a run cut short by a time limit keeps what it measured.
            write_results(base, meta, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_results(base, meta, rows)
    print(f"wrote {base}.json and {base}.md")
    return 0


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise SystemExit(f"--lookahead {value!r}: expected on, off or on,off")
    return value == "on"


def write_results(base: Path, meta: dict, rows: list[dict]) -> None:
    # Not with_suffix: a shape's dot ("opt-1.3b") would be taken for the suffix.
    Path(f"{base}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    Path(f"{base}.md").write_text(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    budget = (f", GPU budget {meta['gpu_memory_gib']} GiB per worker"
              if meta["gpu_memory_gib"] is not None else "")
    lines = [f"# Pipeline benchmark {meta['date']} on {meta['device']} ({meta['gpus']} GPU(s)), "
             f"{meta['shape']} {meta['dtype']}{budget}; random checkpoint written in "
             f"{meta['checkpoint_write_s']} s", "",
             f"`{meta['command']}`", "",
             "| select | workers | streams | tokens/s | offloaded layers | paged MiB/token: "
             "with prefill, decode only (expected per worker, batch 1) | stage ms | hop ms | "
             "input wait ms | GPU util % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['select']} | {r['workers']} | {r['streams']} | error: "
                         f"{r['error'][:160]} | | | | | | |")
            continue
        expected = ", ".join(map(str, r["expected_paged_mib_per_token"]))
        decode = r["decode_paged_mib_per_token"]
        lines.append(
            f"| {r['select']} | {r['workers']} | {r['streams']} | {r['tokens_per_s']} | "
            f"{', '.join(map(str, r['offloaded_layers']))} | {r['paged_mib_per_token']}, "
            f"{'-' if decode is None else decode} "
            f"({expected}) | {', '.join(map(str, r['stage_ms']))} | "
            f"{', '.join(map(str, r['hop_ms'])) or '-'} | "
            f"{', '.join(map(str, r.get('queue_ms', []))) or '-'} | "
            f"{', '.join(map(str, r.get('gpu_util_pct', {}).values())) or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
