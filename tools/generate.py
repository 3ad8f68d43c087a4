"""`dejavu-run generate`: one prompt through the in-process engine, streamed or as JSON.

Everything a user can get wrong is checked before the weights are read: the prompt (text
or ids) is non-empty and inside the vocabulary, prompt + max_new_tokens fits the model's
positions, sampling parameters are in range and finite. Each failure is one line naming the
option. The generation loop itself is the engine's (scheduler/engine.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from ..runtime.build import BuildError, build_stage, offload_report, resolve, sparsity_report
from ..runtime.checkpoint import CheckpointError
from ..runtime.offload import describe_report
from ..runtime.opt_config import ConfigError, OPTConfig
from ..runtime.predictors import PredictorError
from ..runtime.sampling import SamplingError, SamplingParams
from ..runtime.selection import SelectionError
from ..runtime.settings import Settings, SettingsError
from ..runtime.sparse import SparseStats
from ..runtime.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from ..scheduler.core import Event, RequestError
from ..scheduler.engine import Engine
from .progress import Bar


class GenerateError(ValueError):
    """A bad option for `generate`; one line naming the option."""


# Errors a user can cause and fix; the CLI prints them as one line, without a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    CheckpointError, ConfigError, TokenizerError, SettingsError, SamplingError, GenerateError,
    PredictorError, SelectionError, BuildError, RequestError,
)


@dataclass
class GenerateRequest:
    prompt: str | None
    prompt_ids: str | None
    stop: tuple[str, ...] = ()


def parse_prompt_ids(text: str) -> list[int]:
    """'2,133,44' -> [2, 133, 44]; anything else is an error naming --prompt-ids."""
    parts = [p.strip() for p in text.split(",")]
    if parts == [""]:
        raise GenerateError("--prompt-ids: empty prompt; give at least one token id")
    ids = []
    for part in parts:
        try:
            ids.append(int(part))
        except ValueError:
            raise GenerateError(f"--prompt-ids: {part!r} is not an integer token id "
                                "(expected comma-separated ids such as 2,133,44)") from None
    return ids


def check_prompt(ids: list[int], config: OPTConfig, max_new_tokens: int) -> None:
    if not ids:
        raise GenerateError("prompt: empty prompt; give at least one token")
    bad = next((i for i in ids if not 0 <= i < config.vocab_size), None)
    if bad is not None:
        raise GenerateError(f"prompt: token id {bad} is outside the vocabulary "
                            f"[0, {config.vocab_size})")
    limit = config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise GenerateError(
            f"--max-new-tokens: prompt tokens ({len(ids)}) + max_new_tokens "
            f"({max_new_tokens}) = {len(ids) + max_new_tokens} exceeds the model's {limit} "
            "positions; shorten the prompt or lower --max-new-tokens"
        )


def _progress_bar(stream: TextIO) -> Callable[[int, int], None] | None:
    """A one-line bar on a terminal; nothing when stderr is a pipe or a file."""
    if not stream.isatty():
        return None
    bars: list[Bar] = []

    def show(done: int, total: int) -> None:
        if not bars:
            bars.append(Bar("loading weights", total, "tensors", stream))
        bars[0].update(done)

    return show


def run_generate(settings: Settings, request: GenerateRequest, *, as_json: bool,
                 out: TextIO | None = None, err: TextIO | None = None,
                 sparse: bool | None = None) -> dict:
    """Validate, build (runtime/build.py), generate. Returns the JSON-shaped result (also
    printed)."""
    out = out or sys.stdout  # looked up per call: tests and callers swap sys.stdout
    err = err or sys.stderr
    if (request.prompt is None) == (request.prompt_ids is None):
        raise GenerateError("give exactly one of --prompt TEXT or --prompt-ids 2,133,...")
    if request.prompt == "":
        raise GenerateError("--prompt: empty prompt; give some text")
    params = sampling_params(settings, request.stop)
    settings = resolve(settings, sparse)  # --sparse / --dense / neither ([sparsity])
    model_dir = Path(settings.model.path)
    try:
        config = OPTConfig.from_file(model_dir / "config.json")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None

    tokenizer: Tokenizer | None = None
    has_tokenizer = any((model_dir / n).is_file()
                        for n in ("tokenizer.json", "vocab.json"))
    if request.prompt is not None or request.stop or has_tokenizer:
        tokenizer = load_tokenizer(model_dir)
    if request.prompt is not None:
        assert tokenizer is not None
        ids = tokenizer.encode(request.prompt)
    else:
        assert request.prompt_ids is not None
        ids = parse_prompt_ids(request.prompt_ids)
    check_prompt(ids, config, params.max_new_tokens)

    engine, built = build_engine(settings, tokenizer, max_len=len(ids) + params.max_new_tokens,
                                  err=err)
    stats = engine.stage.sparse_stats
    after_prefill: list[SparseStats] = []
    with torch.inference_mode():
        events = _mark_prefill(engine.stream(ids, params), stats, after_prefill)
        result = print_stream(events, ids, out, as_json=as_json)
    if engine.stage.selector is not None:
        result["sparsity"] = sparsity_report(stats)
        result["decode_sparsity"] = decode_report(stats, after_prefill)
    report = offload_report(built)  # after the run: it counts the host bytes read
    if report is not None:
        result["offload"] = report
    finish_output(result, out, as_json=as_json)
    return result


def _mark_prefill(events: Iterator[Event], stats: SparseStats,
                  after_prefill: list[SparseStats]) -> Iterator[Event]:
    """``events`` as they come; at the first token (the prompt's prefill done, no decode
    step run yet: the in-process engine steps only when asked for the next event) a
    snapshot of ``stats`` goes into ``after_prefill``."""
    for event in events:
        if event.token is not None and not after_prefill:
            after_prefill.append(stats.snapshot())
        yield event


def decode_report(stats: SparseStats, after_prefill: list[SparseStats]) -> dict | None:
    """``sparsity_report`` of the generated tokens' decode steps alone (the prompt's
    prefill left out), with ``decode_steps``; None when no decode step ran (one token)."""
    decode = stats.since(after_prefill[0]) if after_prefill else SparseStats()
    if not decode.layers:
        return None
    steps = max(layer.tokens for layer in decode.layers.values())
    return {**sparsity_report(decode), "decode_steps": steps}


def build_engine(settings: Settings, tokenizer: Tokenizer | None, *, max_len: int,
                 max_batch: int = 1, err: TextIO | None = None):
    """(engine, what was built): the in-process engine of resolved ``settings``
    (runtime/build.py ``resolve``), built as every engine is, for ``max_batch`` sequences
    of ``max_len`` positions; the budget's plan goes to ``err``."""
    err = err or sys.stderr
    built = build_stage(settings, slots=max_batch, max_len=max_len,
                        progress=_progress_bar(err))
    if built.report is not None:
        err.write(f"gpu_memory_gib {settings.pipeline.gpu_memory_gib:g}: "
                  f"{describe_report(built.report)}\n")
    return Engine.from_stage(built.stage, tokenizer), built


def sampling_params(settings: Settings, stop: tuple[str, ...] = ()) -> SamplingParams:
    """The request's sampling from the effective [generation] settings."""
    g = settings.generation
    return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                          top_p=g.top_p, top_k=g.top_k, seed=g.seed, stop=tuple(stop),
                          repetition_penalty=g.repetition_penalty,
                          frequency_penalty=g.frequency_penalty,
                          presence_penalty=g.presence_penalty, min_p=g.min_p)


def print_stream(events: Iterable[Event], ids: list[int], out: TextIO, *,
                 as_json: bool) -> dict:
    """Stream one request's text to ``out`` (unless ``as_json``) and collect the result
    object; a failed request raises GenerateError. In-process and pipeline alike."""
    tokens: list[int] = []
    text = ""
    try:
        for event in events:
            if event.error:
                raise GenerateError(f"generation failed: {event.error}")
            if event.token is not None:
                tokens.append(event.token)
            if event.stop_tokens:  # as the text, the tokens end before the stop string
                del tokens[len(tokens) - event.stop_tokens:]
            if event.text:
                text += event.text
                if not as_json:
                    out.write(event.text)
                    out.flush()
    finally:
        # Close a generator now, while its connection is still open (it aborts the request).
        close = getattr(events, "close", None)
        if close is not None:
            close()
    return {"prompt_tokens": ids, "tokens": tokens, "text": text}


def finish_output(result: dict, out: TextIO, *, as_json: bool) -> None:
    """End the streamed text with a newline, or print the one JSON object."""
    out.write(json.dumps(result, ensure_ascii=False) + "\n" if as_json else "\n")
    out.flush()
