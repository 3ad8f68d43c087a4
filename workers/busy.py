"""A worker's busy fraction: the part of recent wall time it spent computing steps.

The compute thread marks each step's start and end (``start``/``stop``); the heartbeat
thread reads ``fraction`` over the last ``window_s`` seconds, the step under way counted up
to now. A stage whose fraction stays well below 1 while requests wait is idle waiting on
the others (too few micro-batches in flight, or hops that cost more than its compute).

What this module does not know: what a step is, or sockets.
"""

from __future__ import annotations

import threading
import time
from collections import deque

WINDOW_S = 10.0  # as Health.tokens_per_s: the last ten seconds


class BusyMeter:
    def __init__(self, window_s: float = WINDOW_S, clock=time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError(f"busy window {window_s} s: expected > 0")
        self.window_s = window_s
        self.clock = clock
        self.born = clock()
        self._done: deque[tuple[float, float]] = deque()  # (start, end) of finished steps
        self._running: float | None = None
        self._lock = threading.Lock()  # two threads: the compute thread and the heartbeat

    def start(self) -> None:
        with self._lock:
            self._running = self.clock()

    def stop(self) -> None:
        with self._lock:
            if self._running is not None:
                self._done.append((self._running, self.clock()))
                self._running = None

    def fraction(self) -> float:
        """Busy seconds / wall seconds over the window (or since the meter began, if less),
        in [0, 1]."""
        now = self.clock()
        lo = max(now - self.window_s, self.born)
        with self._lock:
            while self._done and self._done[0][1] <= lo:
                self._done.popleft()
            spans = list(self._done)
            if self._running is not None:
                spans.append((self._running, now))
        busy = sum(min(end, now) - max(start, lo) for start, end in spans if end > lo)
        wall = now - lo
        return min(1.0, max(0.0, busy / wall)) if wall > 0 else 0.0
