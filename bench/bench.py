"""`dejavu-run bench`: kernel, resident and offload benchmarks, written to
bench/results/<date>-<gpu>.json and .md with the hardware and software they ran on.

Scenarios run in priority order under a wall-clock budget; one that fails or does not fit
the budget is recorded with the reason, and the rest still run. The top-level target keys
are filled from the measured scenarios, or null with a reason in ``missing``.

``--small`` is the dry run: tiny shapes, on the CPU through Triton's interpreter (or on a
GPU), to check that the whole script works. Its numbers mean nothing.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bench_common import (
    SHAPES,
    TINY,
    cuda,
    environment,
    gb,
    h2d_bandwidth,
    hbm_copy_bandwidth,
    hbm_read_bandwidth,
)

DENSITIES = [0.05, 0.10, 0.25, 0.50, 1.0]
MLP_TUNE = [
    # before (2026-11-27): the looped kernel, then the split kernels' best shapes on an H200
    {"block_n": 16, "block_c": 512, "num_warps": 8},  # one kernel, loops over C
    {"block_n": 32, "split_c": 256, "num_warps": 4},  # fc1, fc2, finalize: 3 kernels
    {"block_n": 64, "split_c": 256, "num_warps": 8},
    # chained: one kernel (fc1 tiles [block_n, split_c], fc2 tiles [block_n2, split_c2]) and
    # a memset; the tuner also times the best with a workspace (no memset). prefetch=False:
    # fc2 tiles load their rows only once fc1 is done (fc1 rows get the bandwidth first).
    *({"chained": True, "block_n": n1, "split_c": c1, "block_n2": n2, "split_c2": c2,
       "num_warps": nw, **({} if pf else {"prefetch": False})}
      for n1, c1, n2, c2, nw, pf in [
          (32, 256, 64, 128, 2, True), (32, 256, 64, 128, 2, False),
          (32, 256, 128, 64, 2, True), (32, 256, 128, 64, 2, False),
          (64, 128, 64, 128, 2, True), (16, 256, 64, 128, 2, True),
          (32, 256, 64, 64, 2, True), (32, 256, 64, 128, 1, True),
          (32, 256, 64, 128, 4, True), (32, 256, 64, 128, 4, False),
          (32, 256, 128, 64, 4, True), (64, 256, 64, 256, 4, True)]),
]
KEYS = [
    "mlp_kernel_speedup_10pct_opt13b", "mlp_kernel_hbm_fraction_10pct_opt13b",
    "offload_opt30b_tokens_per_s", "offload_opt30b_speedup_vs_accelerate",
    "offload_cold_path_h2d_fraction", "resident_opt13b_dense_time_over_roofline",
    "resident_opt13b_sparse_speedup_vs_dense", "resident_opt13b_speedup_vs_transformers",
]


@dataclass
class BenchOptions:
    out_dir: Path = Path("bench/results")
    small: bool = False
    time_budget_s: float = 480.0
    offload_layers: int = 4  # decoder layers built in pinned memory for the offload runs
    only: tuple[str, ...] = ()  # scenario names to run (empty: all)
    command: str = field(default_factory=lambda: " ".join(sys.argv))


def _plan(opts: BenchOptions) -> list[tuple[str, str, dict[str, Any]]]:
    """(scenario, label, arguments) in priority order: the issue's headline numbers first."""
    if opts.small:
        t = TINY
        return [("tune", "tune tiny", {"shape": t}),
                ("kernels", "kernels tiny", {"shape": t, "batches": (1, 3)}),
                ("resident", "resident tiny", {"shape": t}),
                ("offload", "offload tiny", {"shape": t, "layers": 2}),
                ("accelerate", "accelerate tiny", {"shape": t})]
    s = SHAPES
    return [
        ("tune", "tune opt-13b", {"shape": s["opt-13b"]}),
        ("kernels", "kernels opt-13b", {"shape": s["opt-13b"], "batches": (1, 8)}),
        ("resident", "resident opt-13b", {"shape": s["opt-13b"]}),
        ("offload", "offload opt-30b", {"shape": s["opt-30b"], "layers": opts.offload_layers}),
        ("accelerate", "accelerate opt-30b", {"shape": s["opt-30b"]}),
        ("kernels", "kernels opt-30b", {"shape": s["opt-30b"], "batches": (1, 8)}),
        ("kernels", "kernels opt-6.7b", {"shape": s["opt-6.7b"], "batches": (1, 8)}),
        ("kernels", "kernels opt-66b", {"shape": s["opt-66b"], "batches": (1, 8)}),
        ("resident", "resident opt-6.7b", {"shape": s["opt-6.7b"]}),
        ("offload", "offload opt-13b", {"shape": s["opt-13b"], "layers": opts.offload_layers}),
    ]


# What `--only` accepts: the scenarios of _plan, and e2e (bench_e2e.py, its own run).
SCENARIOS = ("tune", "kernels", "resident", "offload", "accelerate", "e2e")


def check_only(only: tuple[str, ...]) -> None:
    """ValueError naming every value of ``--only`` that is no scenario, and the choices."""
    unknown = [name for name in only if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"--only {', '.join(unknown)}: no such scenario; choose from "
                         f"{' | '.join(SCENARIOS)}")


# Rough seconds each scenario needs on an H100 (compiles included), to skip rather than be
# cut off by the lease.
_COST = {"tune": 15, "kernels": 25, "resident": 45, "offload": 60, "accelerate": 60}


def skip_reason(scenario: str, elapsed_s: float, opts: BenchOptions) -> str:
    """Why ``scenario`` does not run ("" when it runs); recorded and printed."""
    if scenario == "accelerate" and not cuda():  # a dry run on a CPU: nothing to compare
        return "accelerate's CPU offload needs a GPU"
    if elapsed_s + _COST[scenario] > opts.time_budget_s:
        return (f"time budget: {elapsed_s:.0f} s used of {opts.time_budget_s:g} s; it needs "
                f"about {_COST[scenario]} s")
    return ""


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    from .bench_accelerate import accelerate_case
    from .bench_kernels import attn_case, mlp_case, tune_attention, tune_mlp
    from .bench_offload import offload_case
    from .bench_resident import resident_case

    device = "cuda" if cuda() else "cpu"
    start = time.perf_counter()
    res: dict[str, Any] = {"environment": environment(), "command": opts.command,
                           "small_dry_run": opts.small, "scenarios": {}, "skipped": {},
                           "log": []}
    res["ceilings"] = {"hbm_copy_bytes_per_s": hbm_copy_bandwidth(),
                       "hbm_read_bytes_per_s": hbm_read_bandwidth(),
                       "h2d_pinned_bytes_per_s": h2d_bandwidth()}
    hbm = res["ceilings"]["hbm_copy_bytes_per_s"]
    h2d = res["ceilings"]["h2d_pinned_bytes_per_s"]
    tuned: dict[int, dict] = {}
    attn_cfg: dict[str, Any] = {}
    densities = [0.1, 1.0] if opts.small else DENSITIES
    for scenario, label, args in _plan(opts):
        elapsed = time.perf_counter() - start
        if opts.only and scenario not in opts.only:
            continue  # not asked for: no skip
        if why := skip_reason(scenario, elapsed, opts):
            res["skipped"][label] = why
            print(f"[bench] {label} skipped: {why}", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"[bench] {label} (at {elapsed:.0f} s)", flush=True)
        shape = args["shape"]
        try:
            if scenario == "tune":
                configs = MLP_TUNE if not opts.small else [
                    {"block_n": 16, "split_c": 32, "num_warps": 4},
                    {"chained": True, "block_n": 16, "split_c": 32, "num_warps": 4}]
                out = tune_mlp(shape, device, configs, batches=(1, 3) if opts.small else (1, 8))
                for b in (1, 3, 8):
                    if f"best_batch{b}" in out:
                        tuned[b] = out[f"best_batch{b}"]
                out["attention"] = tune_attention(shape, device)
                best = min(out["attention"], key=lambda r: r["time_us"])
                attn_cfg = {k: best[k] for k in ("qkv_split_c", "split_h", "chunk")}
                out["best_attention"] = attn_cfg
            elif scenario == "kernels":
                out = {"mlp": mlp_case(shape, device, args["batches"], densities, tuned, hbm),
                       "attention": attn_case(shape, device, args["batches"], densities, hbm,
                                              context=64 if opts.small else 512,
                                              cfg=attn_cfg)}
            elif scenario == "resident":
                out = resident_case(shape, device, hbm, mlp_density=0.10, head_density=0.50,
                                    mlp_cfg=tuned.get(1), attn_cfg=attn_cfg,
                                    hf=cuda() or opts.small)
            elif scenario == "offload":
                # The offload layers own no MLP workspace: their calls keep the memset.
                out = offload_case(shape, device, bench_layers=args["layers"], h2d=h2d,
                                   batches=(1, 8), mlp_cfgs={
                                       b: {k: v for k, v in cfg.items() if k != "workspace"}
                                       for b, cfg in tuned.items()},
                                   budget_gib=None if opts.small else 24.0)
            elif scenario == "accelerate":
                out = accelerate_case(shape, device, budget_gib=24.0)
            res["scenarios"][label] = out
        except Exception as exc:  # the others still run; the results name it
            res["scenarios"][label] = {"error": repr(exc)[:500]}
            print(f"[bench] {label} failed: {type(exc).__name__}: {exc}"[:500],
                  file=sys.stderr, flush=True)
        finally:
            if cuda():
                torch.cuda.empty_cache()
        res["log"].append({"scenario": label, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"[bench] {label} done in {time.perf_counter() - t0:.1f} s", flush=True)
    res["tuned_mlp_blocks"] = {str(k): v for k, v in tuned.items()}
    res.update(headline(res))
    res["total_s"] = round(time.perf_counter() - start, 1)
    return res


def _find(rows, **match) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def headline(res: dict[str, Any]) -> dict[str, Any]:
    sc = res["scenarios"]
    out: dict[str, Any] = {k: None for k in KEYS}
    missing: dict[str, str] = {}
    k13 = sc.get("kernels opt-13b", {})
    row = _find(k13.get("mlp", []), shape="opt-13b", batch=1, density=0.10)
    if row:
        out["mlp_kernel_speedup_10pct_opt13b"] = row["speedup_vs_dense"]
        out["mlp_kernel_hbm_fraction_10pct_opt13b"] = row["sparse_hbm_fraction"]
        read = res["ceilings"].get("hbm_read_bytes_per_s")
        if read:  # extra, not an issue key: against the read-only ceiling
            out["mlp_kernel_read_bw_fraction_10pct_opt13b"] = round(
                row["sparse_gbps"] * 1e9 / read, 3)
    r13 = sc.get("resident opt-13b", {})
    if "ours_dense_ms" in r13:
        out["resident_opt13b_dense_time_over_roofline"] = r13.get("dense_time_over_roofline")
        out["resident_opt13b_sparse_speedup_vs_dense"] = r13.get("sparse_speedup_vs_dense")
        out["resident_opt13b_speedup_vs_transformers"] = r13.get(
            "sparse_speedup_vs_transformers")
    off = sc.get("offload opt-30b", {})
    run1 = _find(off.get("runs", []), batch=1)
    if run1 and "ours_tokens_per_s_extrapolated" in run1:
        out["offload_opt30b_tokens_per_s"] = run1["ours_tokens_per_s_extrapolated"]
        acc = _find(sc.get("accelerate opt-30b", {}).get("runs", []), batch=1)
        if acc:
            out["offload_opt30b_speedup_vs_accelerate"] = round(
                run1["ours_tokens_per_s_extrapolated"] / acc["tokens_per_s_extrapolated"], 1)
    cold = off.get("cold_path", {})
    out["offload_cold_path_h2d_fraction"] = cold.get("chosen_h2d_fraction")
    for k in KEYS:
        if out[k] is None:
            missing[k] = "not measured in this run (see scenarios/skipped for the reason)"
    out["missing"] = missing
    return out


def write_results(res: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    env = res["environment"]
    gpu = (env.get("gpu") or "cpu").replace("NVIDIA ", "").replace(" ", "-").lower()
    stem = f"{env['date_utc'][:10]}-{gpu}" + ("-small" if res["small_dry_run"] else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    jpath.write_text(json.dumps(res, indent=1, default=str) + "\n")
    mpath.write_text(render_markdown(res))
    return jpath, mpath


def render_markdown(res: dict[str, Any]) -> str:
    env, c = res["environment"], res["ceilings"]
    lines = [f"# dejavu-run bench, {env['date_utc']}", "",
             f"GPU {env.get('gpu')} (driver {env.get('driver')}, CUDA {env.get('cuda')}), "
             f"torch {env['torch']}, triton {env.get('triton')}, transformers "
             f"{env.get('transformers')}, accelerate {env.get('accelerate')}.",
             f"Command: `{res['command']}`. Total {res.get('total_s')} s.", ""]
    if res["small_dry_run"]:
        lines += ["**Dry run (--small): tiny shapes, numbers are meaningless.**", ""]
    lines += [f"Measured ceilings: HBM copy {gb(c['hbm_copy_bytes_per_s'])} GB/s (read+write), "
              f"HBM read {gb(c.get('hbm_read_bytes_per_s'))} GB/s (a sum), "
              f"pinned H2D {gb(c['h2d_pinned_bytes_per_s'])} GB/s.", "", "## Headline", "",
              "| key | value |", "|---|---|"]
    for k in KEYS:
        v = res.get(k)
        lines.append(f"| {k} | {v if v is not None else 'not measured'} |")
    for label, sc in res["scenarios"].items():
        lines += ["", f"## {label}", ""]
        if "error" in sc:
            lines.append(f"failed: `{sc['error']}`")
            continue
        if label.startswith("kernels"):
            lines += ["| kind | batch | density | sparse us | dense us | speedup | sparse GB/s "
                      "| of HBM | rel err |", "|---|---|---|---|---|---|---|---|---|"]
            for r in sc["mlp"] + sc["attention"]:
                lines.append(f"| {r['kind']} | {r['batch']} | {r['density']:.0%} | "
                             f"{r['sparse_us']} | {r['dense_us']} | {r['speedup_vs_dense']} | "
                             f"{r['sparse_gbps']} | {r['sparse_hbm_fraction']} | "
                             f"{r['rel_err_vs_reference']:.1e} |")
        else:
            lines += ["```json", json.dumps(sc, indent=1, default=str)[:6000], "```"]
    if res["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in res["skipped"].items()]
    return "\n".join(lines) + "\n"


def main(opts: BenchOptions) -> list[str]:
    """Run, write the results; returns the scenarios that failed."""
    if "e2e" in opts.only:  # its own run and files (bench_e2e.py): the product's paths
        from .bench_e2e import E2EOptions
        from .bench_e2e import main as e2e_main

        e2e = E2EOptions.dry_run(opts.out_dir) if opts.small else E2EOptions(
            out_dir=opts.out_dir, time_budget_s=opts.time_budget_s)
        e2e.command = opts.command
        e2e_main(e2e)
        if opts.only == ("e2e",):
            return []
        opts.only = tuple(o for o in opts.only if o != "e2e")
    res = run_bench(opts)
    paths = write_results(res, opts.out_dir)
    print(json.dumps({k: res.get(k) for k in KEYS}, indent=1))
    print(f"wrote {paths[0]} and {paths[1]}")
    return [label for label, out in res["scenarios"].items()
            if isinstance(out, dict) and "error" in out]
