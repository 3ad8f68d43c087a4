"""A one-line progress bar with rate and ETA, drawn only on a terminal.

``bar = Progress(); bar.start("layer 3/40 forward", total=100_000, unit="tok")``, then
``bar.advance(n)`` as work is done and ``bar.close()``. When the stream is not a terminal
(a log file, a pipe, a test) nothing is drawn: callers log their own summary lines.

What this module does not know: what the work is.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, stream=None, enabled: bool | None = None, width: int = 24,
                 every_s: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self.width, self.every_s = width, every_s
        self.label, self.total, self.unit = "", 0, ""
        self.done, self.t0, self.drawn_at = 0, 0.0, 0.0

    def start(self, label: str, total: int, unit: str = "") -> None:
        self.label, self.total, self.unit = label, max(int(total), 1), unit
        self.done, self.t0, self.drawn_at = 0, time.perf_counter(), 0.0
        self._draw(force=True)

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        self._draw(force=self.done == self.total)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        eta_text = _clock(eta) if eta == eta else "?"  # NaN before the first step
        return (f"{self.label} [{bar}] {self.done}/{self.total} {rate:,.1f} {self.unit}/s "
                f"ETA {eta_text}")

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if force or now - self.drawn_at >= self.every_s:
            self.drawn_at = now
            self.stream.write("\r\x1b[2K" + self.line())
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
