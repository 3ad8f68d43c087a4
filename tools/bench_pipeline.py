"""Pipeline benchmark: tokens/s for 1 and 8 concurrent streams through 1, 2 and 4 workers,
with per-stage compute and per-hop transfer times, on whatever devices the machine has.

    python -m dejavu.tools.bench_pipeline --shape opt-1.3b --workers 1,2,4 --out bench/results

A random-weight checkpoint of the named OPT shape is written to a temporary directory
(or ``--model DIR`` is used). Each configuration starts a real ``launch`` (scheduler and
worker processes over ZeroMQ), warms up, then times greedy decoding of ``--tokens`` new
tokens per stream. Results: one JSON and one Markdown file named after the date and the
device, next to the command that produced them.

What this measures: the pipeline as a user runs it, including the scheduler loop, the
sockets and the device->host->device copies at each hop. It does not tune anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from dejavu.runtime.checkpoint import save_model
from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.sampling import SamplingParams
from dejavu.scheduler.config import PipelineConfig
from dejavu.scheduler.launch import Cluster
from dejavu.scheduler.zmq_client import PipelineConnection

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=8, ffn_dim=256, num_attention_heads=4,
                 vocab_size=1024, max_position_embeddings=512),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                     num_attention_heads=12),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                     num_attention_heads=32),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384,
                     num_attention_heads=32),
}


def random_checkpoint(shape: str, out: Path, dtype: torch.dtype) -> Path:
    kw = SHAPES[shape]
    config = OPTConfig(word_embed_proj_dim=kw["hidden_size"], **kw)
    model = OPTModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    return save_model(model, out, dtype=dtype)


def run_one(model: Path, workers: int, streams: int, tokens: int, dtype: str,
            prompt_len: int) -> dict:
    config = PipelineConfig(model=str(model), workers=workers, dtype=dtype, slots=8,
                            max_len=prompt_len + tokens + 8, sparse=False)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    prompts = [[2] + [(17 * i + 5 * j) % 1000 + 3 for j in range(prompt_len - 1)]
               for i in range(streams)]
    with Cluster(config).start(timeout_s=900) as cluster, \
            PipelineConnection(cluster.address) as conn:
        conn.run(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
        started = time.perf_counter()
        out = conn.run(prompts, params)
        seconds = time.perf_counter() - started
        health = conn.health()
    generated = sum(len(c.tokens) for c in out)
    return {"workers": workers, "streams": streams, "tokens": generated,
            "seconds": round(seconds, 4), "tokens_per_s": round(generated / seconds, 2),
            "devices": [w.device for w in health.workers],
            "layers": [list(w.layers) for w in health.workers],
            "stage_ms": [round(s * 1000, 3) for s in health.stage_s],
            "hop_ms": [round(s * 1000, 3) for s in health.hop_s]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="opt-1.3b", choices=sorted(SHAPES))
    parser.add_argument("--model", default=None, help="an existing checkpoint directory")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count()
    workers = [int(w) for w in args.workers.split(",")]
    workers = [w for w in workers if w <= max(gpus, 1) or gpus == 0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        model = Path(args.model) if args.model else random_checkpoint(
            args.shape, tmp / args.shape, getattr(torch, args.dtype))
        rows = []
        for w in workers:
            for s in (int(x) for x in args.streams.split(",")):
                row = run_one(model, w, s, args.tokens, args.dtype, args.prompt_len)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    device = torch.cuda.get_device_name(0).replace(" ", "-") if gpus else platform.machine()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": stamp, "device": device, "gpus": gpus, "shape": args.shape,
            "model": args.model, "dtype": args.dtype, "tokens": args.tokens,
            "prompt_len": args.prompt_len, "torch": torch.__version__}
    base = out / f"{stamp}-{device}-pipeline"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Pipeline benchmark {stamp} on {device} ({gpus} GPU(s)), {args.shape} "
             f"{args.dtype}", "",
             "| workers | streams | tokens/s | stage ms | hop ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['streams']} | {r['tokens_per_s']} | "
              f"{', '.join(map(str, r['stage_ms']))} | {', '.join(map(str, r['hop_ms'])) or '-'} |"
              for r in rows]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
