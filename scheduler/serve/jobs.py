"""Running one request's choices on an ``EngineClient`` and folding its events.

A completion or chat request becomes one engine request per (prompt, choice). ``Runner``
admits them against the bounded queue (429 beyond it), streams their events, keeps the
metrics (waiting/running, time to first token, inter-token latency, tokens, failures) and
turns engine errors into ``ApiError``s. Leaving an event stream early (a client that went
away, a cancelled task) closes the engine's iterator, which aborts the request there.

What this module does not know: HTTP or the OpenAI response shapes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ...runtime.sampling import SamplingError, SamplingParams
from ..client import EngineClient, EngineDeadError
from ..core import Event, RequestError
from .errors import ApiError
from .metrics import ServerMetrics

# What a busy server asks a refused client to wait (Retry-After): requests here finish in
# seconds, and a fixed short wait lets clients with backoff come back soon without a storm.
RETRY_AFTER_S = 1


@dataclass
class Choice:
    """One engine request and everything it returned."""

    index: int
    prompt: list[int]
    params: SamplingParams
    request_id: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    def fold(self, event: Event) -> None:
        if event.prompt_logprobs:
            self.prompt_logprobs.extend(event.prompt_logprobs)
            self.prompt_top.extend(event.prompt_top or [[] for _ in event.prompt_logprobs])
        if event.token is not None:
            self.tokens.append(event.token)
            self.logprobs.append(event.logprob)
            self.top.append(event.top or [])
        self.text += event.text
        if event.finished:
            self.finish_reason = event.finish_reason
            self.error = event.error


def request_error(exc: Exception) -> ApiError:
    """A validation error from the engine or SamplingParams as a 400 naming the field."""
    message = str(exc)
    param = None
    if isinstance(exc, SamplingError):
        name = message.split("=", 1)[0].strip()
        param = {"max_new_tokens": "max_tokens", "logprobs": "logprobs"}.get(name, name)
    elif "max_new_tokens" in message:
        param = "max_tokens"
    elif message.startswith("prompt"):
        param = "prompt"
    elif message.startswith("queue full"):
        return ApiError(429, message, code="queue_full", retry_after=RETRY_AFTER_S)
    return ApiError(400, message, param=param)


class Runner:
    def __init__(self, client: EngineClient, metrics: ServerMetrics, max_pending: int,
                 health=None) -> None:
        self.client = client
        self.health = health or client.health  # () -> Health
        self.metrics = metrics
        self.max_pending = max_pending
        self.pending = 0  # engine requests admitted and not yet finished

    def admit(self, count: int) -> None:
        """Reserve room for `count` engine requests or refuse the whole HTTP request."""
        health = self.health()
        if not health.ok:
            self.metrics.failures.inc(1, "engine_dead")
            raise ApiError(503, f"the engine is not available: {health.detail}",
                           code="engine_dead")
        if count > self.max_pending:  # would wait forever: no retry can make it fit
            self.metrics.failures.inc(1, "invalid")
            raise ApiError(400, f"this request needs {count} engine requests (prompts x n) "
                           f"but the server queues at most {self.max_pending}: lower n or "
                           "send fewer prompts", param="n")
        if self.pending + count > self.max_pending:
            self.metrics.failures.inc(1, "queue_full")
            raise ApiError(429, f"server busy: {self.pending} requests pending, the queue "
                           f"holds {self.max_pending}; retry later", code="queue_full",
                           retry_after=RETRY_AFTER_S)
        self.pending += count

    def release(self, count: int) -> None:
        self.pending -= count

    async def events(self, choice: Choice, endpoint: str) -> AsyncIterator[Event]:
        """The engine events of one choice, folded into it as they pass."""
        m = self.metrics
        m.waiting.inc(1)
        started = False
        submitted = last = time.perf_counter()
        reason = "abort"  # unless the stream says otherwise
        try:
            stream = self.client.generate(choice.prompt, choice.params, choice.request_id)
            async for event in stream:
                if not started:
                    started = True
                    m.waiting.inc(-1)
                    m.running.inc(1)
                    m.prompt_tokens.inc(len(choice.prompt))
                if event.token is not None:
                    now = time.perf_counter()
                    if choice.tokens:
                        m.itl.observe(now - last)
                    else:
                        m.ttft.observe(now - submitted)
                    last = now
                    m.generation_tokens.inc(1)
                choice.fold(event)
                if event.finished:
                    reason = event.finish_reason or "stop"
                yield event
        except (RequestError, SamplingError) as exc:
            reason = "invalid"
            raise request_error(exc) from None
        except EngineDeadError as exc:
            reason = "engine_dead"
            choice.finish_reason, choice.error = "error", str(exc)
            raise ApiError(503, f"request {choice.request_id} failed: {exc}",
                           code="engine_dead") from None
        except ApiError:
            raise
        except Exception as exc:  # anything else the client raised: this request fails
            reason = "error"
            choice.finish_reason, choice.error = "error", f"{type(exc).__name__}: {exc}"
            raise ApiError(500, f"request {choice.request_id} failed in the engine: "
                           f"{choice.error}", code="engine_error") from None
        finally:
            if started:
                m.running.inc(-1)
            else:
                m.waiting.inc(-1)
            m.requests.inc(1, endpoint, reason)
            if reason not in ("stop", "length"):
                m.failures.inc(1, reason)

    async def collect(self, choices: list[Choice], endpoint: str) -> None:
        """Run every choice to the end, concurrently; the first API error wins and the
        other choices are cancelled (which aborts them in the engine)."""

        async def drain(choice: Choice) -> None:
            async for _ in self.events(choice, endpoint):
                pass

        tasks = [asyncio.ensure_future(drain(c)) for c in choices]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def merged(self, choices: list[Choice],
                     endpoint: str) -> AsyncIterator[tuple[Choice, Event]]:
        """Events of several choices as they come, interleaved; leaving early cancels all."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(choice: Choice) -> None:
            try:
                async for event in self.events(choice, endpoint):
                    await queue.put((choice, event))
            except Exception as exc:
                await queue.put(exc)
            finally:
                await queue.put(done)

        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
