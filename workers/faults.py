"""Fault injection for the reliability tests: raise, run out of memory, exit, hang or sleep
at a given step of a given worker, or when a given request is in the step.

Faults reach a worker only through its ``Setup`` message, which only the scheduler sends,
and the scheduler takes them only from the Python API (``PipelineConfig.faults``) or the
hidden ``--debug-fault`` option of ``launch``; dejavu.toml has no such key. Without faults
this costs one empty loop per step.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from ..runtime.step import Step
from ..runtime.wire import Fault

log = logging.getLogger("dejavu.worker")

ACTIONS = ("raise", "oom", "exit", "hang", "sleep")


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws."""


def parse_fault(spec: str) -> Fault:
    """'worker=1,action=raise[,step=3][,seconds=5][,request=ID]' -> Fault."""
    fields = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"fault spec {spec!r}: {part!r} is not key=value")
        fields[key.strip()] = value.strip()
    unknown = set(fields) - {"worker", "action", "step", "seconds", "request"}
    if unknown:
        raise ValueError(f"fault spec {spec!r}: unknown keys {sorted(unknown)}")
    action = fields.get("action", "")
    if action not in ACTIONS:
        raise ValueError(f"fault spec {spec!r}: action must be one of {', '.join(ACTIONS)}")
    return Fault(action, worker=int(fields.get("worker", 0)), at_step=int(fields.get("step", 1)),
                 seconds=float(fields.get("seconds", 0)), request=fields.get("request") or None)


class FaultHook:
    def __init__(self, faults: list[Fault]) -> None:
        self.faults = list(faults)
        self.fired: set[int] = set()
        self.steps = 0

    def on_step(self, step: Step) -> None:
        """Called once per step before any compute."""
        self.steps += 1
        for i, f in enumerate(self.faults):
            if self.steps < f.at_step:
                continue
            if f.request is not None and not _carries(step, f.request):
                continue
            if f.action == "raise" and f.request is not None:
                self._act(f, f"request {f.request}")
            elif i not in self.fired:
                self.fired.add(i)
                self._act(f, f"step {step.step_id}")

    def on_rows(self, step: Step) -> None:
        """Called again when rows are retried one by one: a request's ``raise`` keeps
        firing, so exactly that request fails."""
        for f in self.faults:
            if f.action == "raise" and f.request is not None and _carries(step, f.request):
                self._act(f, f"request {f.request}")

    @staticmethod
    def _act(f: Fault, where: str) -> None:
        log.warning("injected fault: %s at %s", f.action, where)
        if f.action == "raise":
            raise InjectedFault(f"injected fault at {where}")
        if f.action == "oom":
            raise torch.OutOfMemoryError(f"injected out of memory at {where}")
        if f.action == "exit":
            os._exit(17)
        if f.action == "sleep":
            time.sleep(f.seconds)
        if f.action == "hang":
            while True:
                time.sleep(3600)


def _carries(step: Step, request_id: str) -> bool:
    return any(row.request_id == request_id for row in step.rows)
