"""The request state machine and continuous batching, as a plain class.

``Scheduler`` admits requests into KV-cache slots, decides what each step computes
(``schedule``), and folds step results back into requests (``update``), producing the
events a client streams. It never touches a tensor, a socket or a clock: the in-process
engine and the pipeline front end both drive this same object, and the tests step it with
synthetic results.

A request has at most one step in flight (its next token depends on the last one), so
keeping a pipeline of N stages busy takes several requests in flight at once: call
``schedule`` again while it returns steps.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from ..runtime.sampling import SamplingParams
from ..runtime.step import Event, Row, Step, StepResult, TokenResult


class RequestError(ValueError):
    """A request rejected before any compute; the message names the field."""


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str:
        """Feed one token id; return the text it completes (possibly empty)."""
        ...


class Phase(Enum):
    WAITING = "waiting"  # no slot yet
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    detok: Detokenizer | None = None
    output: list[int] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    slot: int | None = None
    computed: int = 0  # tokens whose keys/values are in the cache
    pending_end: int = 0  # `computed` once the step in flight returns
    in_flight: bool = False
    text: str = ""  # detokenised output, including text held back for stop matching
    emitted: int = 0  # characters of `text` already sent to the client
    text_ends: list[int] = field(default_factory=list)  # len(text) after each output token
    stop_tokens: int = 0  # see Event.stop_tokens
    finish_reason: str | None = None
    forgotten: bool = False  # the caller is done with it: drop the record once it is free

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


@dataclass(frozen=True)
class SchedulerConfig:
    max_slots: int = 8  # sequences with a cache slot at once
    max_len: int = 2048  # positions per slot (prompt + generated)
    vocab_size: int = 50272
    eos_id: int | None = 2
    prefill_chunk: int = 512  # longest prompt piece in one step
    max_step_tokens: int = 2048  # padded tokens per prefill step
    max_waiting: int = 1024  # queue bound; beyond it add() refuses


class Scheduler:
    def __init__(self, config: SchedulerConfig,
                 detokenizer_factory: Callable[[], Detokenizer] | None = None) -> None:
        self.config = config
        self.detokenizer_factory = detokenizer_factory
        self.requests: dict[str, Request] = {}
        self.waiting: deque[str] = deque()
        self.free_slots = list(range(config.max_slots - 1, -1, -1))
        self.in_flight: dict[int, list[str]] = {}  # step id -> request ids
        self.to_release: list[str] = []
        self._step_ids = itertools.count()
        self._last_was_decode = False
        self._rng = random.Random()

    # --- admission -------------------------------------------------------------------------

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        c = self.config
        if not prompt:
            raise RequestError("prompt is empty: give at least one token")
        bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < c.vocab_size),
                   None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad!r} is outside the vocabulary [0, "
                               f"{c.vocab_size})")
        if len(prompt) + params.max_new_tokens > c.max_len:
            raise RequestError(
                f"prompt tokens ({len(prompt)}) + max_new_tokens ({params.max_new_tokens}) = "
                f"{len(prompt) + params.max_new_tokens} exceeds the model's {c.max_len} "
                "positions: shorten the prompt or lower max_new_tokens"
            )
        if params.stop and self.detokenizer_factory is None:
            raise RequestError("stop strings need a tokenizer, and this engine has none")

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if len(self.waiting) >= self.config.max_waiting:
            raise RequestError(f"queue full ({self.config.max_waiting} waiting requests)")
        self.validate(prompt, params)
        if params.seed is None:
            # Fix the seed at admission so that a sampled request is reproducible from logs.
            params = _with_seed(params, self._rng.randrange(2**63))
        detok = self.detokenizer_factory() if self.detokenizer_factory else None
        self.requests[request_id] = Request(request_id, list(prompt), params, detok)
        self.waiting.append(request_id)

    def abort(self, request_id: str) -> Event | None:
        req = self.requests.get(request_id)
        if req is None or req.phase is Phase.FINISHED:
            return None
        return self._finish(req, "abort")

    def fail(self, request_ids: list[str], message: str) -> list[Event]:
        events = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None and req.phase is not Phase.FINISHED:
                events.append(self._finish(req, "error", error=message))
        return events

    def fail_step(self, step_id: int, message: str) -> list[Event]:
        """A whole step failed (a stage raised, a worker died): fail its requests."""
        events = []
        for rid in self.in_flight.pop(step_id, []):
            req = self.requests[rid]
            req.in_flight = False
            if req.phase is Phase.FINISHED:
                self._free(req)
            else:
                events.append(self._finish(req, "error", error=message))
        return events

    # --- planning --------------------------------------------------------------------------

    def has_work(self) -> bool:
        return any(r.phase is not Phase.FINISHED for r in self.requests.values())

    def schedule(self) -> Step | None:
        """The next step to run, or None when every runnable request is in flight."""
        self._admit()
        ready = [r for r in self.requests.values()
                 if r.phase is Phase.RUNNING and not r.in_flight]
        prefill = [r for r in ready if r.prefilling]
        decode = [r for r in ready if not r.prefilling]
        # Alternate so neither new prompts nor running streams starve.
        if prefill and (not decode or self._last_was_decode):
            rows = self._prefill_rows(prefill)
            self._last_was_decode = False
        elif decode:
            rows = [self._row(r, r.computed, r.computed + 1) for r in decode]
            self._last_was_decode = True
        else:
            return None
        step = Step(next(self._step_ids), rows, release=self.to_release)
        self.to_release = []
        for row in rows:
            self.requests[row.request_id].in_flight = True
        self.in_flight[step.step_id] = [row.request_id for row in rows]
        return step

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            req = self.requests[self.waiting.popleft()]
            req.slot = self.free_slots.pop()
            req.phase = Phase.RUNNING

    def _prefill_rows(self, prefill: list[Request]) -> list[Row]:
        rows: list[Row] = []
        width = 0
        for req in prefill:
            end = min(len(req.prompt), req.computed + self.config.prefill_chunk)
            new_width = max(width, end - req.computed)
            if rows and new_width * (len(rows) + 1) > self.config.max_step_tokens:
                break
            width = new_width
            rows.append(self._row(req, req.computed, end))
        return rows

    def _row(self, req: Request, start: int, end: int) -> Row:
        tokens = req.tokens[start:end]
        req.pending_end = end
        last_chunk = end >= len(req.prompt)
        score = req.params.prompt_logprobs and start < len(req.prompt)
        score_next = req.prompt[end] if score and end < len(req.prompt) else None
        # max_new_tokens=0 scores the prompt (echo) and samples nothing.
        sample = last_chunk and req.params.max_new_tokens > 0
        return Row(req.request_id, req.slot, tokens, start, sample=sample,
                   params=req.params, score=score, score_next=score_next)

    # --- results ---------------------------------------------------------------------------

    def update(self, result: StepResult) -> list[Event]:
        rids = self.in_flight.pop(result.step_id, None)
        if rids is None:
            raise KeyError(f"step {result.step_id} is not in flight")
        by_id = {r.request_id: r for r in result.results}
        events = []
        for rid in rids:
            req = self.requests[rid]
            req.in_flight = False
            if req.phase is Phase.FINISHED:  # aborted or failed while in flight
                self._free(req)
                continue
            if rid in result.errors:
                events.append(self._finish(req, "error", error=result.errors[rid]))
                continue
            events.append(self._advance(req, by_id.get(rid)))
        return [e for e in events if e is not None]

    def _advance(self, req: Request, res: TokenResult | None) -> Event | None:
        req.computed = req.pending_end
        if res is None or res.token is None:
            event = None
            if res is not None and res.prompt_logprobs is not None:
                event = Event(req.request_id, prompt_logprobs=res.prompt_logprobs,
                              prompt_top=res.prompt_top)
            if req.prefilling:
                return event  # a prompt chunk that samples nothing
            if req.params.max_new_tokens == 0:
                final = self._finish(req, "length")
                if event is None:
                    return final
                event.finished, event.finish_reason = True, "length"
                return event
            return self._finish(req, "error", error="the step returned no token")
        token = res.token
        req.output.append(token)
        event = Event(req.request_id, token=token, logprob=res.logprob, top=res.top,
                      prompt_logprobs=res.prompt_logprobs, prompt_top=res.prompt_top)
        reason = None
        if req.detok is not None:
            req.text += req.detok.push(token)
            req.text_ends.append(len(req.text))
            reason = self._match_stop(req)
        if reason is None:
            if token == self.config.eos_id and not req.params.ignore_eos:
                reason = "stop"
            elif len(req.output) >= req.params.max_new_tokens:
                reason = "length"
            elif len(req.tokens) >= self.config.max_len:
                reason = "length"
        if reason is not None:
            final = self._finish(req, reason)
            event.text, event.finished, event.finish_reason = final.text, True, reason
            event.stop_tokens = req.stop_tokens
            return event
        event.text = self._take_text(req, hold=max((len(s) for s in req.params.stop),
                                                   default=1) - 1)
        return event

    def _match_stop(self, req: Request) -> str | None:
        for stop in req.params.stop:
            at = req.text.find(stop, max(0, req.emitted - len(stop)))
            if at >= 0:
                req.text = req.text[:at]
                req.stop_tokens = sum(1 for end in req.text_ends if end > at)
                return "stop"
        return None

    def _take_text(self, req: Request, hold: int) -> str:
        # Hold back a tail that could still grow into a stop string.
        safe = max(req.emitted, len(req.text) - hold)
        out = req.text[req.emitted:safe]
        req.emitted = safe
        return out

    def _finish(self, req: Request, reason: str, error: str | None = None) -> Event:
        # Valid in every phase: a request that never got a slot leaves the queue here, so
        # forget() may drop its record at once and admission never meets a stale id.
        if req.phase is Phase.WAITING:
            self.waiting.remove(req.request_id)
        req.phase = Phase.FINISHED
        req.finish_reason = reason
        text = self._take_text(req, hold=0) if reason != "error" else ""
        self._free(req)
        return Event(req.request_id, text=text, finished=True, finish_reason=reason,
                     error=error)

    def _free(self, req: Request) -> None:
        # A slot is reused only once no step that writes it is still in flight.
        if req.slot is not None and not req.in_flight:
            self.free_slots.append(req.slot)
            req.slot = None
            self.to_release.append(req.request_id)
        if req.forgotten and req.slot is None:
            self.requests.pop(req.request_id, None)

    def forget(self, request_id: str) -> None:
        """Drop a finished request's record (the caller has read its events)."""
        req = self.requests.get(request_id)
        if req is not None and req.phase is Phase.FINISHED:
            req.forgotten = True
            if req.slot is None:
                del self.requests[request_id]


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)
