"""One worker's compute: a ``Stage`` over its layer span, with per-request error isolation.

``StageRunner.run`` takes a step (and, past the first stage, the previous stage's hidden
states) and returns either the hidden states for the next stage or, on the last stage, the
``StepResult``. If the batched forward raises, the step is retried one row at a time so
that only the failing requests fail (their errors travel with the step); re-running a row
rewrites the same cache positions with the same values, so the retry is safe. Out of
memory is different: the batch fails as a whole (``StepOOM``), memory is released, and the
worker goes on with the next step.

``DEJAVU_PROFILE_DIR``: when set, steps 20 to 29 of this worker run under the torch
profiler and its table lands in that folder as ``worker-<pid>.txt`` (diagnostics: where a
worker's step time goes inside a real pipeline).

What this module does not know: sockets. The worker process wraps it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..runtime.sparse import Selection
from ..runtime.stage import Stage
from ..runtime.step import Step, StepResult
from .faults import FaultHook


class StepOOM(RuntimeError):
    """The whole step ran out of memory."""


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class StageRunner:
    def __init__(self, stage: Stage, faults: FaultHook | None = None) -> None:
        self.stage = stage
        self.faults = faults or FaultHook([])
        self.is_last = stage.model.is_last
        self.profile = StepProfiler(Path(os.environ["DEJAVU_PROFILE_DIR"])) \
            if os.environ.get("DEJAVU_PROFILE_DIR") else None

    def run(self, step: Step, hidden: Tensor | None, errors: dict[str, str],
            carry: Tensor | None = None, given: dict[int, Selection] | None = None
            ) -> tuple[Step | None, Tensor | StepResult | None, Tensor | None, dict[str, str]]:
        """Returns (the step that continues, its output, the carried predictor input for the
        next stage (sparse runs), errors so far). The step is None when every row failed;
        the output is a ``StepResult`` on the last stage. ``given``: the first layer's
        selection the previous stage sent ahead (for the whole step; rows retried one by
        one select their own)."""
        if self.profile is not None:
            self.profile.tick()
        errors = dict(errors)
        try:
            self.faults.on_step(step)
            out = self.stage.forward(step, hidden, carry=carry, given=given)
            carry_out = self.stage.carry_out
        except torch.OutOfMemoryError as exc:
            self._free_memory()
            raise StepOOM(describe(exc)) from None
        except Exception as exc:
            step, out, carry_out = self._rows_one_by_one(step, hidden, carry, errors, exc)
            if step is None:
                return None, None, None, errors
        if not self.is_last:
            return step, out, carry_out, errors
        result = self.stage.finish(step, out)
        result.errors.update(errors)
        return step, result, None, errors

    def _rows_one_by_one(self, step: Step, hidden: Tensor | None, carry: Tensor | None,
                         errors: dict[str, str], first: Exception
                         ) -> tuple[Step | None, Tensor | None, Tensor | None]:
        if len(step.rows) == 1:
            errors[step.rows[0].request_id] = f"request {step.rows[0].request_id}: " + \
                describe(first)
            return None, None, None
        kept, outs, carries = [], [], []
        for b, row in enumerate(step.rows):
            sub = Step(step.step_id, [row])
            n = len(row.tokens)
            part = None if hidden is None else hidden[b:b + 1, :n]
            part_carry = None if carry is None else carry[b:b + 1, :n]
            try:
                self.faults.on_rows(sub)
                outs.append(self.stage.forward(sub, part, carry=part_carry))
                carries.append(self.stage.carry_out)
                kept.append(row)
            except torch.OutOfMemoryError as exc:
                self._free_memory()
                raise StepOOM(describe(exc)) from None
            except Exception as exc:
                errors[row.request_id] = f"request {row.request_id}: {describe(exc)}"
        if not kept:
            return None, None, None
        new = Step(step.step_id, kept, release=step.release)
        carry_out = _stack(carries, new.width) if all(c is not None for c in carries) else None
        return new, _stack(outs, new.width), carry_out

    def _free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _stack(parts: list[Tensor], width: int) -> Tensor:
    """Rows [1, T_i, C] -> [B, width, C], zero-padded (padding is never read as a real
    token: see Stage.batch)."""
    out = parts[0].new_zeros((len(parts), width, parts[0].shape[-1]))
    for b, part in enumerate(parts):
        out[b, : part.shape[1]] = part[0]
    return out


class StepProfiler:
    """Profiles steps [start, start + count) of this process, then writes the table."""

    def __init__(self, folder: Path, start: int = 20, count: int = 10) -> None:
        self.folder, self.start, self.stop = folder, start, start + count
        self.steps = 0
        self.prof: torch.profiler.profile | None = None

    def tick(self) -> None:
        """Call at the start of every step."""
        if self.steps == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
        elif self.steps == self.stop and self.prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            self.folder.mkdir(parents=True, exist_ok=True)
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total",
                                                   row_limit=30)
            (self.folder / f"worker-{os.getpid()}.txt").write_text(table)
            self.prof = None
        self.steps += 1
