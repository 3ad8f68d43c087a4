"""``dejavu-run launch``: lock the run directory, plan the layers, run the scheduler with
its workers in the foreground; and ``Cluster``, which starts that same launch as a child
process for ``generate --workers``, ``chat --workers`` and ``serve --workers``.

The launch process is the scheduler process: killing it kills the cluster (workers watch
their parent). Its exit code is 0 after a clean stop (Ctrl-C, SIGTERM), 3 when a worker
died and no restart was allowed, 2 when it could not start.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import msgspec

from ..runtime.build import resolve
from ..runtime.checkpoint import CheckpointError, inspect_checkpoint
from ..runtime.opt_config import ConfigError, OPTConfig
from ..runtime.selection import SelectionError
from ..runtime.weight_store import gib
from .config import PipelineConfig, PipelineConfigError
from .logs import setup_logging
from .planner import PlanError, plan_layers
from .process import PipelineServer
from .rundir import RunDir, RunDirError
from .transport import TransportError, load_curve

log = logging.getLogger("dejavu.scheduler")

EXIT_CANNOT_START = 2
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class LaunchError(RuntimeError):
    pass


def launch(config: PipelineConfig, *, parent_pid: int | None = None) -> int:
    """Run a cluster until it stops; returns the process exit code."""
    try:
        run_dir = RunDir(config.run_dir or None).acquire()
    except RunDirError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_START
    try:
        try:
            server, model_dir = _build(config, run_dir)
        except (CheckpointError, ConfigError, PlanError, TransportError, RunDirError,
                PipelineConfigError, SelectionError) as exc:
            log.error("cannot launch: %s", exc)
            return EXIT_CANNOT_START
        # Full validation of the weights' headers runs while the workers start.
        server.parent_pid = parent_pid
        return server.run(preflight=lambda: inspect_checkpoint(model_dir))
    finally:
        run_dir.release()


def _build(config: PipelineConfig, run_dir: RunDir) -> tuple[PipelineServer, Path]:
    # Resolved once, here: every worker then builds from the same settings, no lookups.
    settings = resolve(config.settings, config.sparse)
    config = replace(config, settings=settings)
    model_dir = Path(settings.model.path)
    model_config = OPTConfig.from_file(model_dir / "config.json")
    max_len = config.max_len or model_config.max_position_embeddings
    budget = settings.pipeline.gpu_memory_gib
    plan = plan_layers(model_config, config.workers,
                       dtype_bytes=_DTYPE_BYTES[settings.model.dtype], slots=config.slots,
                       max_len=max_len, gpu_budget=None if budget is None else gib(budget))
    for line in plan.describe().splitlines():
        log.info("%s", line)
    curve = load_curve(config.keys_dir) if config.keys_dir else None
    sparsity = settings.sparsity
    log.info("execution: %s", "dense" if not sparsity.enabled else
             f"sparse, {sparsity.selector} selector" if sparsity.selector == "random" else
             f"sparse, predictors {sparsity.predictors}")
    tokenizer = None
    try:
        from ..runtime.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
    except Exception as exc:  # noqa: BLE001 - token ids still work without text
        log.info("no tokenizer in %s (%s): streaming token ids without text", model_dir,
                 type(exc).__name__)
    return PipelineServer(config, plan, model_config, run_dir, tokenizer=tokenizer,
                          curve=curve), model_dir


# --- a launch as a child process -------------------------------------------------------------


class Cluster:
    """A ``launch`` in a child process; ``address`` is its client API once ``start`` returns."""

    def __init__(self, config: PipelineConfig) -> None:
        self._owns_dir = not config.run_dir
        if not config.run_dir:
            base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
            config = config.with_overrides(
                run_dir=str(base / f"dejavu-run-{os.getuid()}-{uuid.uuid4().hex[:8]}"))
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.address = config.client_address or f"ipc://{self.run_dir / 'client.sock'}"
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None

    def start(self, timeout_s: float = 120.0, *, log: Path | None = None) -> Cluster:
        """Start and wait until every worker is ready; the cluster's log goes to ``log``
        (a file) or, by default, to this process's stderr."""
        from .zmq_client import PipelineConnection

        cmd = [sys.executable, "-m", "dejavu.scheduler.launch", "--config-json",
               msgspec.json.encode(self.config).decode()]
        if self._owns_dir:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log = log
        stderr = open(log, "ab") if log is not None else None  # noqa: SIM115
        try:
            # Its own session: a Ctrl-C meant for the caller (chat cancelling an answer)
            # must not stop the cluster; it still exits when this process dies.
            self.proc = subprocess.Popen([*cmd, "--exit-with-parent", str(os.getpid())],
                                         stdin=subprocess.DEVNULL, stderr=stderr,
                                         start_new_session=True)
        finally:
            if stderr is not None:
                stderr.close()
        deadline = time.monotonic() + timeout_s
        with PipelineConnection(self.address, keys_dir=self.config.keys_dir or None) as conn:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise LaunchError(f"the launch exited with code {self.proc.returncode} "
                                      f"before it was ready: {self._log_tail()}")
                try:
                    if conn.health(timeout_s=0.5).state == "ready":
                        return self
                except TimeoutError:
                    pass
        tail = self._log_tail()
        self.stop()
        raise LaunchError(f"the cluster was not ready within {timeout_s:g} s: {tail}")

    def _log_tail(self) -> str:
        if self.log is None:
            return "see its log above"
        try:
            lines = Path(self.log).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        errors = [ln for ln in lines if " ERROR " in ln] or lines[-1:]
        return errors[-1] if errors else "no log"

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._owns_dir:  # a directory made up for this cluster: leave nothing behind
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> Cluster:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dejavu-launch")
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--exit-with-parent", type=int, default=None,
                        help="stop (draining) when this process is no longer the parent")
    args = parser.parse_args(argv)
    setup_logging("scheduler")
    try:
        config = msgspec.json.decode(args.config_json, type=PipelineConfig)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        log.error("bad pipeline config: %s", exc)
        return EXIT_CANNOT_START
    return launch(config, parent_pid=args.exit_with_parent)


if __name__ == "__main__":
    sys.exit(main())
