"""The worker process: handshake, load one layer span, then serve steps until told to stop.

Life of a worker:
1. connect a DEALER (routing id ``w<i>``) to the scheduler's control ROUTER, send ``Hello``,
   wait at most ``handshake_timeout_s`` for ``Setup`` (else exit 2);
2. load only its layers from the checkpoint (with a GPU budget: on the CPU first, then
   ``fit_budget`` keeps what fits on the GPU and offloads the rest to pinned host memory),
   allocate its KV cache, bind its data input
   (PULL) and connect to the next worker's (PUSH), start the heartbeat thread, send
   ``Ready``;
3. loop: the first worker takes ``RunStep`` from the scheduler, the others take
   ``Activations`` from the previous worker; each step runs through ``StageRunner`` and
   goes on to the next worker, or back to the scheduler as ``StepDone`` from the last one.
   Between workers of one host the tensors go through the receiver's shared ring
   (``data_plane``: offered in ``Ready``, opened on ``PeerPlane``), else on the socket.
   Messages from an older epoch (before another worker was restarted) are dropped, and so
   is any frame that does not decode (logged, rate-limited): a bad frame never stops it.

What this module does not know: the model math (``Stage``) or scheduling decisions.
"""

from __future__ import annotations

import hmac
import logging
import os
import signal
import socket
import time

import torch
import zmq

from ..runtime import wire
from ..runtime.build import BuildError, build_stage
from ..runtime.checkpoint import CheckpointError
from ..runtime.offload import describe_report
from ..runtime.opt_config import ConfigError
from ..runtime.predictors import PredictorError
from ..runtime.selection import SelectionError
from ..runtime.sparse_backend import BackendError
from ..runtime.step import Step, StepResult
from ..runtime.weight_store import PlacementError
from ..scheduler.transport import CONTROL_MAX_BYTES, Curve, ZapHandler, make_socket
from . import data_plane
from .ahead import Inbox, Outbox
from .busy import BusyMeter
from .faults import FaultHook
from .heartbeat import HeartbeatThread
from .runner import StageRunner, StepOOM

log = logging.getLogger("dejavu.worker")

EXIT_HANDSHAKE = 2
EXIT_CANNOT_LOAD = 2

# What a user can fix in the inputs (weights, predictors, budget): one line, not a crash.
LOAD_ERRORS = (CheckpointError, ConfigError, PredictorError, SelectionError, BackendError,
               PlacementError, BuildError)


class HandshakeError(RuntimeError):
    pass


class Worker:
    def __init__(self, index: int, control: str, *, parent_pid: int | None = None,
                 curve: Curve | None = None, handshake_timeout_s: float = 30.0) -> None:
        self.index = index
        self.control_address = control
        self.parent_pid = parent_pid
        self.curve = curve
        self.handshake_timeout_s = handshake_timeout_s
        self.ctx = zmq.Context()
        self.zap = ZapHandler(self.ctx, curve.authorized) if curve else None
        if self.zap:
            self.zap.start()
        self.control = make_socket(self.ctx, zmq.DEALER, CONTROL_MAX_BYTES, curve=curve)
        self.control.setsockopt(zmq.IDENTITY, f"w{index}".encode())
        self.control.connect(control)
        self.data_in: zmq.Socket | None = None
        self.data_out: zmq.Socket | None = None
        self.ring: data_plane.Ring | None = None  # this worker's input slots
        self.spin_s = 0.0  # seconds spun on the ring for the next hop (0: sleep on the socket)
        self.writer: data_plane.SlotWriter | None = None  # the next worker's
        self.socket_hops_in = 0
        self.spin_skipped = 0  # steps after which a message was waiting (nothing to spin for)
        # time.time() when this worker last finished a step: a hop sent before then waited
        # for it (queue), not for the transfer.
        self.free_since = 0.0
        self.epoch = 0
        self.busy: tuple[int, float] | None = None
        self.bad_frames = 0
        self._last_bad_log = 0.0
        self.control_linger_ms = 0
        self.meter = BusyMeter()
        self.inbox: Inbox | None = None
        self.outbox: Outbox | None = None

    # --- startup ---------------------------------------------------------------------------

    def handshake(self) -> wire.Setup:
        self.control.send(wire.encode(wire.Hello(self.index, os.getpid(), socket.gethostname())))
        deadline = time.monotonic() + self.handshake_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.control.poll(int(left * 1000) + 1):
                break
            try:
                msg = wire.decode_scheduler(self.control.recv())
            except wire.WireError as exc:
                self._bad_frame("control", exc)
                continue
            if isinstance(msg, wire.Setup):
                return msg
            if isinstance(msg, wire.Shutdown):
                raise HandshakeError(f"the scheduler refused this worker: {msg.reason}")
        raise HandshakeError(f"no Setup from the scheduler at {self.control_address} within "
                             f"{self.handshake_timeout_s:g} s")

    def load(self, setup: wire.Setup) -> None:
        started = time.perf_counter()
        if setup.device == "auto":
            setup.device = "cuda:0" if torch.cuda.is_available() else "cpu"
        if setup.device == "cpu" and setup.threads > 0:
            torch.set_num_threads(setup.threads)
        device = torch.device(setup.device)
        if device.type == "cuda" and device.index is not None:
            # Triton launches on the current device, and host-memory views (offloaded rows)
            # map on it: make it this worker's GPU, not cuda:0.
            torch.cuda.set_device(device)
        layers = range(*setup.layers)
        settings = setup.settings
        log.info("worker %d loading layers [%d, %d) of %s on %s (%s)", self.index,
                 layers.start, layers.stop, settings.model.path, setup.device,
                 "sparse" if settings.sparsity.enabled else "dense")
        # The same builder as the in-process engine (runtime/build.py): equal settings, equal
        # stage. The planner reserved what fit_gib reserves, so plan and worker agree.
        built = build_stage(settings, layers=layers, device=setup.device, slots=setup.slots,
                            max_len=setup.max_len)
        model, report = built.model, built.report
        self.config = model.config
        if report is not None:
            log.info("worker %d: %s", self.index, describe_report(report))
        self.model = model
        self.offloaded = built.offloaded
        self.paged_total = 0
        cache = built.stage.cache
        self.runner = StageRunner(built.stage, FaultHook(setup.faults))
        # Lookahead across the boundary (workers/ahead.py): send the next stage's first
        # selection ahead of the activations; take the previous stage's.
        lookahead = built.stage.lookahead
        self.inbox = Inbox(built.stage, prefetch=lookahead) if setup.data_in else None
        if lookahead and setup.data_out is not None:
            self.outbox = built.stage.send_ahead = Outbox(self._send_ahead, setup.token)
        self.setup = setup
        self.epoch = setup.epoch
        max_data = setup.max_data_bytes
        if setup.data_in is not None:
            self.data_in = make_socket(self.ctx, zmq.PULL, max_data, curve=self.curve,
                                       server=True)
            self.data_in.bind(setup.data_in)
            self._make_ring(setup, built.stage.selector is not None)
        if setup.data_out is not None:
            self.data_out = make_socket(self.ctx, zmq.PUSH, max_data, curve=self.curve)
            self.data_out.connect(setup.data_out)
        self.heartbeat = HeartbeatThread(
            self.ctx, self.control_address, self.index, interval_s=setup.heartbeat_s,
            watchdog_s=setup.watchdog_s, scheduler_timeout_s=setup.scheduler_timeout_s,
            parent_pid=self.parent_pid, busy=lambda: self.busy, curve=self.curve,
            stats=self.stats)
        self.heartbeat.start()
        params = sum(p.numel() * p.element_size() for p in model.parameters()
                     if not p.is_meta)
        extra = {}
        if report is not None:
            extra = dict(offloaded_layers=len(built.offloaded),
                         host_bytes=int(report["host_record_bytes"]),
                         expected_gpu_bytes=int(report["gpu_bytes"]),
                         expected_paged_per_token=float(report["host_bytes_per_step"]))
        if torch.device(setup.device).type == "cuda":  # what the budget is to be checked on
            extra["gpu_bytes"] = torch.cuda.memory_allocated(setup.device)
        if setup.data_in is not None:
            extra["plane"] = self.ring.offer() if self.ring is not None else None
            extra["plane_note"] = self.plane_note
        self._send(wire.Ready(self.index, setup.layers, setup.device, params, cache.nbytes(),
                              time.perf_counter() - started, **extra))

    def _make_ring(self, setup: wire.Setup, sparse: bool) -> None:
        pipeline = setup.settings.pipeline
        dtype = wire.DTYPES[setup.settings.model.dtype]
        slot_bytes = data_plane.slot_bytes_for(setup.slots, setup.max_len,
                                               self.config.hidden_size, dtype, sparse,
                                               pipeline.data_plane_slot_mib)
        self.ring, self.plane_note = data_plane.make_ring(
            setup.device, pipeline.data_plane_slots, slot_bytes, pipeline.data_plane)
        if self.ring is not None:
            self.spin_s, how = data_plane.spin_seconds(pipeline.data_plane_spin_us)
            log.info("worker %d: its ring is spun on for %s after each step", self.index, how)

    def _open_plane(self, msg: wire.PeerPlane) -> None:
        """The next worker's ring (sent again after it restarts): use it if this worker can."""
        self.writer, how = data_plane.open_writer(msg.offer, msg.note, self.setup.device,
                                                  self.setup.settings.pipeline.data_plane)
        log.info("worker %d -> worker %d: activations through %s", self.index, self.index + 1,
                 how)

    # --- serving ---------------------------------------------------------------------------

    def serve(self) -> str:
        """Run until ``Shutdown``; returns its reason. After a message (while steps come)
        and with a spin set, the next hop is first looked for in the ring itself."""
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        if self.data_in is not None:
            poller.register(self.data_in, zmq.POLLIN)
        spin = self.spin_s if self.ring is not None else 0.0
        active = False
        while True:
            ready = dict(poller.poll(0)) if spin and active else {}
            if spin and active and ready:
                self.spin_skipped += 1  # the next message was here already: no spin
            if spin and active and not ready and self._pick_up(spin):
                continue
            ready = ready or dict(poller.poll(1000))
            active = bool(ready)
            if self.control in ready:
                reason = self._on_control()
                if reason is not None:
                    return reason
            if self.data_in is not None and self.data_in in ready:
                self._on_data()

    def _on_control(self) -> str | None:
        try:
            msg = wire.decode_scheduler(self.control.recv())
            received = time.time()
        except wire.WireError as exc:
            self._bad_frame("control", exc)
            return None
        if isinstance(msg, wire.Shutdown):
            return msg.reason
        if isinstance(msg, wire.SetEpoch):
            self.epoch = max(self.epoch, msg.epoch)
        elif isinstance(msg, wire.PeerPlane):
            if self.data_out is not None:
                self._open_plane(msg)
        elif isinstance(msg, wire.RunStep):
            if self.data_in is not None:
                self._bad_frame("control", wire.WireError("RunStep sent to a middle stage"))
            elif self._current(msg.epoch):
                queue = split_hop(msg.sent_at, self.free_since, received)[1]
                self._run(msg.step, None, None, wire.Activations(
                    msg.epoch, msg.step, "", (0, 0, 0), queue_s=[queue]))
        return None

    def _on_data(self) -> None:
        try:
            self._on_frames(self.data_in.recv_multipart(copy=False))
        finally:
            if self.ring is not None:
                self.ring.release()  # the step that read its slot is issued (or refused)

    def _on_frames(self, frames: list) -> None:
        received = time.time()
        if len(frames) not in (1, 2, 3):
            self._bad_frame("data", wire.WireError(f"{len(frames)} frames, expected 1 to 3"))
            return
        try:
            if len(frames) == 1:  # decoded once: a selection sent ahead, or a slot header
                lone = wire.decode_data(frames[0].buffer)
                if isinstance(lone, wire.SelectionAhead):
                    self._on_ahead(lone)
                    return
                if self.ring is not None and self.ring.seen(lone):
                    return  # the doorbell of a hop already picked up from the ring
                msg, hidden, carry = self._from_ring(lone)
            else:
                msg, hidden, carry = wire.decode_activations(
                    frames[0].buffer, frames[1].buffer, self.config.hidden_size,
                    frames[2].buffer if len(frames) == 3 else None)
                self._check_token(msg)
                self.socket_hops_in += 1
            self._check_dtype(msg)
        except wire.WireError as exc:
            self._bad_frame("data", exc)
            return
        self._run_received(msg, hidden, carry, received)

    def _pick_up(self, spin_s: float) -> bool:
        """Spin up to ``spin_s`` for the next hop in the ring and run it; False if none came
        (or its header travels by the socket only)."""
        header = self.ring.wait_fill(spin_s)
        if header is None:
            return False
        received = time.time()
        try:
            try:
                msg, hidden, carry = self._from_ring(wire.decode_data(header), early=True)
                self._check_dtype(msg)
            except wire.WireError as exc:
                self._bad_frame("data", exc)
                return False
            self._run_received(msg, hidden, carry, received)
        finally:
            self.ring.release()
        return True

    def _check_dtype(self, msg: wire.Activations) -> None:
        dtype = self.setup.settings.model.dtype
        if msg.dtype != dtype:
            raise wire.WireError(f"activations in {msg.dtype}, this worker runs {dtype}")

    def _run_received(self, msg: wire.Activations, hidden, carry, received: float) -> None:
        if self._current(msg.epoch):
            hop, queue = split_hop(msg.sent_at, self.free_since, received)
            msg.hop_s, msg.queue_s = msg.hop_s + [hop], msg.queue_s + [queue]
            self._run(msg.step, hidden, carry, msg)

    def _run(self, step: Step, hidden, carry, upstream: wire.Activations) -> None:
        try:
            self._process(step, hidden, carry, upstream)
        finally:
            self.free_since = time.time()  # a later input waited for this worker until now

    def _check_token(self, msg: wire.Activations) -> None:
        if not hmac.compare_digest(msg.token, self.setup.token):
            raise wire.WireError("activations without this cluster's token")

    def _from_ring(self, header: wire.Activations | wire.SelectionAhead, *, early: bool = False
                   ) -> tuple[wire.Activations, torch.Tensor, torch.Tensor | None]:
        """A header alone (decoded): its tensors wait in a slot of this worker's ring, read
        in place (the caller releases the slot once the step is issued). Only a header with
        the cluster's token may read (and so free) a slot. ``early``: read from the ring
        before its doorbell came."""
        if self.ring is None:
            raise wire.WireError("activations in a slot, but this worker offered no ring")
        msg = self.ring.check(header, self.config.hidden_size)
        self._check_token(msg)
        hidden, carry = self.ring.lend(msg, early=early)
        return msg, hidden, carry

    def _send_activations(self, header: wire.Activations, out: torch.Tensor,
                          carry: torch.Tensor | None) -> None:
        """Through a slot of the next worker's ring when one is free, else on the socket."""
        carry = None if carry is None else carry.to(out.dtype)
        doorbell = self.writer.put(out, carry, header) if self.writer is not None else None
        if doorbell is not None:
            self.data_out.send(doorbell, copy=False)
            return
        frames = [wire.encode(header), wire.tensor_frame(out)]
        if carry is not None:
            frames.append(wire.tensor_frame(carry))
        self.data_out.send_multipart(frames, copy=False)
        if self.writer is not None:
            self.writer.sent_by_socket()

    def _on_ahead(self, lone: wire.SelectionAhead) -> None:
        c = self.config
        try:
            msg = wire.check_ahead(lone, num_heads=c.num_attention_heads, ffn_dim=c.ffn_dim,
                                   num_layers=c.num_hidden_layers)
            if not hmac.compare_digest(msg.token, self.setup.token):
                raise wire.WireError("a selection without this cluster's token")
        except wire.WireError as exc:
            self._bad_frame("data", exc)
            return
        if self._current(msg.epoch):
            self.inbox.receive(msg)

    def _send_ahead(self, msg: wire.SelectionAhead) -> None:
        self.data_out.send(wire.encode(msg))
        if self.writer is not None:
            self.writer.sent_by_socket()

    def _current(self, epoch: int) -> bool:
        if epoch < self.epoch:
            return False  # work from before a restart: its requests have already failed
        self.epoch = epoch
        return True

    def _process(self, step: Step, hidden, carry, upstream: wire.Activations) -> None:
        """Run one step; ``upstream`` carries what earlier stages reported (errors, timings,
        densities); the first stage passes an empty one."""
        started = time.perf_counter()
        self.busy = (step.step_id, time.monotonic())
        self.meter.start()
        given = self.inbox.take(self.epoch, step) if self.inbox is not None else None
        if self.outbox is not None:
            self.outbox.begin(self.epoch, step)
        try:
            step_out, out, carry_out, errors = self.runner.run(step, hidden, upstream.errors,
                                                               carry, given)
        except StepOOM as exc:
            log.error("worker %d: step %d failed: %s", self.index, step.step_id, exc)
            self._send(wire.StepFailed(self.epoch, step.step_id, self.index, str(exc)))
            return
        except Exception as exc:  # a bug in this worker: fail the step, keep serving
            log.exception("worker %d: step %d failed", self.index, step.step_id)
            self._send(wire.StepFailed(self.epoch, step.step_id, self.index,
                                       f"{type(exc).__name__}: {exc}"))
            return
        finally:
            self.busy = None
            self.meter.stop()
            if self.ring is not None:
                # Every read of a slot lent to this step is issued: the slot goes back before
                # the output leaves, so a step the output lets in finds it free.
                self.ring.release()
        stage_s = upstream.stage_s + [time.perf_counter() - started]
        hop_s, queue_s = upstream.hop_s, upstream.queue_s
        densities, layer_densities = upstream.densities, upstream.layer_densities
        stats = self.runner.stage.sparse_stats
        if self.runner.stage.selector is not None:
            densities = densities + [(stats.mlp_density, stats.head_density)]
            layer_densities = layer_densities + stats.per_layer()
        paged = upstream.paged_bytes + [self._paged_since_last()]
        if step_out is None:  # every row failed here: tell the scheduler directly
            self._send(wire.StepDone(self.epoch, StepResult(step.step_id, [], errors),
                                     stage_s, hop_s, queue_s, densities, layer_densities,
                                     paged))
        elif isinstance(out, StepResult):
            self._send(wire.StepDone(self.epoch, out, stage_s, hop_s, queue_s, densities,
                                     layer_densities, paged))
        else:
            header = wire.Activations(self.epoch, step_out, self.setup.settings.model.dtype,
                                      tuple(out.shape), self.setup.token, carry_out is not None,
                                      errors, stage_s, hop_s, queue_s, densities,
                                      layer_densities, paged_bytes=paged,
                                      sent_at=time.time())
            self._send_activations(header, out, carry_out)

    def stats(self) -> wire.WorkerStats:
        """What the heartbeat reports (read from its thread: counters only, no tensors)."""
        used = wasted = 0
        if self.offloaded:
            from ..runtime.offload import prefetch_counts

            used, wasted = prefetch_counts(self.model)
        inbox = self.inbox
        return wire.WorkerStats(self.meter.fraction(), self.meter.window_s,
                                inbox.used if inbox else 0, inbox.wasted if inbox else 0,
                                used, wasted)

    def _paged_since_last(self) -> int:
        """Host bytes the offloaded layers read since the previous step (0 without any)."""
        if not self.offloaded:
            return 0
        from ..runtime.offload import host_bytes_read

        total = host_bytes_read(self.model)
        step, self.paged_total = total - self.paged_total, total
        return step

    def _send(self, message) -> None:
        self.control.send(wire.encode(message))

    def _bad_frame(self, where: str, exc: Exception) -> None:
        self.bad_frames += 1
        now = time.monotonic()
        if now - self._last_bad_log > 5.0:
            self._last_bad_log = now
            log.warning("worker %d dropped a bad %s frame (%d so far): %s", self.index, where,
                        self.bad_frames, exc)

    def cannot_start(self, reason: str) -> None:
        self._send(wire.Fatal(self.index, reason, cannot_start=True))
        self.control_linger_ms = 2000  # the reason must leave before the process does

    def close(self) -> None:
        if getattr(self, "heartbeat", None) is not None:
            self.heartbeat.stop()
        if self.data_in is not None:
            ring = self.ring
            log.info("worker %d received %d hop(s) through its ring, %d through the socket; "
                     "%d picked up from the ring before their doorbell (after a step: %d "
                     "found a message waiting, %d spun out, %d found a fill whose header "
                     "came only by the socket)", self.index, ring.received if ring else 0,
                     self.socket_hops_in, ring.picked if ring else 0, self.spin_skipped,
                     ring.spun_out if ring else 0, ring.boxless if ring else 0)
        if self.ring is not None:
            self.ring.close()
        if self.writer is not None:
            log.info("worker %d sent %d hop(s) through the next worker's ring, %d through "
                     "the socket (ring full or too large)", self.index, self.writer.sent,
                     self.writer.fallbacks)
        for sock in (self.control, self.data_in, self.data_out):
            if sock is not None:
                sock.close(linger=self.control_linger_ms if sock is self.control else 0)
        if self.zap:
            self.zap.stop()
        self.ctx.term()


def split_hop(sent_at: float, free_since: float, received: float) -> tuple[float, float]:
    """One hop's (transfer, queue) seconds: a hop sent while the receiver was still running
    earlier steps (it became free at ``free_since``) waited that long for it, which is the
    pipeline's queue, not the link; the transfer is the rest until ``received``."""
    queue = min(max(0.0, free_since - sent_at), max(0.0, received - sent_at))
    return max(0.0, received - sent_at - queue), queue


def run_worker(index: int, control: str, *, parent_pid: int | None, curve: Curve | None,
               handshake_timeout_s: float) -> int:
    """The worker process's main: returns its exit code."""
    # Ctrl-C reaches the whole process group; the scheduler decides how workers stop. So
    # does a SIGTERM sent to the group (systemd's default, `timeout`) to a worker the launch
    # spawned: the scheduler drains, then stops it (and it dies with its parent anyway). A
    # worker started by hand keeps SIGTERM's default.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = Worker(index, control, parent_pid=parent_pid, curve=curve,
                    handshake_timeout_s=handshake_timeout_s)
    try:
        try:
            setup = worker.handshake()
        except HandshakeError as exc:
            log.error("worker %d: %s", index, exc)
            return EXIT_HANDSHAKE
        try:
            worker.load(setup)
        except LOAD_ERRORS as exc:
            # Bad input, as in one process: the scheduler prints the one line and stops
            # the launch with exit code 2; this is no crash, so no traceback and no ERROR.
            log.info("worker %d cannot load: %s", index, exc)
            worker.cannot_start(str(exc))
            return EXIT_CANNOT_LOAD
        reason = worker.serve()
        log.info("worker %d stopping: %s", index, reason)
        return 0
    finally:
        worker.close()
