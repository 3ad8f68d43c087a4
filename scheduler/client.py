"""What a front end (HTTP server, chat, generate) talks to: ``EngineClient``.

Two implementations share the protocol: ``LocalClient`` here, which runs the in-process
``Engine`` on a background thread, and the pipeline client, which speaks to a running
``launch`` over ZeroMQ. Front ends are written once against the protocol. The terminal chat
is synchronous: ``LocalConnection`` gives it the in-process engine with the surface of the
synchronous pipeline connection.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..runtime.build import density_report
from ..runtime.sampling import SamplingParams
from .core import Event
from .engine import Engine


class EngineDeadError(RuntimeError):
    """The engine (or a worker of it) is gone: no request can be served until restart."""


@dataclass
class EngineHealth:
    """What a front end reports on /health: whether the engine serves, and why not."""

    ok: bool
    detail: str = ""
    workers: list[dict] = field(default_factory=list)


class EngineClient(Protocol):
    """An engine as a front end sees it. `generate` validates before anything is queued
    (raising `RequestError`), then yields the request's events until one is finished;
    cancelling the iterator (or calling `abort`) aborts the request."""

    max_len: int
    vocab_size: int

    def generate(self, prompt: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[Event]: ...

    async def abort(self, request_id: str) -> None: ...

    def health(self) -> EngineHealth: ...

    def stats(self) -> dict: ...

    async def close(self) -> None: ...


class LocalClient:
    """The in-process engine behind the `EngineClient` protocol. One thread owns the engine
    (torch work never blocks the event loop); requests and aborts reach it through a queue,
    events come back through the loop's thread-safe callback."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_len = engine.scheduler.config.max_len
        self.vocab_size = engine.scheduler.config.vocab_size
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = {"requests": 0, "tokens": 0, "failures": 0, "started": time.time()}
        self._dead: str | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[Event]:
        if self._dead:
            raise EngineDeadError(self._dead)
        self.engine.scheduler.validate(prompt, params)  # raises RequestError, nothing queued
        events: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), events)
        self._commands.put(("add", request_id, prompt, params))
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect): stop computing
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def health(self) -> EngineHealth:
        alive = self._thread.is_alive() and self._dead is None
        return EngineHealth(alive, self._dead or "", [{"worker": 0, "alive": alive}])

    def stats(self) -> dict:
        out = dict(self._stats, running=len(self._streams))
        stage = self.engine.stage
        if stage.selector is not None:  # measured densities, as generate --json has them
            out["sparsity"] = density_report(stage.sparse_stats.per_layer())
        return out

    async def close(self) -> None:
        self._commands.put(("stop",))
        await asyncio.to_thread(self._thread.join, 10)

    # --- the engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        scheduler = self.engine.scheduler
        try:
            while True:
                block = not scheduler.has_work()
                while True:
                    try:
                        command = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    block = False
                    if command[0] == "stop":
                        return
                    self._apply(command)
                for event in self.engine.step():
                    self._deliver(event)
                    if event.finished:
                        scheduler.forget(event.request_id)
        except Exception as exc:  # the engine itself broke: fail everyone, loudly
            self._dead = f"engine thread died: {type(exc).__name__}: {exc}"
            for rid in list(self._streams):
                self._deliver_raw(rid, EngineDeadError(self._dead))

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, rid, prompt, params = command
            try:
                self.engine.add(prompt, params, request_id=rid)
                self._stats["requests"] += 1
            except Exception as exc:
                self._deliver_raw(rid, exc)
        elif command[0] == "abort":
            event = self.engine.scheduler.abort(command[1])
            if event is not None:
                self._deliver(event)
                self.engine.scheduler.forget(command[1])

    def _deliver(self, event: Event) -> None:
        if event.token is not None:
            self._stats["tokens"] += 1
        if event.finish_reason == "error":
            self._stats["failures"] += 1
        self._deliver_raw(event.request_id, event)

    def _deliver_raw(self, request_id: str, item: object) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, events = target
            loop.call_soon_threadsafe(events.put_nowait, item)


class LocalConnection:
    """The in-process engine behind the synchronous surface of ``PipelineConnection`` that
    ``chat`` uses (``health``, ``stream``), so a chat runs the same way with no launch.

    Ctrl-C while a step runs is held until that step is done (the step then finishes, the
    request is aborted, and KeyboardInterrupt is raised): stopping a step half-way would
    leave the scheduler's slot bookkeeping behind the cache's.
    """

    def __init__(self, engine: Engine, model_name: str, device: str = "cpu") -> None:
        self.engine = engine
        self.model_name = model_name
        self.device = device
        self.started = time.monotonic()
        self.tokens_out = 0
        self.step_s = 0.0  # mean seconds per step of the last answer
        self._recent = (0, 0.0)  # (tokens, seconds) of the last answer
        self._ids = itertools.count()

    def health(self, timeout_s: float = 0.0):
        from ..runtime import wire

        config = self.engine.model.config
        stats = self.engine.stage.sparse_stats if self.engine.stage.selector else None
        tokens, seconds = self._recent
        return wire.Health(
            "ready", [wire.WorkerInfo(0, os.getpid(), (0, config.num_hidden_layers),
                                      self.device, "ready")],
            running=0, waiting=0, tokens_out=self.tokens_out,
            uptime_s=time.monotonic() - self.started,
            tokens_per_s=tokens / seconds if seconds else 0.0,
            stage_s=[self.step_s] if self.step_s else [], model=self.model_name,
            max_len=self.engine.scheduler.config.max_len, vocab_size=config.vocab_size,
            tokenizer=self.engine.tokenizer is not None,
            densities=[(stats.mlp_density, stats.head_density)] if stats else [])

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[Event]:
        """One request's events as they come; closing the iterator early aborts it."""
        scheduler = self.engine.scheduler
        started, steps, tokens, finished = time.monotonic(), 0, 0, False
        rid = f"chat-{next(self._ids)}"
        try:
            self.engine.add(prompt, params, request_id=rid)
            while not finished:
                events = self._step()
                steps += 1
                for event in events:
                    if event.request_id == rid:
                        tokens += event.token is not None
                        finished = finished or event.finished
                        yield event
        finally:
            if not finished:
                scheduler.abort(rid)
            scheduler.forget(rid)
            seconds = time.monotonic() - started
            self.tokens_out += tokens
            self._recent = (tokens, seconds)
            self.step_s = seconds / max(steps, 1)

    def _step(self) -> list[Event]:
        """One engine step with Ctrl-C held until it is done (then raised)."""
        import signal

        import torch

        interrupted: list[int] = []
        main = threading.current_thread() is threading.main_thread()
        if main:
            previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))
        try:
            with torch.inference_mode():
                events = self.engine.step()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt
        return events

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
