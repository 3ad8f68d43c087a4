"""Typed configuration of a pipeline cluster (``launch``): the whole ``Settings`` (what
every worker's engine is built from, runtime/build.py) plus how the cluster runs: its
processes, sockets, timeouts and batching, from dejavu.toml's [pipeline] section and the
command line.

What this module does not know: how the settings are read from disk (``runtime.settings``)
or what they build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..runtime.settings import Settings
from ..runtime.wire import Fault

RESTART_POLICIES = ("never", "on-failure")


class PipelineConfigError(ValueError):
    """A pipeline setting that cannot be used; names the key, the value and the fix."""


@dataclass(frozen=True)
class PipelineConfig:
    # Every worker builds its stage from these, whole ([model], [sparsity], the GPU budget);
    # the launch resolves them once (runtime/build.py ``resolve``) before they travel.
    settings: Settings
    workers: int = 1
    devices: list[str] | None = None  # default: cuda:i per worker when there are GPUs, else cpu
    slots: int = 8  # KV-cache slots per worker: sequences in flight at once
    max_len: int = 0  # positions per slot; 0 = the model's max_position_embeddings
    micro_batches: int = 0  # batches cycling through the pipeline; 0 = default_micro_batches
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
    threads: int = 0  # torch CPU threads per worker; 0 = cores / workers
    # The command line's --sparse (True) / --dense (False); None follows [sparsity].
    sparse: bool | None = None
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
                    "scheduler_timeout_s", "drain_timeout_s"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise bad(key, "expected a finite number >= 0")
        if self.heartbeat_s <= 0 or self.watchdog_s <= 0:
            raise PipelineConfigError("[pipeline] heartbeat_s and watchdog_s must be > 0")
        if self.restart not in RESTART_POLICIES:
            raise bad("restart", f"expected one of {', '.join(RESTART_POLICIES)}")
        if self.devices is not None and len(self.devices) != self.workers:
            raise bad("devices", f"expected one device per worker ({self.workers})")
        if self.data_addresses and len(self.data_addresses) != self.workers - 1:
            raise bad("data_addresses", f"expected one address per worker after the first "
                                        f"({self.workers - 1})")

    @property
    def model(self) -> str:
        return self.settings.model.path

    def with_overrides(self, **overrides: Any) -> PipelineConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def gpu_of(device: str) -> str | None:
    """Which GPU a worker's device string names, as "cuda:N" ("cuda" alone is the process's
    current device, cuda:0 for a worker); None for any other device."""
    if not device.startswith("cuda"):
        return None
    return device if ":" in device else f"{device}:0"


def default_micro_batches(workers: int, slots: int, devices: list[str] | None = None) -> int:
    """Cores (micro-batches) when none are configured: one worker runs one step at a time;
    a pipeline over N devices gets N + 1 (bounded by the slots). With one step per stage,
    every stage waits while steps cross the hops and come back through the scheduler; one
    step more keeps the first stage fed meanwhile. The scheduler lowers the steps in flight
    to what the measured stage and hop times need (``micro_batch_groups``), never above
    these. Workers on one GPU (``devices``) count once: their steps cannot run at once,
    and a micro-batch reads every weight again for fewer rows (one H100, opt-1.3b, 8
    streams, two workers against one: 0.975 with 1 micro-batch, 0.52 with 2, 0.38 with 3).
    A CPU worker, or one whose device is not known here, counts as its own."""
    if workers == 1:
        return 1
    cuda = [gpu for gpu in map(gpu_of, devices or []) if gpu is not None]
    units = len(set(cuda)) + workers - len(cuda)
    return 1 if units == 1 else max(1, min(slots, units + 1))


# [pipeline] keys of dejavu.toml that map one to one onto PipelineConfig fields.
_SETTING_KEYS = ("workers", "slots", "max_len", "micro_batches", "run_dir", "control_address",
                 "client_address", "keys_dir", "spawn", "heartbeat_s", "watchdog_s",
                 "handshake_timeout_s", "startup_timeout_s", "drain_timeout_s", "restart",
                 "max_restarts")


def from_settings(settings: Settings, **overrides: Any) -> PipelineConfig:
    """PipelineConfig of ``settings`` (carried whole) with its [pipeline] keys, then
    non-None ``overrides``."""
    pipeline = settings.pipeline
    values: dict[str, Any] = {"settings": settings}
    for key in _SETTING_KEYS:
        values[key] = getattr(pipeline, key)
    addresses = pipeline.data_addresses
    if addresses:
        values["data_addresses"] = [a.strip() for a in addresses.split(",") if a.strip()]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig(**values)
