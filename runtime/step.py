"""What one forward step is made of, and what comes back from it.

These structs are the contract between the scheduler (which decides what runs) and
whatever executes a step: the in-process ``Stage`` or a pipeline of worker processes.
They are msgspec structs, so the same definitions cross process boundaries as typed,
validated msgpack (the wire schema imports them; no second copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from .sampling import SamplingParams


class Row(msgspec.Struct, frozen=True):
    """One sequence's part of a step: feed ``tokens`` at positions start, start+1, ...
    into cache slot ``slot``; when ``sample`` is set, sample the next token after them."""

    request_id: str
    slot: int
    tokens: list[int]
    start: int
    sample: bool
    params: SamplingParams
    # Prompt scoring: return the log-probability of tokens[1:] given their prefixes, and
    # of `score_next`, the prompt token after this chunk when the prompt is split.
    score: bool = False
    score_next: int | None = None


class Step(msgspec.Struct):
    step_id: int
    rows: list[Row]
    # Requests finished since the previous step: every stage drops their per-request state.
    release: list[str] = msgspec.field(default_factory=list)

    @property
    def width(self) -> int:
        """Tokens per row after padding: rows of a step run as one [B, T] tensor."""
        return max(len(r.tokens) for r in self.rows)


class TokenResult(msgspec.Struct):
    request_id: str
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    # One entry per scored prompt token of this row (see Row.score_next).
    prompt_logprobs: list[float] | None = None
    prompt_top: list[list[tuple[int, float]]] | None = None
    # On the event that matched a stop string: how many of the request's last tokens (this
    # one included) reach into the stop string. The text ends before the stop; dropping
    # these makes the tokens end there too (a token that straddles the stop's start is
    # dropped whole).
    stop_tokens: int = 0


class StepResult(msgspec.Struct):
    step_id: int
    results: list[TokenResult]
    # request_id -> message, for rows that failed without failing the whole step.
    errors: dict[str, str] = msgspec.field(default_factory=dict)


# The client's view of a request, step by step: what the scheduler emits, the in-process
# client yields and the pipeline's client API carries (runtime/wire.py).
@dataclass
class Event:
    """What a client sees of one step of one request."""

    request_id: str
    token: int | None = None
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    prompt_logprobs: list[float] | None = None
    prompt_top: list[list[tuple[int, float]]] | None = None
    # On the event that matched a stop string: how many of the request's last tokens (this
    # one included) reach into the stop string. The text ends before the stop; dropping
    # these makes the tokens end there too (a token that straddles the stop's start is
    # dropped whole).
    stop_tokens: int = 0
