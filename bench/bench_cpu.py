"""The CPU default path against transformers: batch-1 greedy decoding of the same model,
same prompt, same number of new tokens, every contender in one run on one machine.

Contenders (``ROWS``): the in-process engine as ``dejavu-run generate`` builds it, dense
and sparse (the [sparsity] settings of dejavu.toml: the default), with the threads a CPU
stage picks (runtime/cpu_ops.stage_threads); transformers' ``OPTForCausalLM.generate``
(greedy, from the same safetensors) with those same threads and with torch's own default;
and the sparse engine with torch's default threads, to show what the thread choice is
worth. Repetitions are interleaved (a fresh random order per round) so that other users'
load on the machine falls on every row alike; each row reports the best and the median
round, end to end (prefill included) and per decode step (first token excluded).

Writes ``<out>/<date>-cpu-<N>core.json`` and ``.md`` with the machine, its load average
before and after, versions and the command. Run: ``python -m dejavu.bench.bench_cpu``.

What this module does not know: GPUs (bench/bench.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..runtime.checkpoint import load_model, resolve_model_dir
from ..runtime.cpu_ops import stage_threads
from ..runtime.engine import Engine
from ..runtime.sampling import SamplingParams
from ..runtime.selection import selector_from_settings
from ..runtime.settings import load_settings
from ..runtime.tokenizer import load_tokenizer

PROMPT = "It was a dark and stormy night"
ROWS = ("dejavu dense", "dejavu sparse", "transformers", "transformers (torch threads)",
        "dejavu sparse (torch threads)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import transformers

    return {"date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_default_threads": torch.get_num_threads(),
            "stage_threads": stage_threads()}


class Timed:
    """Wall-clock times of each new token of one generation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def token(self) -> None:
        self.stamps.append(time.perf_counter())

    def result(self, n: int) -> dict[str, float]:
        if len(self.stamps) != n:
            raise RuntimeError(f"expected {n} tokens, timed {len(self.stamps)}")
        total = self.stamps[-1] - self.start
        decode = self.stamps[-1] - self.stamps[0]
        return {"tokens_per_s": n / total, "first_token_ms": (self.stamps[0] - self.start) * 1e3,
                "decode_ms_per_token": decode / (n - 1) * 1e3 if n > 1 else float("nan")}


def engine_runner(engine: Engine, ids: list[int], n: int) -> Callable[[], tuple[dict, list]]:
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)

    def run() -> tuple[dict, list]:
        timed, tokens = Timed(), []
        for event in engine.stream(ids, params):
            if event.token is not None:
                tokens.append(event.token)
                timed.token()
        return timed.result(n), tokens

    return run


def hf_runner(model_dir: Path, ids: list[int], n: int) -> Callable[[], tuple[dict, list]]:
    from transformers import OPTForCausalLM
    from transformers.generation.streamers import BaseStreamer

    hf = OPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    class Stamps(BaseStreamer):
        def __init__(self, timed: Timed) -> None:
            self.timed, self.prompt_seen = timed, False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() hands the prompt over first
                self.prompt_seen = True
                return
            self.timed.token()

        def end(self) -> None:
            pass

    def run() -> tuple[dict, list]:
        timed = Timed()
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, streamer=Stamps(timed))
        return timed.result(n), out[0, len(ids):].tolist()

    return run


def with_threads(run: Callable[[], tuple[dict, list]], threads: int) -> Callable:
    def go() -> tuple[dict, list]:
        torch.set_num_threads(threads)
        return run()

    return go


def summary(rounds: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": rounds}
    for key, best in (("tokens_per_s", max), ("decode_ms_per_token", min)):
        values = [r[key] for r in rounds]
        out[key] = {"best": best(values), "median": statistics.median(values)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="dejavu.toml (default: the usual search)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of ROWS")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        ap.error(f"--rows: unknown {sorted(unknown)}; known: {', '.join(ROWS)}")

    default_threads = torch.get_num_threads()
    settings = load_settings(args.config)
    model_dir = resolve_model_dir(settings.model_path())
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(args.prompt)
    n = args.new_tokens
    model = load_model(model_dir, dtype="float32", device="cpu")
    engines = {}
    for name, sparse in (("dense", False), ("sparse", None)):  # None: as the settings say
        selector = selector_from_settings(settings.sparsity, model, model_dir, sparse=sparse)
        engines[name] = Engine(model, tokenizer, max_batch=1, max_len=len(ids) + n,
                               selector=selector)
    threads = torch.get_num_threads()  # what the stages chose
    hf = hf_runner(model_dir, ids, n)
    runners = {
        "dejavu dense": with_threads(engine_runner(engines["dense"], ids, n), threads),
        "dejavu sparse": with_threads(engine_runner(engines["sparse"], ids, n), threads),
        "transformers": with_threads(hf, threads),
        "transformers (torch threads)": with_threads(hf, default_threads),
        "dejavu sparse (torch threads)": with_threads(engine_runner(engines["sparse"], ids, n),
                                                     default_threads),
    }
    env = machine()
    env.update(torch_default_threads=default_threads, stage_threads=threads,
               load_before=os.getloadavg())
    for name in rows:  # warm-up: first calls allocate and page in the weights
        runners[name]()
    results: dict[str, list[dict]] = {name: [] for name in rows}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name in random.sample(rows, len(rows)):
            stats, tokens[name] = runners[name]()
            stats["load_1min"] = os.getloadavg()[0]
            results[name].append(stats)
    env["load_after"] = os.getloadavg()
    torch.set_num_threads(threads)
    stats = engines["sparse"].stage.sparse_stats
    report = {
        "machine": env, "command": " ".join(["python -m dejavu.bench.bench_cpu", *sys.argv[1:]]),
        "model": str(model_dir), "prompt": args.prompt, "prompt_tokens": len(ids),
        "new_tokens": n, "rounds": args.rounds,
        "sparse_density": {"mlp": stats.mlp_density, "heads": stats.head_density},
        "rows": {name: summary(r) for name, r in results.items()},
        "same_tokens_as_transformers": {name: tokens[name] == tokens.get("transformers")
                                        for name in rows if "transformers" in tokens},
    }
    base = report["rows"].get("transformers")
    if base is not None:
        for row in report["rows"].values():
            row["speedup_vs_transformers"] = {
                k: row["tokens_per_s"][k] / base["tokens_per_s"][k] for k in ("best", "median")}
    write(report, Path(args.out))
    return report


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# CPU decode: dejavu-run against transformers, {m['date_utc']}", "",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers "
        f"{m['transformers']}, Python {m['python']}. Threads: a CPU stage's "
        f"{m['stage_threads']}, torch's default {m['torch_default_threads']}. Load average "
        f"(1/5/15 min) before {fmt_load(m['load_before'])}, after {fmt_load(m['load_after'])}.",
        f"Model `{r['model']}`, prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new "
        f"tokens, greedy, batch 1; {r['rounds']} interleaved rounds. Sparse computed "
        f"{r['sparse_density']['mlp']:.3f} of the MLP neurons and "
        f"{r['sparse_density']['heads']:.3f} of the heads.",
        f"Command: `{r['command']}`", "",
        "| row | tokens/s best | median | decode ms/token best | median | x transformers "
        "(best / median) | same tokens as transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        speed = row.get("speedup_vs_transformers")
        lines.append(
            f"| {name} | {row['tokens_per_s']['best']:.1f} | {row['tokens_per_s']['median']:.1f}"
            f" | {row['decode_ms_per_token']['best']:.2f} | "
            f"{row['decode_ms_per_token']['median']:.2f} | "
            + (f"{speed['best']:.2f} / {speed['median']:.2f}" if speed else "-")
            + f" | {r['same_tokens_as_transformers'].get(name, '-')} |")
    lines += ["", "tokens/s: new tokens over the whole call (prefill included); decode "
              "ms/token: between the first and the last new token. Best and median over the "
              "rounds; each round's 1-minute load average is in the JSON."]
    return "\n".join(lines) + "\n"


def fmt_load(load: tuple[float, float, float] | list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report['machine']['date_utc'][:10]}-cpu-{report['machine']['cores']}core"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
