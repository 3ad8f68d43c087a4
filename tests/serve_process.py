"""`dejavu-run serve` as a real subprocess on a free loopback port, for the tests that need
the process (its event loop, its sockets, its file descriptors, its log) and not an app on a
test thread."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

CLI = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _limit_files(soft: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class ServeProcess:
    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@contextlib.contextmanager
def serve_process(args: list[str], cwd: Path, *, env: dict | None = None,
                  timeout: float = 120.0, open_files: int | None = None
                  ) -> Iterator[ServeProcess]:
    """Start `dejavu-run serve ARGS`, wait until /health answers 200, yield it; SIGTERM on
    exit (and the exit code must be 0: the server survived whatever the test did).
    `open_files` sets the process's soft limit on open files (the hard one stays)."""
    port = free_port()
    log = cwd / f"serve-{port}.log"
    environ = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log, "wb") as out:
        proc = subprocess.Popen(CLI + ["serve", "--port", str(port), *args], cwd=cwd,
                                env=environ, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=None if open_files is None else
                                (lambda: _limit_files(open_files)))
    served = ServeProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, served.output()
            try:
                if httpx.get(served.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not come up:\n" + served.output()
            time.sleep(0.2)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0, served.output()[-3000:]
