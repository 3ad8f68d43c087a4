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

from ..runtime.build import resolve, steps_skip_heads
from ..runtime.checkpoint import CheckpointError, inspect_checkpoint
from ..runtime.opt_config import ConfigError, OPTConfig
from ..runtime.selection import SelectionError
from ..runtime.weight_store import gib
from .config import PipelineConfig, PipelineConfigError
from .logs import setup_logging
from .planner import PlanError, plan_layers
from .process import PipelineServer
from .rundir import KEYS_NAME, RunDir, RunDirError, reclaim_stale
from .transport import TransportError, is_local, load_curve

log = logging.getLogger("dejavu.scheduler")

EXIT_CANNOT_START = 2
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class LaunchError(RuntimeError):
    pass


def launch(config: PipelineConfig, *, parent_pid: int | None = None,
           owns_run_dir: bool = False) -> int:
    """Run a cluster until it stops; returns the process exit code. ``owns_run_dir``: the
    run directory was made for this cluster alone; if the parent that made it is gone
    when the cluster stops (killed), nobody else will remove it, so this process does."""
    try:
        run_dir = RunDir(config.run_dir or None).acquire()
    except RunDirError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_START
    orphaned = False
    try:
        try:
            server, model_dir = _build(config, run_dir)
        except (CheckpointError, ConfigError, PlanError, TransportError, RunDirError,
                PipelineConfigError, SelectionError) as exc:
            log.error("cannot launch: %s", exc)
            return EXIT_CANNOT_START
        # Full validation of the weights' headers runs while the workers start.
        server.parent_pid = parent_pid
        code = server.run(preflight=lambda: inspect_checkpoint(model_dir))
        orphaned = parent_pid is not None and os.getppid() != parent_pid
        return code
    finally:
        run_dir.release(remove=owns_run_dir and orphaned)


def _build(config: PipelineConfig, run_dir: RunDir) -> tuple[PipelineServer, Path]:
    # Resolved once, here: every worker then builds from the same settings, no lookups.
    settings = resolve(config.settings, config.sparse)
    config = replace(config, settings=settings)
    model_dir = Path(settings.model.path)
    model_config = OPTConfig.from_file(model_dir / "config.json")
    max_len = config.max_len or model_config.max_position_embeddings
    if max_len > model_config.max_position_embeddings:  # else every worker fails to start
        raise PipelineConfigError(
            f"[pipeline] max_len = {max_len}: the model has "
            f"{model_config.max_position_embeddings} positions; set max_len at most that "
            "(0 = all of them)")
    budget = settings.pipeline.gpu_memory_gib
    plan = plan_layers(model_config, config.workers,
                       dtype_bytes=_DTYPE_BYTES[settings.model.dtype], slots=config.slots,
                       max_len=max_len, gpu_budget=None if budget is None else gib(budget),
                       kv_inputs=steps_skip_heads(settings, model_config))
    for line in plan.describe().splitlines():
        log.info("%s", line)
    if needs_own_keys(config, run_dir):
        config = config.with_overrides(keys_dir=str(run_dir.make_keys()))
        log.info("CURVE keys for this cluster in %s", config.keys_dir)
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


def needs_own_keys(config: PipelineConfig, run_dir: RunDir) -> bool:
    """Whether ``launch`` makes CURVE keys for this cluster: no keys_dir, and some address
    is not an ipc socket in the private run directory. Such an address (tcp://127.0.0.1
    above all) is open to every local user, so then every socket authenticates, with keys
    only this user can read."""
    explicit = [a for a in (config.control_address, config.client_address,
                            *config.data_addresses) if a]
    # Addresses other machines can reach need keys made by hand (keys_dir): those are
    # refused with that advice, not given keys that no other host has.
    return (not config.keys_dir and all(is_local(a) for a in explicit)
            and any(not run_dir.holds(a) for a in explicit))


# --- a launch as a child process -------------------------------------------------------------


class Cluster:
    """A ``launch`` in a child process; ``address`` is its client API once ``start`` returns.

    Without a configured run directory it gets one of its own, removed when it stops (by
    ``stop``, by the launch if this process was killed, or, if both were, by the next
    ``Cluster`` that starts: ``reclaim_stale``)."""

    def __init__(self, config: PipelineConfig) -> None:
        self._owns_dir = not config.run_dir
        if not config.run_dir:
            base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
            prefix = f"dejavu-run-{os.getuid()}-"
            reclaim_stale(base, prefix)
            config = config.with_overrides(run_dir=str(base / f"{prefix}{uuid.uuid4().hex[:8]}"))
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
            cmd.append("--owns-run-dir")
            # A fresh name: it must not exist yet (nothing planted can be in it).
            self.run_dir.parent.mkdir(parents=True, exist_ok=True)
            self.run_dir.mkdir(mode=0o700)
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
        conn, keys = None, None
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise LaunchError(f"the launch exited with code {self.proc.returncode} "
                                      f"before it was ready: {self._log_tail()}")
                # The launch makes this cluster's keys once it has started: connect with
                # them (again, if a crashed launch's keys were there before).
                if conn is None or keys != self._keys_stamp():
                    keys = self._keys_stamp()
                    if keys is None and needs_own_keys(self.config, RunDir(self.run_dir)):
                        time.sleep(0.05)
                        continue
                    if conn is not None:
                        conn.close()
                    conn = PipelineConnection(self.address,
                                              keys_dir=self.config.keys_dir or None,
                                              run_dir=str(self.run_dir))
                try:
                    if conn.health(timeout_s=0.5).state == "ready":
                        return self
                except TimeoutError:
                    pass
            raise LaunchError(f"the cluster was not ready within {timeout_s:g} s: "
                              f"{self._log_tail()}")
        except BaseException:
            self.stop()  # a failed start leaves neither processes nor a run directory
            raise
        finally:
            if conn is not None:
                conn.close()

    def _keys_stamp(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.run_dir / KEYS_NAME / "client.key_secret")
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns
        return (self.run_dir / KEYS_NAME / "client.key_secret").exists()

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
    parser.add_argument("--owns-run-dir", action="store_true",
                        help="the run directory was made for this launch alone")
    args = parser.parse_args(argv)
    setup_logging("scheduler")
    try:
        config = msgspec.json.decode(args.config_json, type=PipelineConfig)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        log.error("bad pipeline config: %s", exc)
        return EXIT_CANNOT_START
    return launch(config, parent_pid=args.exit_with_parent, owns_run_dir=args.owns_run_dir)


if __name__ == "__main__":
    sys.exit(main())
