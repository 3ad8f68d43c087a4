"""The worker's heartbeat thread: proof of life for the scheduler, and the worker's own
checks on its parent and on steps that never end.

It owns its own DEALER socket (sockets are not thread-safe) and runs beside the compute
thread, so a long but healthy step keeps beating (torch releases the GIL in its ops) while
a frozen process (SIGSTOP) stops beating and is declared dead by the scheduler. It exits
the process itself when:
- its parent (the scheduler that spawned it) is gone: the parent pid changed;
- the scheduler stopped acknowledging beats for ``scheduler_timeout_s`` (remote workers);
- the current step has run past ``watchdog_s``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import zmq

from ..runtime import wire
from ..scheduler.transport import CONTROL_MAX_BYTES, Curve, make_socket

log = logging.getLogger("dejavu.worker")

EXIT_PARENT_GONE = 3
EXIT_WATCHDOG = 4


class HeartbeatThread(threading.Thread):
    def __init__(self, ctx: zmq.Context, address: str, index: int, *, interval_s: float,
                 watchdog_s: float, scheduler_timeout_s: float, parent_pid: int | None,
                 busy: Callable[[], tuple[int, float] | None], curve: Curve | None,
                 stats: Callable[[], wire.WorkerStats] | None = None) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.index = index
        self.interval_s = interval_s
        self.watchdog_s = watchdog_s
        self.scheduler_timeout_s = scheduler_timeout_s
        self.parent_pid = parent_pid
        self.busy = busy
        self.stats = stats
        self.sock = make_socket(ctx, zmq.DEALER, CONTROL_MAX_BYTES, curve=curve)
        self.sock.setsockopt(zmq.IDENTITY, f"w{index}.hb".encode())
        self.sock.connect(address)
        self._halt = threading.Event()

    def run(self) -> None:
        seq = 0
        last_ack = time.monotonic()
        # Check the parent at least twice a second, whatever the beat interval.
        tick = min(self.interval_s, 0.5)
        next_beat = 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            if now >= next_beat:
                busy = self.busy()
                busy_step, busy_s = (busy[0], now - busy[1]) if busy else (None, 0.0)
                if busy_s > self.watchdog_s:
                    self._die(EXIT_WATCHDOG, f"step {busy_step} has run {busy_s:.1f} s, past the "
                                             f"{self.watchdog_s:g} s watchdog")
                seq += 1
                stats = self.stats() if self.stats is not None else None
                self._send(wire.Heartbeat(self.index, seq, busy_step, busy_s, stats))
                next_beat = now + self.interval_s
            if self.sock.poll(int(tick * 1000)):
                try:
                    while self.sock.poll(0):
                        frame = self.sock.recv(zmq.NOBLOCK)
                        if isinstance(wire.decode_scheduler(frame), wire.HeartbeatAck):
                            last_ack = time.monotonic()
                except (zmq.ZMQError, wire.WireError):
                    pass
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self._die(EXIT_PARENT_GONE, f"the scheduler (pid {self.parent_pid}) is gone")
            if time.monotonic() - last_ack > self.scheduler_timeout_s:
                self._die(EXIT_PARENT_GONE, f"no answer from the scheduler for "
                                            f"{self.scheduler_timeout_s:g} s")

    def _send(self, message) -> None:
        try:
            self.sock.send(wire.encode(message), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the scheduler is not there (yet); the checks above decide what that means

    def _die(self, code: int, reason: str) -> None:
        log.error("worker %d exiting: %s", self.index, reason)
        self._send(wire.Fatal(self.index, reason))
        time.sleep(0.05)  # let the message leave; LINGER 0 would drop it on exit
        os._exit(code)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2.0)
        self.sock.close(linger=0)
