"""Imported once by the workers' fork server (``workers/spawn.py``), never by the
scheduler: warm what every worker needs, and tie the fork server's life to the
scheduler's.

- torch, the worker modules, and what building an OPTModel on the meta device imports
  lazily on first use (torch._dynamo, through the init functions): about 4 s of CPU that
  each forked worker then skips.
- Linux ``PR_SET_PDEATHSIG``: the kernel kills the fork server when the scheduler dies (even
  by kill -9), and its workers, which watch their parent pid, exit right after. SIGTERM is
  ignored here: only the scheduler decides when workers stop. (The fork
  server's own exit on EOF is not enough: its interpreter teardown can block on the
  threads of libraries it imported.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch

import dejavu.workers.main  # noqa: F401
import dejavu.workers.worker  # noqa: F401

torch.empty(1, device="meta").normal_()

# A SIGTERM to the launch's whole process group (systemd's default stop, `timeout`) must not
# take this server, and with it every worker (they watch their parent), from under the
# scheduler's drain: the scheduler stops the workers, and the kernel kills this server when
# the scheduler dies. Forked workers inherit the disposition (run_worker sets it too).
signal.signal(signal.SIGTERM, signal.SIG_IGN)

_PR_SET_PDEATHSIG = 1
if sys.platform == "linux":
    _parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl: workers still watch
        pass
    if os.getppid() != _parent:  # the scheduler died before the call took effect
        os._exit(1)
