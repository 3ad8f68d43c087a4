"""train-predictors on a model larger than the GPU budget: wall time, peak memory, per-layer
split (waiting for the weights, forward, moving the tables, MLP and head predictor fits,
MLP calibration with report scoring, frequencies, saving; and on the reader's thread,
overlapped, reading and layer_hash + the MLP predictor's start), against the time to read
the checkpoint once plus the forward passes at the GPU's measured matmul speed.

    python -m dejavu.bench.bench_train_predictors --shape opt-13b --gpu-memory-gib 12 \\
        --tokens 100000 --checkpoint-dir /dev/shm/opt-13b --out bench/results

Steps: write (or reuse) a random float16 checkpoint of the shape (bench_pipeline's writer,
one shard per layer) with the shipped model's tokenizer beside it; time reading every
tensor once onto the GPU; measure float16 matmul TFLOP/s at a forward batch's shape; run
``dejavu-run train-predictors`` in its own process (so its peak RSS is its own) with the
budget; then ``dejavu-run generate --gpu-memory-gib`` loads the predictors it wrote. The
calibration text is ``--data`` or, without it, text decoded from random token ids (random
weights have no real sparsity: this measures the workflow and its cost, not quality).

Results: DATE-GPU-train-predictors-SHAPE.json and .md in --out. Without a GPU it is a dry
run of the same steps in float32 with no budget, for checking the bench (``--shape opt-125m
--tokens 4096 --window 128 --epochs 1``: the synthetic text's ids need the real vocabulary).

What this does not measure: predictor quality (bench/sparsity_sweep.py does, on the
shipped model).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import safe_open

from ..runtime.checkpoint import inspect_checkpoint
from ..tools.train_layerwise import ALL_PHASES, READER_PHASES
from .bench_pipeline import SHAPES, random_checkpoint, shape_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "opt-gutenberg-31m"
CLI = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]


def run_streamed(command: list[str], timeout_s: float | None) -> int:
    """Run a child with its output passed through line by line (a device call that is cut
    keeps every per-layer line printed so far); past ``timeout_s`` it is killed and the
    return code is -9."""
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
    timer = threading.Timer(timeout_s, child.kill) if timeout_s else None
    if timer:
        timer.start()
    try:
        for line in child.stdout:
            print(line, end="", flush=True)
        return child.wait()
    finally:
        if timer:
            timer.cancel()


def read_once(model_dir: Path, device: str) -> float:
    """Seconds to read every tensor of the checkpoint onto the device, one at a time."""
    layout = inspect_checkpoint(model_dir)
    started = time.perf_counter()
    handles = {}
    for entry in layout.tensors.values():
        if entry.file not in handles:
            handles[entry.file] = safe_open(str(entry.file), framework="pt")
        t = handles[entry.file].get_tensor(entry.key).to(device)
        del t
    _sync(device)
    return time.perf_counter() - started


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(m: int, k: int, n: int, device: str, dtype: torch.dtype) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, started = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * m * k * n * reps / (time.perf_counter() - started) / 1e12


def forward_flops(shape: str, tokens: int, window: int) -> float:
    """Matmul FLOPs of running every layer over ``tokens`` (causal attention: each query
    sees on average window/2 keys, QK and AV)."""
    c = shape_config(shape)
    per_token = 2 * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.ffn_dim) \
        + 2 * 2 * (window / 2) * c.hidden_size
    return per_token * tokens * c.num_hidden_layers


def synthetic_text(path: Path, docs: int = 64, ids: int = 6000) -> Path:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))
    g = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for _ in range(docs):
            row = torch.randint(4, tok.get_vocab_size(), (ids,), generator=g).tolist()
            f.write(json.dumps({"text": tok.decode(row)}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="opt-13b", choices=sorted(SHAPES))
    p.add_argument("--checkpoint-dir", default="/dev/shm/opt-13b")
    p.add_argument("--gpu-memory-gib", type=float, default=12.0)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256, help="tokens per fitting step")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--window", type=int, default=None,
                   help="tokens per calibration window (default: the model's positions)")
    p.add_argument("--data", default=None, help="calibration text (default: synthetic)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--fit", nargs="+", default=["default"], choices=sorted(FIT_FLAGS),
                   help="how train-predictors fits: its default, --fit-behind or "
                        "--fit-in-line; several run one after another on the same "
                        "checkpoint and machine, each with its own results file")
    p.add_argument("--train-timeout-s", type=float, default=None,
                   help="stop train-predictors after this long (it resumes from its finished "
                        "layers when rerun) and still write the results, marked as cut")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    budget = ["--gpu-memory-gib", str(args.gpu_memory_gib)] if device == "cuda" else []
    model_dir = Path(args.checkpoint_dir)
    started = time.perf_counter()
    _, write_s = random_checkpoint(args.shape, model_dir, dtype)
    (model_dir / "tokenizer.json").write_bytes((SHIPPED / "tokenizer.json").read_bytes())
    data = Path(args.data) if args.data else synthetic_text(model_dir / "calibration.jsonl")
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    read_s = read_once(model_dir, device)
    c = shape_config(args.shape)
    window = args.window or c.max_position_embeddings
    tflops = matmul_tflops(8 * window, c.hidden_size, c.ffn_dim, device, dtype)
    forward_s = forward_flops(args.shape, args.tokens, window) / (tflops * 1e12)

    out = model_dir / "predictors"
    setup = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
             "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
             "shape": args.shape, "model_gib": model_bytes / 2**30,
             "gpu_memory_gib": args.gpu_memory_gib if device == "cuda" else None,
             "tokens": args.tokens, "epochs": args.epochs, "checkpoint_write_s": write_s,
             "read_once_s": read_s, "matmul_tflops": tflops, "forward_bound_s": forward_s}
    failed, gen = False, None
    for mode in args.fit:
        cmd = ["train-predictors", "--model", str(model_dir), "--data", str(data), "--out",
               str(out), "--tokens", str(args.tokens), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--device",
               device, "--dtype", dtype_name, "--select", "threshold", "--window",
               str(window), *budget, *FIT_FLAGS[mode]]
        t0 = time.perf_counter()
        train_rc = run_streamed(CLI + cmd, args.train_timeout_s)
        wall_s = time.perf_counter() - t0
        report = json.loads((out / "report.json").read_text()) if train_rc == 0 else {}
        if gen is None:  # the first run's predictors load into generate with the budget
            gen = subprocess.run(CLI + ["generate", "--model", str(model_dir), "--device",
                                        device, "--dtype", dtype_name, *budget,
                                        "--prompt-ids", "2,100,200,300", "--max-new-tokens",
                                        "8", "--json"],
                                 cwd=ROOT, capture_output=True, text=True)
        lw = report.get("layerwise", {})
        result = {
            **setup, "fit": mode, "fit_behind": lw.get("fit_behind"),
            "forward_chunk": lw.get("chunk"),
            "train_wall_s": wall_s, "train_returncode": train_rc,
            "ratio_to_read_plus_forward": wall_s / (read_s + forward_s),
            **{k: lw.get(k) for k in ALL_PHASES + ("fit_s", "layer_s")},
            "read_ahead": lw.get("read_ahead"),
            # seconds from train_layerwise's start to its report, and its parts outside
            # the layers (the rest of train_wall_s: the interpreter, imports, outputs)
            "report_wall_s": lw.get("wall_s"), "setup_s": lw.get("setup_s"),
            "reader_s": {k: sum(r.get(k) or 0.0 for r in report.get("layers", []))
                         for k in READER_PHASES},
            "peak_host_rss_gib": lw.get("peak_host_rss_gib"),
            "peak_gpu_gib": lw.get("peak_device_gib"),
            "per_layer": [{k: r.get(k) for k in ("layer", *ALL_PHASES, *READER_PHASES, "layer_s")}
                          for r in report.get("layers", [])],
            "generate_returncode": gen.returncode,
            "generate": ((gen.stdout.strip().splitlines() or [""])[-1][:500]
                         or gen.stderr[-500:]),
            "command": "dejavu-run " + " ".join(cmd),
            "total_s": time.perf_counter() - started,
        }
        suffix = f"-fit-{mode}" if args.fit != ["default"] else ""
        base = Path(args.out) / (f"{result['date'][:10]}-"
                                 f"{result['gpu'].lower().replace(' ', '-')}-train-predictors-"
                                 f"{args.shape}{suffix}")
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        base.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        failed |= train_rc != 0 or gen.returncode != 0
    return 1 if failed else 0


# The train-predictors options of each --fit choice.
FIT_FLAGS = {"default": [], "behind": ["--fit-behind"], "in-line": ["--fit-in-line"]}
# Column names of the per-layer phases (train_layerwise.ALL_PHASES: fitted in line they add
# up to the layer's wall time; fitted behind, those up to the copy do) and of the two on the
# reader's thread (READER_PHASES), overlapped with the layer before.
HEADS = {"read_s": "wait for weights", "forward_s": "forward", "fit_wait_s": "wait for fit",
         "copy_s": "copy tables", "tables_s": "tables",
         "mlp_fit_s": "MLP fit", "head_fit_s": "head fit", "calibrate_s": "calibrate + report",
         "frequencies_s": "frequencies", "save_s": "save", "load_s": "load (reader)",
         "init_s": "hash + init (reader)", "layer_s": "layer"}


def markdown(r: dict) -> str:
    def f(x, fmt=".1f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    cols = (*ALL_PHASES, *READER_PHASES, "layer_s")
    totals = {**{k: r.get(k) for k in (*ALL_PHASES, "layer_s")}, **(r.get("reader_s") or {})}

    lines = [
        f"# train-predictors, {r['shape']} random ({r['model_gib']:.1f} GiB) with a "
        f"{r['gpu_memory_gib']} GiB GPU budget, {r['tokens']} tokens, {r['gpu']}, {r['date']}",
        "", f"`{r['command']}`", "",
        "| wall s | read once s | forward at measured TFLOP/s s | ratio | layers s | fit s "
        "| peak GPU GiB | peak host RSS GiB |", "|---|---|---|---|---|---|---|---|",
        f"| {f(r['train_wall_s'])} | {f(r['read_once_s'])} | {f(r['forward_bound_s'])} "
        f"({f(r['matmul_tflops'], '.0f')} TFLOP/s) | {f(r['ratio_to_read_plus_forward'], '.2f')}"
        f" | {f(r.get('layer_s'))} | {f(r.get('fit_s'))} | "
        f"{f(r['peak_gpu_gib'], '.2f')} | {f(r['peak_host_rss_gib'], '.2f')} |", "",
        f"Checkpoint written in {f(r['checkpoint_write_s'])} s; generate with the predictors "
        f"and the budget: exit {r['generate_returncode']}. Next layer read ahead: "
        f"{r.get('read_ahead')}.", "",
        f"Fit: {r.get('fit', 'default')} (behind the next layer: {r.get('fit_behind')}, "
        f"{r.get('forward_chunk')} windows per forward batch).", "",
        f"The trainer's own wall time, from its start to its report: "
        f"{f(r.get('report_wall_s'))} s; outside the layers in it: "
        + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {f(v)} s"
                    for k, v in (r.get("setup_s") or {}).items())
        + ". The rest of the wall time is the interpreter, imports and the outputs.", "",
        "Seconds per phase, summed over the layers and per layer. Fitted in line, the phases "
        "up to save add up to the layer's wall time; fitted behind, those up to copy tables "
        "do, and the fit's (tables to save) ran on the fit's thread beside the next layer's. "
        "Load and hash + init ran on the reader's thread, overlapped with the layer before "
        "(wait for weights is what they did not hide).", "",
        "| layer | " + " | ".join(f"{HEADS[k]} s" for k in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| all | " + " | ".join(f(totals.get(k)) for k in cols) + " |",
    ]
    lines += ["| " + " | ".join([str(x["layer"])] + [f(x.get(k), ".2f") for k in cols]) + " |"
              for x in r["per_layer"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
