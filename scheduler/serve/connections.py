"""HTTP connections that cannot pin the server: a cap on open connections, deadlines on
request headers and bodies, and logs that do not repeat themselves.

uvicorn's h11 protocol closes a keep-alive connection that stays idle after a response,
but not one that never sends a byte, trickles its headers or stalls in its body; and its
``limit_concurrency`` answers 503 to every request (``/health`` too) once enough sockets
are open, idle or not. Here, per server (``guarded_protocol``):

- a connection waiting for its request (new, keep-alive, or headers still arriving) is
  *idle*; at ``max_connections`` a new connection closes an idle one: the oldest of those
  that never completed a request, else the longest-idle keep-alive one. A flood of silent
  sockets then churns among itself and cannot crowd out real clients (their keep-alive
  connections have served a request); only when every connection has a request in
  progress is the new one refused (503, Retry-After);
- headers must arrive within ``header_timeout_s`` of the connection or of their first
  byte after a keep-alive pause, and the body within ``body_timeout_s`` of the headers;
  a late client gets 408 and the connection is closed (the app sees a disconnect);
- ``RepeatFilter`` lets a few identical log records through per window and counts the
  rest, so a flood of one error cannot fill the disk.

What this module does not know: the application (routes, the engine) or the settings file.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("dejavu.serve")



def _raw(status: str, body: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for connections no request
    cycle owns (h11 refuses to send a response before a request)."""
    lines = [f"HTTP/1.1 {status}", "content-type: text/plain; charset=utf-8", *headers,
             "connection: close", f"content-length: {len(body.encode())}", "", body]
    return "\r\n".join(lines).encode()


_408 = _raw("408 Request Timeout", "the request did not arrive in time")
_503 = _raw("503 Service Unavailable", "every connection has a request in progress; retry",
            "retry-after: 1")
# File descriptors kept for everything that is not a client connection (the listening
# socket, the engine's or the pipeline's sockets, logs, checkpoint files being read).
RESERVED_FDS = 64


class Guard:
    """What the connections of one server share: the idle ones, oldest first, and counts."""

    def __init__(self, max_connections: int, header_timeout_s: float,
                 body_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        # Idle connections, oldest first (dicts keep insertion order): those that never
        # completed a request, and keep-alive ones that did (evicted only after the first).
        self.fresh: dict[GuardedH11Protocol, None] = {}
        self.kept: dict[GuardedH11Protocol, None] = {}
        # Connections the guard closed (evicted, timed_out) or refused, since start.
        self.counts = {"evicted": 0, "refused": 0, "timed_out": 0}

    def stats(self) -> dict[str, int]:
        """What /metrics shows: idle connections now, and the counts since start."""
        return {"idle": len(self.fresh) + len(self.kept), **self.counts}

    def oldest_idle(self) -> GuardedH11Protocol | None:
        return next(iter(self.fresh), None) or next(iter(self.kept), None)

    def busy(self, conn: GuardedH11Protocol) -> None:
        self.fresh.pop(conn, None)
        self.kept.pop(conn, None)


class GuardedH11Protocol(H11Protocol):
    guard: Guard  # set on the per-server subclass that ``guarded_protocol`` makes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self._phase = ""  # "headers" or "body": what the armed timer waits for
        self._refused = False
        guard = self.guard
        if len(self.connections) >= guard.max_connections:
            victim = guard.oldest_idle()
            if victim is None:
                self._refused = True
                guard.counts["refused"] += 1
                log.warning("connection refused: all %d connections have a request in "
                            "progress ([serve] max_connections)", guard.max_connections)
                transport.write(_503)
                transport.close()
                return
            guard.counts["evicted"] += 1
            log.info("closed an idle connection to make room for a new one "
                     "([serve] max_connections = %d)", guard.max_connections)
            victim._drop()
        super().connection_made(transport)
        guard.fresh[self] = None
        self._arm("headers", guard.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        self.guard.busy(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # headers still arriving (after a keep-alive pause too)
            if self._phase != "headers":
                self._arm("headers", self.guard.header_timeout_s)
        elif state is h11.SEND_BODY:
            self.guard.busy(self)
            if self._phase != "body":
                self._arm("body", self.guard.body_timeout_s)
        else:  # the whole request is in: the app has it
            self.guard.busy(self)
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer (idle_timeout_s)
        if not self.transport.is_closing():
            self._disarm()
            self.guard.busy(self)
            self.guard.kept[self] = None  # idle again, since now

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, ""

    def _expired(self, phase: str) -> None:
        self._timer, self._phase = None, ""
        if self.transport.is_closing():
            return
        self.guard.counts["timed_out"] += 1
        log.info("closing a connection whose request %s did not arrive in time "
                 "([serve] %s_timeout_s)", phase, "header" if phase == "headers" else "body")
        self.transport.write(_408)
        self._drop()

    def _drop(self) -> None:
        """Close now; the connection stops counting at once (its fd is freed on the loop's
        next turn)."""
        self._disarm()
        self.guard.busy(self)
        self.connections.discard(self)
        self.transport.close()


def guarded_protocol(guard: Guard) -> type[GuardedH11Protocol]:
    """A protocol class for one server (uvicorn.Config(http=...)) and its own Guard."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


def fit_file_limit(max_connections: int) -> int:
    """Raise this process's soft limit on open files toward the hard one so that
    `max_connections` sockets fit beside RESERVED_FDS; returns the connection cap that
    does fit (lower than asked, with a warning, when the hard limit is too low)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + RESERVED_FDS
    if want > soft:
        new_soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if want > soft:
        fitted = max(1, soft - RESERVED_FDS)
        log.warning("[serve] max_connections = %d does not fit the open-file limit %d "
                    "(ulimit -n) with %d files reserved: capping connections at %d",
                    max_connections, soft, RESERVED_FDS, fitted)
        return fitted
    return max_connections


class RepeatFilter(logging.Filter):
    """Lets `burst` records alike (same logger, level, first line, exception type) through
    per `window_s` seconds and drops the rest; the first record let through after a drop
    says how many were dropped."""

    MAX_KEYS = 1024  # distinct messages remembered; forgotten all at once beyond

    def __init__(self, burst: int = 5, window_s: float = 60.0, clock=time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._seen: dict[tuple, list] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, record.getMessage().split("\n", 1)[0], exc)
        now = self.clock()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            dropped = entry[2] if entry else 0
            if len(self._seen) >= self.MAX_KEYS:
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} ({dropped} more like this were not logged)"
            return True
        if entry[1] < self.burst:
            entry[1] += 1
            return True
        entry[2] += 1
        return False


def install_repeat_filter(names=("asyncio", "uvicorn", "uvicorn.error", "dejavu.serve"),
                          **kwargs) -> RepeatFilter:
    """One RepeatFilter on each named logger (a logger's filters see only the records made
    on it, not those its children pass up)."""
    repeat = RepeatFilter(**kwargs)
    for name in names:
        logging.getLogger(name).addFilter(repeat)
    return repeat
