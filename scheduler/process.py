"""The scheduler process: workers on one side, clients on the other, one loop between.

One thread polls two ROUTER sockets every 50 ms at most:
- control: the workers' DEALERs (``w<i>`` for steps and handshakes, ``w<i>.hb`` for
  heartbeats, answered with acks);
- client: the ZMQ client API (``Generate``/``Abort``/``HealthQuery`` in, ``Events`` and
  ``Health`` out).
Between polls it checks every worker: the process sentinel (exit seen within one poll),
heartbeat silence (dead after 3 intervals: SIGSTOP) and startup deadlines. A dead worker
fails every admitted request with a "worker died" error naming the worker, pid and signal;
then the cluster either restarts that worker (``restart = "on-failure"``) under a new epoch,
so late messages of the old one are ignored, or stops with a non-zero exit code.

SIGTERM/SIGINT drain: new requests are refused, running ones get ``drain_timeout_s`` to
finish, the rest are aborted, workers are told to stop (and killed if they do not), and
``run`` returns 0. Request state lives in ``MicroBatches``; this module adds the transport.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from ..runtime import wire
from ..runtime.opt_config import OPTConfig
from .batches import MicroBatches, RecentTimes, micro_batch_groups
from .config import PipelineConfig, default_micro_batches, gpu_of
from .core import Event, RequestError, SchedulerConfig
from .planner import Plan
from .rundir import RunDir
from .transport import (
    CLIENT_MAX_BYTES,
    CONTROL_MAX_BYTES,
    Curve,
    HandshakeWatcher,
    ZapHandler,
    check_addresses,
    make_socket,
)

if TYPE_CHECKING:
    from ..workers.spawn import WorkerProcess

log = logging.getLogger("dejavu.scheduler")

POLL_MS = 50
EXIT_WORKER_DIED = 3


@dataclass
class WorkerHandle:
    index: int
    layers: range
    device: str
    data_in: str | None
    data_out: str | None
    proc: WorkerProcess | None = None
    pid: int | None = None
    state: str = "starting"  # starting | loading | ready | dead
    started: float = 0.0
    last_beat: float = 0.0
    restarts: int = 0
    fatal: str | None = None
    ready: wire.Ready | None = None  # what it reported when ready (offloaded layers...)
    stats: wire.WorkerStats | None = None  # from its latest heartbeat (busy fraction...)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class PipelineServer:
    def __init__(self, config: PipelineConfig, plan: Plan, model_config: OPTConfig,
                 run_dir: RunDir, *, tokenizer=None, curve: Curve | None = None) -> None:
        self.densities: list[tuple[float, float]] = []
        self.layer_densities: list[wire.LayerDensity] = []
        self.config = config
        self.plan = plan
        self.model_config = model_config
        self.run_dir = run_dir
        self.curve = curve
        self.max_len = config.max_len or model_config.max_position_embeddings
        self.has_tokenizer = tokenizer is not None
        eos = tokenizer.eos_id if tokenizer is not None else model_config.eos_token_id
        # Workers started elsewhere pick their own device ("auto": their GPU, else CPU).
        devices = config.devices or (default_devices(config.workers) if config.spawn
                                     else ["auto"] * config.workers)
        groups = config.micro_batches or default_micro_batches(config.workers, config.slots,
                                                               devices)
        self.batches = MicroBatches(
            SchedulerConfig(max_slots=config.slots, max_len=self.max_len,
                            vocab_size=model_config.vocab_size, eos_id=eos,
                            prefill_chunk=config.prefill_chunk),
            groups, tokenizer.detokenizer if tokenizer is not None else None)
        if config.workers > 1:
            log.info("micro-batches: %d (steps in flight at most; %s)", groups,
                     "[pipeline] micro_batches" if config.micro_batches else
                     "one more than the devices the workers use, one if they share one GPU")
        self.control_address = config.control_address or run_dir.address("control")
        self.client_address = config.client_address or run_dir.address("client")
        data = config.data_addresses or [run_dir.address(f"data{i}")
                                         for i in range(1, config.workers)]
        check_addresses([self.control_address, self.client_address, *data], curve)
        self.workers = [
            WorkerHandle(i, span, devices[i], data[i - 1] if i > 0 else None,
                         data[i] if i < config.workers - 1 else None)
            for i, span in enumerate(plan.spans())
        ]
        self.ctx = zmq.Context()
        self.zap = ZapHandler(self.ctx, curve.authorized) if curve else None
        if self.zap:
            self.zap.start()
        max_data = self._max_data_bytes()
        self.max_data_bytes = max_data
        self.control = make_socket(self.ctx, zmq.ROUTER, max(CONTROL_MAX_BYTES, max_data),
                                   curve=curve, server=True)
        # A restarted worker reuses its routing id; the new connection takes it over.
        self.control.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.control.bind(self.control_address)
        self.clients = make_socket(self.ctx, zmq.ROUTER, CLIENT_MAX_BYTES, curve=curve,
                                   server=True)
        self.clients.bind(self.client_address)
        run_dir.publish(self.client_address)
        self.handshakes = HandshakeWatcher() if curve else None
        if self.handshakes:
            self.handshakes.watch(self.control, "control")
            self.handshakes.watch(self.clients, "client")
            self.handshakes.start()
        self.client_of: dict[str, bytes] = {}  # request id -> client routing id
        self.epoch = 0
        self.token = secrets.token_hex(16)
        self.state = "starting"
        self.exit_code = 0
        self.stop_requested = 0
        self.drain_deadline: float | None = None
        self.started = time.monotonic()
        self.tokens_out = 0
        self.recent_tokens: deque[tuple[float, int]] = deque()
        self.stage_s: list[float] = []
        self.hop_s: list[float] = []
        self.queue_s: list[float] = []  # per stage: its input's wait for a busy worker
        self.round_trip_s = 0.0  # RunStep sent -> StepDone, less the waits for busy workers
        self._recent = {what: RecentTimes() for what in ("stage", "hop", "queue", "trip")}
        self.step_sent: dict[int, float] = {}  # steps in flight: when each was sent
        self.paged_bytes: list[int] = []  # per stage, since the start (offloaded layers)
        self.bad_frames = 0
        self._last_bad_log = 0.0
        self.parent_pid: int | None = None  # stop when this process stops being the parent
        self.seen_clients: dict[bytes, None] = {}  # told when the cluster stops (bounded)
        self.stop_reason = ""

    def _max_data_bytes(self) -> int:
        c = self.config
        width = min(c.prefill_chunk, self.max_len)
        return c.slots * width * self.model_config.hidden_size * 4 + 1024 * 1024

    # --- lifecycle -------------------------------------------------------------------------

    def run(self, preflight: Callable[[], None] | None = None) -> int:
        """Start the workers, then run ``preflight`` (checkpoint validation: it overlaps
        the workers' imports) and serve until stopped. A preflight error stops everything
        and is logged; the exit code is then 2."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            hint = mps_hint([w.device for w in self.workers]) if self.config.spawn else None
            if hint:
                log.info("%s", hint)
            for w in self.workers:
                self._start_worker(w)
            if preflight is not None:
                try:
                    preflight()
                except Exception as exc:  # noqa: BLE001 - reported, then a clean stop
                    log.error("cannot launch: %s", exc)
                    self.exit_code, self.state = 2, "stopped"
            while self.state != "stopped":
                self._poll_once()
        finally:
            self._stop_workers()
            self._tell_clients()
            self.close()
        return self.exit_code

    def _tell_clients(self) -> None:
        """A last Health(state="stopped") to every client seen, so that front ends report
        the cluster gone at once instead of after a silence timeout."""
        self.state = "stopped"
        final = self.health()
        final.detail = self.stop_reason or "the cluster stopped"
        for identity in self.seen_clients:
            self._send_client(identity, final)

    def _on_signal(self, signum, _frame) -> None:
        self.stop_requested += 1

    def _start_worker(self, w: WorkerHandle) -> None:
        w.state, w.started, w.fatal, w.pid = "starting", time.monotonic(), None, None
        if not self.config.spawn:
            log.info("waiting for worker %d to connect to %s", w.index, self.control_address)
            return
        from ..workers.spawn import WorkerProcess

        argv = ["--index", str(w.index), "--control", self.control_address,
                "--handshake-timeout", str(self.config.handshake_timeout_s)]
        if self.config.keys_dir:
            argv += ["--keys-dir", self.config.keys_dir]
        w.proc = WorkerProcess(argv, f"worker{w.index}")
        w.pid = w.proc.pid
        log.info("started worker %d (pid %d) for layers [%d, %d) on %s", w.index, w.pid,
                 w.layers.start, w.layers.stop, w.device)

    def _poll_once(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.clients, zmq.POLLIN)
        ready = dict(poller.poll(POLL_MS))
        if self.control in ready:
            self._read_control()
        if self.clients in ready:
            for _ in range(1000):
                try:
                    frames = self.clients.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_client(frames)
        self._check_workers()
        self._check_stop()
        if self.state in ("ready", "draining"):
            self._pump()

    def _read_control(self, wait_ms: int = 0) -> None:
        if wait_ms and not self.control.poll(wait_ms):
            return
        for _ in range(1000):  # bounded so clients are never starved
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_control(frames)

    def _check_stop(self) -> None:
        now = time.monotonic()
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("the process that started this launch (pid %d) is gone", self.parent_pid)
            self.parent_pid, self.stop_requested = None, 2
        if self.stop_requested and self.state in ("starting", "ready", "degraded"):
            log.info("stop requested: draining (at most %g s)", self.config.drain_timeout_s)
            self.state = "draining" if self.state == "ready" else "stopping"
            self.drain_deadline = now + self.config.drain_timeout_s
        if self.stop_requested > 1 and self.state == "draining":
            self.drain_deadline = now  # a second Ctrl-C: stop now
        if self.state == "draining" and (not self.batches.has_work()
                                         or now >= (self.drain_deadline or now)):
            if self.batches.has_work():
                log.warning("drain timeout: aborting %d request(s)", self.batches.running()
                            + self.batches.queued())
                self._emit(self.batches.fail_running("the server is shutting down",
                                                     waiting_too=True))
            self.state = "stopping"
        if self.state == "stopping":
            if self.batches.has_work():
                self._emit(self.batches.fail_running("the server is shutting down",
                                                     waiting_too=True))
            self.state = "stopped"

    # --- workers ---------------------------------------------------------------------------

    def _on_control(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return self._bad_frame(f"control message with {len(frames)} frames")
        identity, payload = frames
        w, heartbeat = self._worker_of(identity)
        if w is None:
            return self._bad_frame(f"control message from unknown peer {identity[:32]!r}")
        try:
            msg = wire.decode_worker(payload)
        except wire.WireError as exc:
            return self._bad_frame(str(exc))
        if heartbeat:
            if isinstance(msg, wire.Heartbeat) and w.state == "ready":
                w.last_beat = time.monotonic()
                w.stats = msg.stats if msg.stats is not None else w.stats
                self._send_worker(identity, wire.HeartbeatAck(msg.seq))
            elif isinstance(msg, wire.Fatal):
                w.fatal = msg.reason
            return
        if isinstance(msg, wire.Hello):
            self._on_hello(w, identity, msg)
        elif isinstance(msg, wire.Ready) and w.state == "loading":
            w.state, w.last_beat, w.device, w.ready = "ready", time.monotonic(), msg.device, msg
            log.info("worker %d ready: layers [%d, %d) on %s, %.1f MiB weights, %.1f MiB cache, "
                     "loaded in %.2f s", w.index, *msg.layers, msg.device,
                     msg.param_bytes / 2**20, msg.cache_bytes / 2**20, msg.load_s)
            if msg.offloaded_layers:
                log.info("worker %d: %d layer(s) offloaded (%.1f MiB in host memory), expected "
                         "%.1f MiB on the GPU, %.3f MiB read from the host per token",
                         w.index, msg.offloaded_layers, msg.host_bytes / 2**20,
                         msg.expected_gpu_bytes / 2**20, msg.expected_paged_per_token / 2**20)
            self._forward_planes(w)
            if all(x.state == "ready" for x in self.workers) and self.state in (
                    "starting", "degraded"):
                self.state = "ready"
                log.info("ready: clients connect to %s", self.client_address)
        elif isinstance(msg, wire.StepDone):
            sent = self.step_sent.pop(msg.result.step_id, None)
            if msg.epoch == self.epoch:
                trip = None if sent is None else time.monotonic() - sent - sum(msg.queue_s)
                self._record_timings(msg.stage_s, msg.hop_s, msg.queue_s, trip)
                self.densities = msg.densities or self.densities
                self.layer_densities = msg.layer_densities or self.layer_densities
                self._add_paged(msg.paged_bytes)
                self._emit(self.batches.update(msg.result))
        elif isinstance(msg, wire.StepFailed):
            self.step_sent.pop(msg.step_id, None)
            if msg.epoch == self.epoch:
                self._emit(self.batches.fail_step(
                    msg.step_id, f"step failed on worker {msg.index}: {msg.message}"))
        elif isinstance(msg, wire.Fatal):
            w.fatal = msg.reason
            if msg.cannot_start and self.state not in ("stopping", "stopped"):
                # Bad weights or predictors, as in one process: one line and exit code 2.
                log.error("cannot launch: worker %d: %s", w.index, msg.reason)
                self.exit_code, self.stop_reason = 2, f"worker {w.index}: {msg.reason}"
                self.state = "stopped"

    def _worker_of(self, identity: bytes) -> tuple[WorkerHandle | None, bool]:
        name = identity.decode("ascii", errors="replace")
        heartbeat = name.endswith(".hb")
        name = name.removesuffix(".hb")
        if name.startswith("w") and name[1:].isdigit():
            i = int(name[1:])
            if i < len(self.workers):
                return self.workers[i], heartbeat
        return None, False

    def _on_hello(self, w: WorkerHandle, identity: bytes, msg: wire.Hello) -> None:
        if w.state != "starting" or (w.proc is not None and msg.pid != w.pid):
            log.warning("refused a Hello for worker %d from pid %d (state %s)", w.index,
                        msg.pid, w.state)
            self._send_worker(identity, wire.Shutdown("unexpected worker"))
            return
        if msg.protocol != wire.PROTOCOL:
            self._send_worker(identity, wire.Shutdown(f"protocol {msg.protocol}, expected "
                                                      f"{wire.PROTOCOL}"))
            return
        w.pid, w.state = msg.pid, "loading"
        # A restarted worker keeps only faults tied to a request: one at a step count would
        # fire again at once and the restart could never be seen to work.
        faults = [f for f in self.config.faults if f.worker == w.index
                  and (not w.restarts or f.request is not None)]
        threads = self.config.threads or max(1, (os.cpu_count() or 1) // self.config.workers)
        self._send_worker(identity, wire.Setup(
            self.config.settings, (w.layers.start, w.layers.stop), w.device,
            self.config.slots, self.max_len, w.data_in, w.data_out, self.epoch,
            self.config.heartbeat_s, self.config.watchdog_s, self.config.scheduler_timeout_s,
            self.max_data_bytes, self.token, threads if w.device == "cpu" else 0, faults))

    def _forward_planes(self, w: WorkerHandle) -> None:
        """Once both ends of a hop are ready, the receiver's ring offer goes to the sender
        (again after either restarts: a new receiver has a new ring)."""
        for sender, receiver in ((w.index - 1, w.index), (w.index, w.index + 1)):
            if sender < 0 or receiver >= len(self.workers):
                continue
            a, b = self.workers[sender], self.workers[receiver]
            if a.state == b.state == "ready" and b.ready is not None:
                self._send_worker(f"w{sender}".encode(),
                                  wire.PeerPlane(b.ready.plane, b.ready.plane_note))

    def _send_worker(self, identity: bytes, message) -> bool:
        try:
            self.control.send_multipart([identity, wire.encode(message)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # gone (ROUTER_MANDATORY) or full: the checks handle it
            return False

    def _check_workers(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.state == "dead":
                continue
            reason = None
            if w.proc is not None and (rc := w.proc.poll()) is not None:
                if w.fatal is None and rc > 0:  # it chose to exit: its last words (Fatal)
                    self._read_control(wait_ms=100)  # may not have been read yet
                if self.state == "stopped":  # they said it cannot start: not a death
                    return
                reason = w.fatal or describe_exit(rc)
            elif w.state == "ready" and now - w.last_beat > 3 * self.config.heartbeat_s:
                reason = w.fatal or (
                    f"stopped responding (no heartbeat for {now - w.last_beat:.1f} s)")
            elif w.state in ("starting", "loading") and now - w.started > (
                    self.config.startup_timeout_s if w.state == "loading"
                    else self.config.handshake_timeout_s + self.config.startup_timeout_s):
                reason = "did not become ready within the startup timeout"
            if reason is not None:
                self._on_death(w, reason)

    def _on_death(self, w: WorkerHandle, reason: str) -> None:
        who = f"worker {w.index} (pid {w.pid})"
        if w.proc is not None:
            if w.proc.poll() is None:
                w.proc.kill()  # frozen or hung: make the verdict final
                w.proc.wait(timeout=5)
            w.proc.close()
        w.state = "dead"
        message = f"worker died: {who} {reason}"
        log.error("%s", message)
        restart = self.config.restart == "on-failure" and w.restarts < self.config.max_restarts \
            and self.state not in ("draining", "stopping", "stopped")
        self.epoch += 1
        self.step_sent.clear()  # the steps in flight fail with the epoch
        self._emit(self.batches.fail_running(message, waiting_too=not restart))
        if restart:
            w.restarts += 1
            self.state = "degraded"
            for other in self.workers:
                if other.state == "ready":
                    self._send_worker(f"w{other.index}".encode(), wire.SetEpoch(self.epoch))
            log.info("restarting worker %d (restart %d of %d)", w.index, w.restarts,
                     self.config.max_restarts)
            self._start_worker(w)
        else:
            self.exit_code = EXIT_WORKER_DIED
            self.stop_reason = message
            self.state = "stopped"

    def _stop_workers(self) -> None:
        for w in self.workers:
            if w.state != "dead":
                self._send_worker(f"w{w.index}".encode(), wire.Shutdown("the cluster is stopping"))
        deadline = time.monotonic() + 5.0
        for w in self.workers:
            if w.proc is None or w.state == "dead":  # a dead worker was reaped already
                continue
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d (pid %d) did not stop; killing it", w.index, w.pid)
                w.proc.kill()
                w.proc.wait(timeout=5)

    # --- steps -----------------------------------------------------------------------------

    def _pump(self) -> None:
        first = b"w0"
        for step in self.batches.schedule():
            self.step_sent[step.step_id] = time.monotonic()
            if not self._send_worker(first, wire.RunStep(self.epoch, step,
                                                         sent_at=time.time())):
                self.step_sent.pop(step.step_id, None)
                self._emit(self.batches.fail_step(step.step_id, "worker 0 is unreachable"))

    def _record_timings(self, stage_s: list[float], hop_s: list[float],
                        queue_s: list[float], round_trip_s: float | None = None) -> None:
        # Medians of the recent steps (batches.RecentTimes: one-off costs of a first step,
        # a kernel compiled on one worker, do not linger in them).
        self.stage_s = self._recent["stage"].add(stage_s)
        self.hop_s = self._recent["hop"].add(hop_s)
        self.queue_s = self._recent["queue"].add(queue_s)
        if round_trip_s is not None:
            self.round_trip_s = self._recent["trip"].add([max(0.0, round_trip_s)])[0]
        # Re-sized as the times move: enough steps in flight that no stage waits. The waits
        # for busy workers are left out: they grow with the steps in flight themselves.
        self.batches.set_in_flight(micro_batch_groups(self.stage_s, self.hop_s,
                                                      most=len(self.batches.cores),
                                                      round_trip_s=self.round_trip_s))

    def _add_paged(self, paged: list[int]) -> None:
        if len(self.paged_bytes) != len(paged):
            self.paged_bytes = [0] * len(paged)
        self.paged_bytes = [a + b for a, b in zip(self.paged_bytes, paged, strict=True)]

    # --- clients ---------------------------------------------------------------------------

    def _on_client(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return self._bad_frame(f"client message with {len(frames)} frames")
        identity, payload = frames
        try:
            msg = wire.decode_client(payload)
        except wire.WireError as exc:
            return self._bad_frame(str(exc))
        self.seen_clients[identity] = None
        if len(self.seen_clients) > 1024:  # forget the oldest
            del self.seen_clients[next(iter(self.seen_clients))]
        if isinstance(msg, wire.HealthQuery):
            self._send_client(identity, self.health())
        elif isinstance(msg, wire.Generate):
            self._on_generate(identity, msg)
        elif isinstance(msg, wire.Abort):
            if self.client_of.get(msg.request_id) == identity:
                self._emit(self.batches.abort(msg.request_id))

    def _on_generate(self, identity: bytes, msg: wire.Generate) -> None:
        def refuse(error: str) -> None:
            self._send_client(identity, wire.Events([Event(
                msg.request_id, finished=True, finish_reason="error", error=error)]))

        if self.state not in ("starting", "ready", "degraded"):
            return refuse("the server is shutting down")
        if not msg.request_id or len(msg.request_id) > 256:
            return refuse("request_id must be 1 to 256 characters")
        try:
            self.batches.add(msg.request_id, msg.prompt, msg.params)
        except RequestError as exc:
            return refuse(str(exc))
        self.client_of[msg.request_id] = identity

    def _emit(self, events: list[Event]) -> None:
        by_client: dict[bytes, list[Event]] = {}
        for event in events:
            if event.token is not None:
                self.tokens_out += 1
            identity = self.client_of.get(event.request_id)
            if event.finished:
                self.client_of.pop(event.request_id, None)
            if identity is not None:
                by_client.setdefault(identity, []).append(event)
        now = time.monotonic()
        self.recent_tokens.append((now, self.tokens_out))
        while self.recent_tokens and now - self.recent_tokens[0][0] > 10.0:
            self.recent_tokens.popleft()
        for identity, evs in by_client.items():
            if not self._send_client(identity, wire.Events(evs)):
                # The client is gone: nobody will read these requests' tokens.
                for rid in [r for r, c in self.client_of.items() if c == identity]:
                    self.client_of.pop(rid, None)
                    self.batches.abort(rid)

    def _send_client(self, identity: bytes, message) -> bool:
        try:
            self.clients.send_multipart([identity, wire.encode(message)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def health(self) -> wire.Health:
        rate = 0.0
        if len(self.recent_tokens) >= 2:
            (t0, n0), (t1, n1) = self.recent_tokens[0], self.recent_tokens[-1]
            rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return wire.Health(
            self.state,
            [wire.WorkerInfo(w.index, w.pid, (w.layers.start, w.layers.stop), w.device, w.state,
                             w.restarts, **_offload_info(w.ready), stats=w.stats)
             for w in self.workers],
            self.batches.running(), self.batches.queued(), self.tokens_out,
            time.monotonic() - self.started, rate, list(self.stage_s), list(self.hop_s),
            list(self.queue_s),
            self.config.model, self.max_len, self.model_config.vocab_size,
            self.has_tokenizer, list(self.densities), list(self.layer_densities),
            list(self.paged_bytes), micro_batches=len(self.batches.cores),
            round_trip_s=self.round_trip_s,
            in_flight_peak=self.batches.peak)

    def _bad_frame(self, what: str) -> None:
        self.bad_frames += 1
        now = time.monotonic()
        if now - self._last_bad_log > 5.0:
            self._last_bad_log = now
            log.warning("dropped a bad frame (%d so far): %s", self.bad_frames, what[:200])

    def close(self) -> None:
        if self.handshakes:
            self.handshakes.stop()
        self.control.close(linger=0)
        # At most 0.2 s for the last Health(stopped) that _tell_clients queued: with none the
        # clients see only a closed connection, not the reason.
        self.clients.close(linger=200)
        if self.zap:
            self.zap.stop()
        self.ctx.term()


def _offload_info(ready: wire.Ready | None) -> dict:
    if ready is None:
        return {}
    return dict(offloaded_layers=ready.offloaded_layers, host_bytes=ready.host_bytes,
                expected_gpu_bytes=ready.expected_gpu_bytes,
                expected_paged_per_token=ready.expected_paged_per_token,
                gpu_bytes=ready.gpu_bytes)


def mps_hint(devices: list[str], environ: dict[str, str] | None = None) -> str | None:
    """A note for the log when workers share a GPU without an MPS daemon: each is then
    its own CUDA context, which the GPU time-slices, and every hop between them waits for
    the switch (an H100, opt-30b hidden, batch 1: 186.7 us a hop as two contexts, 73.1 us
    as MPS clients; bench/results/2026-12-06-h100-80gb-hbm3-paired-hops*.md). None when no
    GPU is shared or a daemon's control pipe is there (``CUDA_MPS_PIPE_DIRECTORY``, by
    default /tmp/nvidia-mps)."""
    env = os.environ if environ is None else environ
    gpus = [gpu for gpu in map(gpu_of, devices) if gpu is not None]
    shared = sorted({g for g in gpus if gpus.count(g) > 1})
    if not shared:
        return None
    pipe_dir = env.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"
    if os.path.exists(os.path.join(pipe_dir, "control")):
        return None
    return (f"workers share {', '.join(shared)} as separate CUDA contexts, which the GPU "
            "time-slices; start the MPS daemon first (nvidia-cuda-mps-control -d) so that "
            "they run as one context (a hop between them measured 187 -> 73 us on an H100)")


def default_devices(workers: int) -> list[str]:
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU
        gpus = 0
    if gpus >= workers:
        return [f"cuda:{i}" for i in range(workers)]
    return ["cpu"] * workers
