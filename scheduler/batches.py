"""Micro-batches for a pipeline: several ``Scheduler`` cores over disjoint cache slots.

One core batches every ready request into one step, and a request has one step in flight
at a time, so a single core keeps one step in a pipeline of N stages: N-1 stages idle.
``MicroBatches`` runs G cores side by side, each owning slots [g*S/G, (g+1)*S/G) of every
worker's cache; each keeps its own step in flight, so G steps flow through the stages at
once while each still batches continuously. New requests wait in one queue and go to the
least loaded core with a free slot. Step ids are renumbered globally.

Like the core, this is a plain class: no sockets, no clocks; tests step it directly.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable

import msgspec

from ..runtime.sampling import SamplingParams
from ..runtime.step import Step, StepResult
from .core import Detokenizer, Event, Phase, RequestError, Scheduler, SchedulerConfig


class RecentTimes:
    """Per stage (or hop), the median of its last ``window`` samples: what the scheduler
    sizes steps in flight from and what ``/stats`` and ``health`` report.

    A median, not a moving average: a cluster's first steps carry one-off costs of seconds
    on one worker only (Triton compiles a kernel on its first call and writes it to the disk
    cache; workers that reach the same kernel later load it in milliseconds), and an
    average seeded with them stays off for dozens of steps: the likely reading of worker 0's
    1187 ms beside 289-301 ms for the others on 4 x H200 (2026-11-27, an average of weight
    0.9 over about 20 steps, a cold Triton cache; not re-measured). Samples of another
    length (the stages changed) start over."""

    def __init__(self, window: int = 15) -> None:
        self.window = window
        self._samples: deque[list[float]] = deque(maxlen=window)

    def add(self, sample: list[float]) -> list[float]:
        """Record one step's sample; returns the medians."""
        if self._samples and len(self._samples[-1]) != len(sample):
            self._samples.clear()
        self._samples.append(list(sample))
        return self.medians

    @property
    def medians(self) -> list[float]:
        if not self._samples:
            return []
        cols = zip(*self._samples, strict=True)
        return [sorted(c)[(len(c) - 1) // 2] for c in (list(c) for c in cols)]


def micro_batch_groups(stage_s: list[float], hop_s: list[float], *, most: int,
                       round_trip_s: float = 0.0) -> int:
    """How many micro-batches keep every stage busy: a step spends sum(stages) + sum(hops)
    going round (or ``round_trip_s``, the scheduler's measure from sending it to its result,
    the way back and the scheduler's own work included, when longer), and the slowest stage
    frees up every max(stage) seconds, so that many steps in flight leave no stage waiting:
    ceil(round trip / max stage), within [1, ``most``] (the cores there are: streams cannot
    be split further). No timings yet: ``most``."""
    if most < 1:
        raise ValueError(f"micro-batches: at most {most}; expected >= 1")
    if not stage_s or max(stage_s) <= 0:
        return most
    if any(t < 0 or not math.isfinite(t) for t in [*stage_s, *hop_s, round_trip_s]):
        raise ValueError(f"stage, hop and round-trip times must be finite and >= 0: "
                         f"{stage_s}, {hop_s}, {round_trip_s}")
    trip = max(sum(stage_s) + sum(hop_s), round_trip_s)
    need = math.ceil(trip / max(stage_s) - 1e-9)
    return max(1, min(most, need))


class MicroBatches:
    def __init__(self, config: SchedulerConfig, groups: int,
                 detokenizer_factory: Callable[[], Detokenizer] | None = None) -> None:
        groups = max(1, min(groups, config.max_slots))
        # Every slot belongs to a core: 8 slots in 3 cores are 3 + 3 + 2.
        self.sizes = [config.max_slots // groups + (g < config.max_slots % groups)
                      for g in range(groups)]
        self.offsets = list(itertools.accumulate([0, *self.sizes[:-1]]))
        self.cores = [Scheduler(SchedulerConfig(**{**config.__dict__, "max_slots": n}),
                                detokenizer_factory) for n in self.sizes]
        self.config = config
        self.waiting: deque[tuple[str, list[int], SamplingParams]] = deque()
        self.owner: dict[str, int] = {}  # admitted request -> core
        self.steps: dict[int, tuple[int, int]] = {}  # global step id -> (core, local id)
        self._ids = itertools.count()
        # Steps allowed in flight at once (``set_in_flight``; the process sizes it from the
        # measured stage and hop times with ``micro_batch_groups``).
        self.limit = len(self.cores)
        self.peak = 0  # the most steps in flight at once so far
        self._turn = -1

    def set_in_flight(self, limit: int) -> None:
        self.limit = max(1, min(limit, len(self.cores)))

    # --- requests --------------------------------------------------------------------------

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self.owner or any(w[0] == request_id for w in self.waiting):
            raise RequestError(f"request id {request_id!r} is already in use")
        if len(self.waiting) >= self.config.max_waiting:
            raise RequestError(f"queue full ({self.config.max_waiting} waiting requests)")
        self.cores[0].validate(prompt, params)
        self.waiting.append((request_id, list(prompt), params))

    def abort(self, request_id: str) -> list[Event]:
        for i, item in enumerate(self.waiting):
            if item[0] == request_id:
                del self.waiting[i]
                return [Event(request_id, finished=True, finish_reason="abort")]
        core = self.owner.get(request_id)
        if core is None:
            return []
        event = self.cores[core].abort(request_id)
        return self._done([event] if event else [])

    def _admit(self) -> None:
        while self.waiting:
            load = [self._load(g) for g in range(len(self.cores))]
            g = min(range(len(self.cores)), key=lambda g: load[g] - self.sizes[g])
            if load[g] >= self.sizes[g]:
                return
            rid, prompt, params = self.waiting.popleft()
            self.cores[g].add(rid, prompt, params)
            self.owner[rid] = g

    def _load(self, g: int) -> int:
        return sum(1 for r in self.cores[g].requests.values() if r.phase is not Phase.FINISHED
                   or r.slot is not None)

    # --- steps -----------------------------------------------------------------------------

    def schedule(self) -> list[Step]:
        """Every step that can start now (at most one per core)."""
        self._admit()
        steps = []
        # Under a limit, cores take turns starting first, so that none waits for ever.
        n = len(self.cores)
        self._turn = (self._turn + 1) % n
        for g in [(self._turn + k) % n for k in range(n)]:
            if len(self.steps) >= self.limit:
                break
            core = self.cores[g]
            step = core.schedule()
            if step is None:
                continue
            offset = self.offsets[g]
            gid = next(self._ids)
            self.steps[gid] = (g, step.step_id)
            rows = [msgspec.structs.replace(r, slot=r.slot + offset) for r in step.rows]
            steps.append(Step(gid, rows, release=step.release))
        self.peak = max(self.peak, len(self.steps))
        return steps

    def update(self, result: StepResult) -> list[Event]:
        """Fold a step's result in; a result for a step no longer in flight is ignored."""
        where = self.steps.pop(result.step_id, None)
        if where is None:
            return []
        g, local = where
        return self._done(self.cores[g].update(StepResult(local, result.results, result.errors)))

    def fail_step(self, step_id: int, message: str) -> list[Event]:
        where = self.steps.pop(step_id, None)
        if where is None:
            return []
        g, local = where
        return self._done(self.cores[g].fail_step(local, message))

    def fail_running(self, message: str, *, waiting_too: bool) -> list[Event]:
        """A worker died: every step in flight and every admitted request fails (their
        cached keys and values are gone); queued requests fail too unless the pipeline
        is coming back."""
        events = []
        for gid in list(self.steps):
            events += self.fail_step(gid, message)
        for core in self.cores:
            rids = [rid for rid, r in core.requests.items() if r.phase is not Phase.FINISHED]
            events += self._done(core.fail(rids, message))
        if waiting_too:
            while self.waiting:
                rid = self.waiting.popleft()[0]
                events.append(Event(rid, finished=True, finish_reason="error", error=message))
        return events

    def _done(self, events: list[Event]) -> list[Event]:
        for event in events:
            if event.finished:
                g = self.owner.pop(event.request_id, None)
                if g is not None:
                    self.cores[g].forget(event.request_id)
                    # forget() keeps a request whose slot is still held by a step in flight;
                    # it is dropped when that step returns (see _sweep).
        self._sweep()
        return events

    def _sweep(self) -> None:
        for core in self.cores:
            for rid in [rid for rid, r in core.requests.items()
                        if r.phase is Phase.FINISHED and r.slot is None]:
                core.forget(rid)

    # --- counts ----------------------------------------------------------------------------

    def running(self) -> int:
        return len(self.owner)

    def queued(self) -> int:
        return len(self.waiting)

    def in_flight(self) -> int:
        return len(self.steps)

    def has_work(self) -> bool:
        return bool(self.waiting or self.owner or self.steps)
