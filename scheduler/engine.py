"""The in-process engine: the scheduler's state machine driving one ``Stage`` that holds
every layer. ``generate``, ``eval`` and the tests use it; the pipeline runs the same
scheduler and the same ``Stage`` code, split over processes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ..runtime.model import OPTModel
from ..runtime.sampling import SamplingParams
from ..runtime.sparse import needs_kv_inputs
from ..runtime.stage import Stage, allocate_cache
from .core import Event, Scheduler, SchedulerConfig


@dataclass
class Completion:
    request_id: str
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)


class Engine:
    """The scheduler driving one ``Stage`` of every layer. Products build the stage with
    runtime/build.py and call ``from_stage``; the constructor takes a model and selector
    directly (tests, analyses)."""

    def __init__(self, model: OPTModel, tokenizer=None, *, max_batch: int = 8,
                 max_len: int | None = None, prefill_chunk: int = 512,
                 selector=None) -> None:
        max_len = max_len or model.config.max_position_embeddings
        # selector: contextual sparsity (runtime/selection.py); None runs dense.
        cache = allocate_cache(model, max_batch, max_len, keep_inputs=needs_kv_inputs(selector))
        self._start(Stage(model, cache, selector), tokenizer, prefill_chunk)

    @classmethod
    def from_stage(cls, stage: Stage, tokenizer=None, *, prefill_chunk: int = 512) -> Engine:
        """An engine over a built stage: its cache's slots are the batch, its length the
        longest sequence."""
        engine = cls.__new__(cls)
        engine._start(stage, tokenizer, prefill_chunk)
        return engine

    def _start(self, stage: Stage, tokenizer, prefill_chunk: int) -> None:
        model = stage.model
        if not (model.is_first and model.is_last):
            raise ValueError("the in-process engine needs every layer of the model")
        config = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.stage = stage
        max_batch, max_len = stage.cache.slots, stage.cache.max_len
        eos = tokenizer.eos_id if tokenizer is not None else config.eos_token_id
        factory = tokenizer.detokenizer if tokenizer is not None else None
        self.scheduler = Scheduler(
            SchedulerConfig(max_slots=max_batch, max_len=max_len,
                            vocab_size=config.vocab_size, eos_id=eos,
                            prefill_chunk=prefill_chunk),
            detokenizer_factory=factory,
        )
        self._ids = itertools.count()

    def add(self, prompt: Sequence[int], params: SamplingParams,
            request_id: str | None = None) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        self.scheduler.add(request_id, list(prompt), params)
        return request_id

    def step(self) -> list[Event]:
        """Run one step if any request can make progress; return its events."""
        step = self.scheduler.schedule()
        if step is None:
            return []
        try:
            result = self.stage.run(step)
        except Exception as exc:
            # The step as a whole failed (out of memory, say): fail its requests, keep going.
            return self.scheduler.fail_step(step.step_id, f"{type(exc).__name__}: {exc}")
        return self.scheduler.update(result)

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[Event]:
        """One request, its events as they come."""
        rid = self.add(prompt, params)
        while True:
            for event in self.step():
                if event.request_id == rid:
                    yield event
                    if event.finished:
                        self.scheduler.forget(rid)
                        return

    def run(self, prompts: Sequence[Sequence[int]],
            params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Many requests, batched continuously; completions in the order of `prompts`."""
        done, order = submit_all(prompts, params, self.add)
        while self.scheduler.has_work():
            for event in self.step():
                fold_event(done[event.request_id], event)
        for rid in order:
            self.scheduler.forget(rid)
        return [done[rid] for rid in order]

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Completion:
        return self.run([prompt], params)[0]


def submit_all(prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams],
               submit: Callable[[list[int], SamplingParams], str],
               ) -> tuple[dict[str, Completion], list[str]]:
    """Submit every prompt (one SamplingParams for all, or one each); return an empty
    completion per request id and the ids in prompt order."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    done: dict[str, Completion] = {}
    order = []
    for prompt, p in zip(prompts, params, strict=True):
        rid = submit(list(prompt), p)
        order.append(rid)
        done[rid] = Completion(rid, list(prompt))
    return done, order


def fold_event(completion: Completion, event: Event) -> None:
    """Add one event of a request to its completion."""
    if event.token is not None:
        completion.tokens.append(event.token)
        if event.logprob is not None:
            completion.logprobs.append(event.logprob)
    if event.prompt_logprobs:
        completion.prompt_logprobs.extend(event.prompt_logprobs)
    completion.text += event.text
    if event.stop_tokens:  # the tokens end where the text does: before the stop string
        del completion.tokens[len(completion.tokens) - event.stop_tokens:]
        del completion.logprobs[len(completion.tokens):]
    if event.finished:
        completion.finish_reason = event.finish_reason
        completion.error = event.error
