"""A one-line progress bar on stderr, with rate and time left; drawn only on a terminal
(redirected to a file or a pipe, stderr gets no carriage-return redraws)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO


class Bar:
    """``update(done)`` redraws the line (at most ~50 times, and never faster than 10 Hz);
    the last update ends it with a newline."""

    def __init__(self, desc: str, total: int, unit: str = "it",
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.desc, self.total, self.unit = desc, max(total, 1), unit
        self.started = time.monotonic()
        self._every = max(1, total // 50)
        self._drawn = 0.0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        last = done >= self.total
        if not last and (done % self._every or now - self._drawn < 0.1):
            return
        self._drawn = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else 0.0
        bar = "#" * (30 * done // self.total)
        timing = f"{elapsed:.0f}s" if last else f"{_clock(elapsed)}<{_clock(left)}"
        self.stream.write(f"\r{self.desc} [{bar:<30}] {done}/{self.total} "
                          f"{rate:.1f} {self.unit}/s {timing}" + ("\n" if last else ""))
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def progress(iterable: Iterable, total: int, desc: str, enabled: bool = True) -> Iterator:
    """``iterable``'s items, with a Bar over them when ``enabled`` and on a terminal."""
    bar = Bar(desc, total) if enabled else None
    for i, item in enumerate(iterable, 1):
        yield item
        if bar is not None:
            bar.update(i)
