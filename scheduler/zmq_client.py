"""The client API of a running cluster, over ZeroMQ (a DEALER to the scheduler's ROUTER).

``PipelineConnection`` is synchronous (``generate --connect``, ``chat``, tests):
``submit``/``events``/``abort``/``health``, and ``stream``/``run`` built on them.
``PipelineClient`` is the asyncio implementation of the engine-client protocol used by the
HTTP server: ``generate`` yields ``Event``s, ``abort``, ``health``.

Keys: ``keys_dir`` when given; else the per-cluster keys that ``launch`` made in its run
directory (the ipc address's own directory, then ``run_dir`` or the default one), if it
made any; else none (a cluster of ipc sockets in its private directory needs none).

``PipelineClient`` outlives the cluster it serves when it did not start it (``serve
--connect``): when the connection closes, the scheduler says it stops, or it falls silent,
open requests fail, ``health`` says so (not ok, no worker alive), and it reconnects once a
second (with the keys found anew: a restarted launch makes new ones) until a ready
scheduler answers.

Nothing waits forever: when the scheduler has been silent for ``silence_s`` while requests
are open, the client asks for health (again every ``silence_s``: one lost query or answer
must not pass for a dead scheduler), and after ``dead_s`` of silence it raises
``SchedulerGone``. A scheduler that stops says so (``Health(state="stopped")``, with why):
the client then raises at once, with that reason.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ..runtime import wire
from ..runtime.build import density_report
from ..runtime.sampling import SamplingParams
from .core import Event, RequestError, Scheduler, SchedulerConfig
from .engine import Completion, fold_event, submit_all
from .rundir import find_curve
from .transport import CLIENT_MAX_BYTES, Curve, TransportError, make_socket

SEND_TIMEOUT_MS = 5000
log = logging.getLogger("dejavu.client")


class SchedulerGone(ConnectionError):
    """The scheduler stopped answering; open requests will never finish."""


def _socket(ctx: zmq.Context, address: str, curve: Curve | None) -> zmq.Socket:
    sock = make_socket(ctx, zmq.DEALER, CLIENT_MAX_BYTES, curve=curve)
    # With no connected scheduler (not started, gone, or our keys refused) a send would
    # block forever: give up after a while instead (zmq.Again -> SchedulerGone).
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    sock.connect(address)
    return sock


class PipelineConnection:
    def __init__(self, address: str, *, keys_dir: str | None = None, run_dir: str | None = None,
                 silence_s: float = 3.0, dead_s: float = 15.0) -> None:
        self.address = address
        self.curve = find_curve(address, keys_dir, run_dir)
        self.ctx = zmq.Context()
        self.sock = _socket(self.ctx, address, self.curve)
        self.silence_s = silence_s
        self.dead_s = dead_s
        self.open: set[str] = set()
        self._health: wire.Health | None = None
        self._stopped: str | None = None  # the reason a stopping scheduler gave
        self._stash: list[Event] = []  # events that arrived while waiting for health
        self._heard = False
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _send(self, message) -> None:
        try:
            self.sock.send(wire.encode(message))
        except zmq.Again:
            raise SchedulerGone(f"cannot reach a scheduler at {self.address} (not running, "
                                "or it refused this client's keys)") from None

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               request_id: str | None = None) -> str:
        rid = request_id or f"{self._prefix}-{next(self._ids)}"
        self._send(wire.Generate(rid, list(prompt), params))
        self.open.add(rid)
        return rid

    def abort(self, request_id: str) -> None:
        self._send(wire.Abort(request_id))

    def health(self, timeout_s: float = 5.0) -> wire.Health:
        self._health = None
        try:
            self.sock.send(wire.encode(wire.HealthQuery()), zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(min(timeout_s, 0.1))
            raise TimeoutError(f"no health answer from {self.address}: not connected") from None
        deadline = time.monotonic() + timeout_s
        pending: list[Event] = []
        while self._health is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._stash += pending
                raise TimeoutError(f"no health answer from {self.address} within {timeout_s:g} s")
            pending += self._recv(left)
        self._stash += pending
        return self._health

    def events(self, timeout_s: float | None = None) -> list[Event]:
        """The events that arrive next (waits up to ``timeout_s``; None: until some come or
        the scheduler is declared gone)."""
        if self._stash:
            stash, self._stash = self._stash, []
            return stash
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_heard = time.monotonic()
        asked_at: float | None = None
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return []
            wait = min(0.5, deadline - now) if deadline is not None else 0.5
            got = self._recv(wait)
            if got:
                return got
            if self._stopped is not None and self.open:
                raise SchedulerGone(f"the pipeline at {self.address} stopped: {self._stopped}; "
                                    f"{len(self.open)} request(s) lost")
            if self._heard:
                last_heard, asked_at = time.monotonic(), None
                continue
            now = time.monotonic()
            silent = now - last_heard
            if self.open and silent > self.dead_s:
                raise SchedulerGone(f"the scheduler at {self.address} has not answered for "
                                    f"{silent:.1f} s; {len(self.open)} request(s) lost")
            # Ask again while the silence lasts: a query or answer lost once (a send refused
            # while reconnecting, a loaded machine) must not end a live connection.
            if self.open and silent > self.silence_s and (
                    asked_at is None or now - asked_at >= self.silence_s):
                try:
                    self.sock.send(wire.encode(wire.HealthQuery()), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # not connected: the silence check above will give up
                asked_at = now

    def _recv(self, timeout_s: float) -> list[Event]:
        self._heard = False
        if not self.sock.poll(max(1, int(timeout_s * 1000))):
            return []
        events: list[Event] = []
        while self.sock.poll(0):
            try:
                msg = wire.decode_reply(self.sock.recv())
            except wire.WireError:
                continue
            self._heard = True
            if isinstance(msg, wire.Health):
                self._health = msg
                self._stopped = ((msg.detail or "the cluster stopped") if msg.state == "stopped"
                                 else None)
            else:
                for event in msg.events:
                    if event.finished:
                        self.open.discard(event.request_id)
                    events.append(event)
        return events

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[Event]:
        """One request's events as they come; closing the iterator early aborts it."""
        rid = self.submit(prompt, params)
        finished = False
        others: list[Event] = []
        try:
            while not finished:
                for event in self.events():
                    if event.request_id == rid:
                        yield event
                        finished = finished or event.finished
                    else:
                        others.append(event)
        finally:
            self._stash = others + self._stash  # other requests' events stay readable
            if not finished:
                self.abort(rid)
                self.open.discard(rid)

    def run(self, prompts: Sequence[Sequence[int]],
            params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Many requests at once; completions in the order of ``prompts``."""
        done, order = submit_all(prompts, params, self.submit)
        remaining = set(order)
        others: list[Event] = []
        try:
            while remaining:
                for event in self.events():
                    if event.request_id in done:
                        fold_event(done[event.request_id], event)
                        if event.finished:
                            remaining.discard(event.request_id)
                    else:
                        others.append(event)
        finally:
            self._stash = others + self._stash  # other requests' events stay readable
        return [done[rid] for rid in order]

    def close(self) -> None:
        for rid in list(self.open):
            try:
                self.sock.send(wire.encode(wire.Abort(rid)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> PipelineConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PipelineClient:
    """The engine-client protocol (``scheduler.client.EngineClient``) over a running
    cluster, for asyncio front ends such as the HTTP server. Given the ``cluster``
    (scheduler/launch.py) it started, it watches that process and stops it on ``close``."""

    def __init__(self, address: str, *, keys_dir: str | None = None, run_dir: str | None = None,
                 dead_s: float = 10.0, cluster=None, timeout_s: float = 10.0) -> None:
        self.address = address
        self.keys_dir = keys_dir
        self.run_dir = run_dir
        self.dead_s = dead_s
        self.cluster = cluster
        with PipelineConnection(address, keys_dir=keys_dir, run_dir=run_dir) as probe:
            first = probe.health(timeout_s=timeout_s)
        self._health = first
        self.max_len = first.max_len
        self.vocab_size = first.vocab_size
        self._validator = Scheduler(
            SchedulerConfig(max_slots=1, max_len=first.max_len, vocab_size=first.vocab_size),
            detokenizer_factory=(lambda: None) if first.tokenizer else None)
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket
        self._monitor: zmq.asyncio.Socket | None = None
        self._connect()
        self.queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._last_heard = time.monotonic()
        self._dead: str | None = None  # for good: the cluster this client started is gone
        self._down: str | None = None  # for now: reconnecting to a cluster started elsewhere
        self._stats = {"requests": 0, "tokens": 0, "failures": 0, "started": time.time()}

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    def _connect(self) -> None:
        """A fresh socket (what the old one still held is dropped with it) and a monitor
        that reports its connection closing."""
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
            self.sock.close(linger=0)
        try:
            curve = find_curve(self.address, self.keys_dir, self.run_dir)
        except TransportError:
            if self._monitor is None:
                raise
            curve = None  # keys half written by a launch starting now: the next try reads them
        self.sock = _socket(self.ctx, self.address, curve)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.asyncio.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    async def _read(self) -> None:
        next_probe = 0.0
        while self._dead is None:
            now = time.monotonic()
            if now >= next_probe:  # health once a second: liveness and fresh stats
                if self._down is not None:
                    self._connect()
                try:
                    self.sock.send(wire.encode(wire.HealthQuery()), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # not connected: the silence check decides
                next_probe = now + 1.0
            if self.cluster is not None and self.cluster.proc.poll() is not None:
                self._die(f"the pipeline exited with code {self.cluster.proc.returncode}")
                return
            if self._down is None and now - self._last_heard > self.dead_s:
                self._lost(f"it has not answered for {now - self._last_heard:.1f} s")
                continue
            ready = dict(await self._poller.poll(200))
            # A reply already waiting is read before a disconnect is believed: the scheduler's
            # last Health(stopped) names why it went, and the poll returns both at once.
            if self._monitor in ready and self.sock not in ready:
                event = parse_monitor_message(await self._monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED and self._down is None:
                    self._lost("the connection closed")
                continue
            if self.sock not in ready:
                continue
            try:
                msg = wire.decode_reply(await self.sock.recv())
            except wire.WireError:
                continue
            self._last_heard = time.monotonic()
            if isinstance(msg, wire.Health):
                self._health = msg
                if msg.state == "stopped" and self._down is None:
                    self._lost(f"it stopped: {msg.detail}")
                elif self._down is not None and msg.state == "ready":
                    log.warning("reconnected to the pipeline at %s", self.address)
                    self._down = None
                continue
            for event in msg.events:
                if event.token is not None:
                    self._stats["tokens"] += 1
                if event.finish_reason == "error":
                    self._stats["failures"] += 1
                queue = self.queues.get(event.request_id)
                if queue is not None:
                    queue.put_nowait(event)

    def _lost(self, why: str) -> None:
        """The scheduler is gone: for good if this client started it, else until it (or a
        new launch on the same address) answers again."""
        message = f"lost the pipeline at {self.address}: {why}"
        if self.cluster is not None:
            return self._die(message)
        from .client import EngineDeadError

        log.warning("%s; reconnecting", message)
        self._down = message
        self._connect()  # nothing the old connection still holds may pass for the new one
        for queue in self.queues.values():
            queue.put_nowait(EngineDeadError(message))

    def _die(self, message: str) -> None:
        from .client import EngineDeadError

        self._dead = message
        for queue in self.queues.values():
            queue.put_nowait(EngineDeadError(message))

    async def generate(self, prompt: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[Event]:
        from .client import EngineDeadError

        if self._dead or self._down:
            raise EngineDeadError(self._dead or self._down)
        self._validator.validate(list(prompt), params)  # RequestError: nothing is sent
        if request_id in self.queues:
            raise RequestError(f"request id {request_id!r} is already in use")
        self._ensure_reader()
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        self._stats["requests"] += 1
        finished = False
        try:
            try:
                await asyncio.wait_for(self.sock.send(wire.encode(
                    wire.Generate(request_id, list(prompt), params))), SEND_TIMEOUT_MS / 1000)
            except TimeoutError:
                self._die(f"cannot reach the scheduler at {self.address}")
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self.queues.pop(request_id, None)
            if not finished and self._dead is None:  # the consumer went away: stop computing
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        try:
            self.sock.send(wire.encode(wire.Abort(request_id)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # not connected: nothing runs for this request anyway

    def health(self):
        from .client import EngineHealth

        h = self._health
        gone = self._dead or self._down
        workers = [{"worker": w.index, "alive": w.state == "ready" and not gone,
                    "restarts": w.restarts, "pid": w.pid, "layers": list(w.layers),
                    "device": w.device, **_worker_stats(w)} for w in h.workers]
        ok = gone is None and h.state == "ready"
        return EngineHealth(ok, gone or h.state, workers)

    def stats(self) -> dict:
        h = self._health
        out = dict(self._stats, running=len(self.queues), tokens_per_s=h.tokens_per_s,
                   stage_ms=[s * 1000 for s in h.stage_s], hop_ms=[s * 1000 for s in h.hop_s],
                   queue_ms=[s * 1000 for s in h.queue_s])
        if h.layer_densities:  # measured densities, as generate --json has them
            out["sparsity"] = density_report(h.layer_densities)
        return out

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)


def _worker_stats(w) -> dict:
    """A worker's latest heartbeat stats (busy fraction, lookahead counts), if any came."""
    stats = getattr(w, "stats", None)
    if stats is None:
        return {}
    return {"busy_fraction": stats.busy_fraction, "ahead_used": stats.ahead_used,
            "ahead_wasted": stats.ahead_wasted, "prefetch_used": stats.prefetch_used,
            "prefetch_wasted": stats.prefetch_wasted}
