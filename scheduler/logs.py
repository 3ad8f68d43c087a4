"""One log format for every process of the cluster: time, role and pid on each line, so
the interleaved output of ``launch`` says who said what."""

from __future__ import annotations

import logging
import sys


def setup_logging(role: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
