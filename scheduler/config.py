"""Typed configuration of a pipeline cluster (``launch``), built once from dejavu.toml's
[model] and [pipeline] sections plus command-line overrides, and validated here.

What this module does not know: how the settings are read from disk (``runtime.settings``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..runtime.wire import Fault

RESTART_POLICIES = ("never", "on-failure")


class PipelineConfigError(ValueError):
    """A pipeline setting that cannot be used; names the key, the value and the fix."""


@dataclass(frozen=True)
class PipelineConfig:
    model: str
    workers: int = 1
    dtype: str = "float32"
    devices: list[str] | None = None  # default: cuda:i per worker when there are GPUs, else cpu
    slots: int = 8  # KV-cache slots per worker: sequences in flight at once
    max_len: int = 0  # positions per slot; 0 = the model's max_position_embeddings
    micro_batches: int = 0  # independent batches cycling through the pipeline; 0 = workers
    prefill_chunk: int = 512
    run_dir: str = ""  # "" = $XDG_RUNTIME_DIR/dejavu-run or /tmp/dejavu-run-<uid>
    control_address: str = ""  # "" = ipc:// in the run directory
    client_address: str = ""
    data_addresses: list[str] = field(default_factory=list)  # one per worker after the first
    keys_dir: str = ""  # CURVE keys from `dejavu-run keys`; required for non-local addresses
    spawn: bool = True  # start the workers here; False: wait for workers started elsewhere
    heartbeat_s: float = 1.0
    watchdog_s: float = 60.0
    handshake_timeout_s: float = 30.0
    startup_timeout_s: float = 600.0
    scheduler_timeout_s: float = 30.0  # a remote worker exits after this much silence
    drain_timeout_s: float = 30.0
    restart: str = "never"
    max_restarts: int = 3
    memory_budget_gb: float = 0.0  # per worker; 0 = no limit
    # GPU memory per worker in GiB; layers beyond it are offloaded to pinned host memory
    # (runtime/offload.py). None = no limit, every layer on the GPU.
    gpu_memory_gib: float | None = None
    # The budget left after whole layers caches recent rows of offloaded layers (off: a
    # miss reads its row twice; runtime/offload.py cache_placements).
    offload_cache: bool = False
    threads: int = 0  # torch CPU threads per worker; 0 = cores / workers
    # Contextual sparsity ([sparsity] of dejavu.toml): sparse is True (--sparse), False
    # (--dense) or None (sparse when enabled and predictors are found).
    sparse: bool | None = None
    sparsity_enabled: bool = True
    predictors: str = ""  # "" = <model dir>/predictors
    mlp_density: float | None = None
    head_density: float | None = None
    dense_layers: str = ""
    selector: str = "predictors"  # or "random" (uniform at the densities; benchmarks)
    faults: list[Fault] = field(default_factory=list)  # tests only (wire.Fault)

    def __post_init__(self) -> None:
        def bad(key: str, fix: str) -> PipelineConfigError:
            return PipelineConfigError(f"[pipeline] {key} = {getattr(self, key)!r}: {fix}")

        for key, low in (("workers", 1), ("slots", 1), ("max_len", 0), ("micro_batches", 0),
                         ("prefill_chunk", 1), ("max_restarts", 0), ("threads", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise bad(key, f"expected an integer >= {low}")
        for key in ("heartbeat_s", "watchdog_s", "handshake_timeout_s", "startup_timeout_s",
                    "scheduler_timeout_s", "drain_timeout_s", "memory_budget_gb"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise bad(key, "expected a finite number >= 0")
        if self.heartbeat_s <= 0 or self.watchdog_s <= 0:
            raise PipelineConfigError("[pipeline] heartbeat_s and watchdog_s must be > 0")
        if self.restart not in RESTART_POLICIES:
            raise bad("restart", f"expected one of {', '.join(RESTART_POLICIES)}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise bad("dtype", "expected float32, float16 or bfloat16")
        self._check_offload()
        if self.devices is not None and len(self.devices) != self.workers:
            raise bad("devices", f"expected one device per worker ({self.workers})")
        if self.data_addresses and len(self.data_addresses) != self.workers - 1:
            raise bad("data_addresses", f"expected one address per worker after the first "
                                        f"({self.workers - 1})")

    def _check_offload(self) -> None:
        budget = self.gpu_memory_gib
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
                    or not math.isfinite(budget) or budget <= 0:
                raise PipelineConfigError(f"[pipeline] gpu_memory_gib = {budget!r}: expected a "
                                          "number of GiB > 0 (absent = no limit)")
            if self.dtype == "float32":
                raise PipelineConfigError(
                    f"[pipeline] gpu_memory_gib = {budget!r} needs [model] dtype = \"float16\" "
                    "or \"bfloat16\": layers that do not fit run on the Triton kernels, which "
                    "support only those (dtype is \"float32\")")
            if self.memory_budget_gb:
                raise PipelineConfigError(
                    "[pipeline] gpu_memory_gib and memory_budget_gb are both set; "
                    "gpu_memory_gib (offload what does not fit) replaces memory_budget_gb "
                    "(refuse what does not fit): set memory_budget_gb = 0")
        if self.selector not in ("predictors", "random"):
            raise PipelineConfigError(f"[sparsity] selector = {self.selector!r}: expected "
                                      "\"predictors\" or \"random\"")
        if self.selector == "random" and (self.mlp_density is None or self.head_density is None):
            raise PipelineConfigError("[sparsity] selector = \"random\" needs mlp_density and "
                                      "head_density")

    @property
    def batches(self) -> int:
        return self.micro_batches or self.workers

    def with_overrides(self, **overrides: Any) -> PipelineConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# [pipeline] keys of dejavu.toml that map one to one onto PipelineConfig fields.
_SETTING_KEYS = ("workers", "slots", "max_len", "micro_batches", "run_dir", "control_address",
                 "client_address", "keys_dir", "spawn", "heartbeat_s", "watchdog_s",
                 "handshake_timeout_s", "startup_timeout_s", "scheduler_timeout_s",
                 "drain_timeout_s", "restart", "max_restarts", "memory_budget_gb", "threads",
                 "gpu_memory_gib", "offload_cache")


def from_settings(settings: Any, **overrides: Any) -> PipelineConfig:
    """PipelineConfig from ``runtime.settings.Settings`` (fields that a given version of the
    settings does not have keep their defaults), then non-None ``overrides``."""
    pipeline = settings.pipeline
    values: dict[str, Any] = {"model": settings.model_path(), "dtype": settings.model.dtype}
    sparsity = getattr(settings, "sparsity", None)
    if sparsity is not None:
        values.update(sparsity_enabled=sparsity.enabled, predictors=sparsity.predictors or "",
                      mlp_density=sparsity.mlp_density, head_density=sparsity.head_density,
                      dense_layers=sparsity.dense_layers,
                      selector=getattr(sparsity, "selector", "predictors"))
    for key in _SETTING_KEYS:
        if hasattr(pipeline, key):
            values[key] = getattr(pipeline, key)
    addresses = getattr(pipeline, "data_addresses", "")
    if addresses:
        values["data_addresses"] = [a.strip() for a in addresses.split(",") if a.strip()]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig(**values)
