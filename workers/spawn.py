"""Starting worker processes fast: a fork server that has already imported what a worker
needs.

A fresh Python process pays about 4 s of CPU before a worker can load its layers (torch,
and the parts of torch that building a model on the meta device pulls in lazily). The
scheduler therefore starts workers through multiprocessing's fork server with this
module preloaded: the server pays that once, and every worker (and every restart) is a
fork of it. The server is a fresh interpreter, not a fork of the scheduler, so no socket
or thread of the scheduler leaks into workers; it exits when the scheduler dies, and the
workers, which watch their parent, follow.

``WorkerProcess`` gives the scheduler the little it needs: pid, poll, kill, wait.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess


def _run(argv: list[str]) -> None:
    from .main import exit_now, main

    exit_now(main([*argv, "--parent-pid", str(os.getppid())]))


class WorkerProcess:
    def __init__(self, argv: list[str], name: str) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["dejavu.workers.preload"])
        self.proc = ctx.Process(target=_run, args=(argv,), name=name)
        self.proc.start()
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs."""
        return self.proc.exitcode

    def kill(self) -> None:
        self.proc.kill()

    def close(self) -> None:
        """Release the handle's file descriptor once the process has exited (a scheduler
        that restarts workers must not collect one per restart)."""
        if self.proc.exitcode is not None:
            self.proc.close()

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
        return self.proc.exitcode
