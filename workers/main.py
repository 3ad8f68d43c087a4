"""Entry point of a worker process: ``python -m dejavu.workers.main --index I --control ADDR``.

``launch`` starts one per worker with ``--parent-pid`` (so the worker exits when the
scheduler dies); on another host it is started by hand (or by ``dejavu-run worker``) with
``--keys-dir`` for CURVE. Everything else (model, span, device, addresses) arrives in the
handshake.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys

from ..scheduler.logs import setup_logging
from ..scheduler.rundir import find_curve
from ..scheduler.transport import TransportError
from .worker import run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dejavu-worker", description=__doc__)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--control", required=True, help="the scheduler's control address")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--keys-dir", default=None)
    parser.add_argument("--run-dir", default=None,
                        help="where a local launch made its keys (default: the default run dir)")
    parser.add_argument("--handshake-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    setup_logging(f"worker{args.index}")
    faulthandler.register(signal.SIGUSR1)  # stack dump on demand
    try:
        # Without --keys-dir, a launch of this user on loopback TCP made keys in its run
        # directory: find them there as its clients do.
        curve = find_curve(args.control, args.keys_dir, args.run_dir)
    except TransportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_worker(args.index, args.control, parent_pid=args.parent_pid, curve=curve,
                      handshake_timeout_s=args.handshake_timeout)


def exit_now(code: int) -> None:
    """Every socket is closed by now; skip interpreter teardown, which can block on library
    threads (torch's pools, pyzmq's zero-copy collector) after a clean stop."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
