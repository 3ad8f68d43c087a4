"""Shared helpers of the pipeline and reliability tests: a tiny random OPT checkpoint and
clusters started as real processes (scheduler + workers) on the CPU."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch

from dejavu.runtime.checkpoint import save_model
from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.settings import Settings, make_settings
from dejavu.scheduler.config import PipelineConfig
from dejavu.scheduler.launch import Cluster

TINY = OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, ffn_dim=64,
                 num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32)
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9][: k % 5 + 1] * (k + 1) for k in range(8)]


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    model = OPTModel(TINY)
    # A larger init than OPT's 0.02 so the random model's greedy choices are not near-ties.
    model.init_weights(torch.Generator().manual_seed(seed), std=0.2)
    return save_model(model, path)


def add_predictors(model_dir: Path, seed: int = 0, mlp_source: str = "lookahead") -> Path:
    """Untrained but varied predictors saved next to the checkpoint (<model>/predictors);
    ``mlp_source`` "mlp_in": the MLP predictors read each layer's own MLP input."""
    from dejavu.runtime.checkpoint import load_model
    from dejavu.runtime.predictors import PredictorSet

    torch.manual_seed(seed)
    preds = PredictorSet.create(load_model(model_dir), mlp_rank=8, head_rank=4)
    for m in list(preds.mlp.values()) + list(preds.heads.values()):
        torch.nn.init.normal_(m.up.weight)
    for point in preds.points.values():
        point.mlp_source = mlp_source
    return preds.save(model_dir / "predictors")


def short_dir() -> Path:
    """ipc:// paths must fit in 107 bytes; pytest's tmp_path can be too long."""
    return Path(tempfile.mkdtemp(prefix="dj-"))


def config(model: Path, workers: int, run_dir: Path, **kw) -> PipelineConfig:
    """A cluster's config: keyword arguments that are PipelineConfig fields go there, the
    others are settings keys (dtype, gpu_memory_gib, mlp_density, ...) of whichever
    section of dejavu.toml has them."""
    kw = {"slots": 8, "max_len": 128, "heartbeat_s": 0.3, "threads": 1, "sparse": False} | kw
    flat = {f.name for f in fields(PipelineConfig)}
    sections = Settings().sections()
    values = {"model.path": str(model)}
    for key in [k for k in kw if k not in flat]:
        section = next(n for n, sec in sections.items() if hasattr(sec, key))
        values[f"{section}.{key}"] = kw.pop(key)
    return PipelineConfig(make_settings(values), workers=workers, run_dir=str(run_dir), **kw)


@contextmanager
def cluster(model: Path, workers: int, **kw):
    run_dir = short_dir()
    log = run_dir.parent / f"{run_dir.name}.log"
    c = Cluster(config(model, workers, run_dir / "run", **kw))
    c.log = log
    try:
        c.start(timeout_s=120, log=log)
        yield c
    finally:
        c.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def read_log(c: Cluster) -> str:
    return c.log.read_text(errors="replace") if c.log.exists() else ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(predicate, timeout_s: float, step_s: float = 0.02) -> float | None:
    """Seconds until ``predicate()`` held, or None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(step_s)
    return None
