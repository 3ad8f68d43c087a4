"""Fault injection for the reliability tests: raise, run out of memory, exit, hang or sleep
at a given step of a given worker, or whenever a given request is in the step.

A ``Fault`` reaches a worker only through its ``Setup`` message, which only the scheduler
sends, and the scheduler takes it only from the Python API and a hidden debug option of
``launch``; dejavu.toml has no such key. Without a fault this is one comparison per step.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from dejavu.runtime.step import Step
from dejavu.runtime.wire import Fault

log = logging.getLogger("dejavu.worker")

ACTIONS = ("raise", "oom", "exit", "hang", "sleep")


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws."""


def parse_fault(spec: str) -> tuple[int, Fault]:
    """'worker=1,action=raise,step=3[,seconds=5][,request=ID]' -> (worker, Fault)."""
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
    return int(fields.get("worker", 0)), Fault(
        action, at_step=int(fields.get("step", 1)), seconds=float(fields.get("seconds", 0)),
        request=fields.get("request") or None)


class FaultHook:
    def __init__(self, fault: Fault | None) -> None:
        self.fault = fault
        self.steps = 0
        self.fired = False

    def on_step(self, step: Step) -> None:
        """Called once per step before any compute."""
        self.steps += 1
        f = self.fault
        if f is None or self.steps < f.at_step:
            return
        if f.request is not None:
            self.on_rows(step)
            return
        if self.fired:
            return
        self.fired = True
        self._act(f, f"step {step.step_id}")

    def on_rows(self, step: Step) -> None:
        """Called again when rows are retried one by one: a request-scoped fault fires
        whenever its request is in the step, so only that request keeps failing."""
        f = self.fault
        if f is None or f.request is None or self.steps < f.at_step:
            return
        if any(row.request_id == f.request for row in step.rows):
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
