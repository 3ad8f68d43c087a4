"""``dejavu-run generate --workers N`` and ``--connect ADDRESS``: one prompt through the
pipeline, printed exactly as the in-process ``generate`` prints it (streamed text, or one
JSON object with ``--json``).

The prompt is checked and tokenised here with the model's own tokenizer (the cluster
refuses bad requests too, naming the field); the text comes back from the scheduler's
detokeniser, so stop strings behave as in-process.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import TextIO

from dejavu.runtime.checkpoint import resolve_model_dir
from dejavu.runtime.sampling import SamplingParams

from .config import from_settings
from .launch import Cluster
from .zmq_client import PipelineConnection


class PipelineGenerateError(ValueError):
    """The pipeline could not produce the completion; one line."""


def _prompt_ids(settings, request) -> list[int]:
    from dejavu.tools.generate import GenerateError, parse_prompt_ids

    if (request.prompt is None) == (request.prompt_ids is None):
        raise GenerateError("give exactly one of --prompt TEXT or --prompt-ids 2,133,...")
    if request.prompt_ids is not None:
        return parse_prompt_ids(request.prompt_ids)
    if request.prompt == "":
        raise GenerateError("--prompt: empty prompt; give some text")
    from dejavu.runtime.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_dir(settings.model_path())).encode(request.prompt)


def run_pipeline_generate(settings, request, *, workers: int | None, connect: str | None,
                          as_json: bool, out: TextIO | None = None) -> dict:
    out = out or sys.stdout
    g = settings.generation
    params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                            top_p=g.top_p, top_k=g.top_k, seed=g.seed, stop=request.stop)
    ids = _prompt_ids(settings, request)
    with contextlib.ExitStack() as stack:
        if connect:
            address, keys = connect, settings.pipeline.keys_dir or None
        else:
            cluster = Cluster(from_settings(settings, workers=workers))
            stack.callback(cluster.stop)
            cluster.start(log=cluster.run_dir / "launch.log")
            address, keys = cluster.address, cluster.config.keys_dir or None
        conn = stack.enter_context(PipelineConnection(address, keys_dir=keys))
        tokens: list[int] = []
        text = ""
        for event in conn.stream(ids, params):
            if event.error:
                raise PipelineGenerateError(f"generation failed: {event.error}")
            if event.token is not None:
                tokens.append(event.token)
            if event.text:
                text += event.text
                if not as_json:
                    out.write(event.text)
                    out.flush()
    result = {"prompt_tokens": ids, "tokens": tokens, "text": text}
    out.write(json.dumps(result, ensure_ascii=False) + "\n" if as_json else "\n")
    out.flush()
    return result


def start_chat(settings, *, connect: str | None, workers: int | None,
               template: str | None) -> int:
    """Connect to ``connect`` (or start a launch with ``workers``) and chat until EOF."""
    from dejavu.runtime.tokenizer import load_tokenizer

    from .chat import ChatTemplate, run_chat

    chat_template = ChatTemplate.from_file(template) if template else ChatTemplate()
    tokenizer = load_tokenizer(resolve_model_dir(settings.model_path()))
    g = settings.generation
    params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                            top_p=g.top_p, top_k=g.top_k, seed=g.seed)
    with contextlib.ExitStack() as stack:
        if connect:
            address, keys = connect, settings.pipeline.keys_dir or None
        else:
            cluster = Cluster(from_settings(settings, workers=workers))
            stack.callback(cluster.stop)
            sys.stderr.write(f"starting {cluster.config.workers} worker(s)...\n")
            cluster.start(log=cluster.run_dir / "launch.log")
            address, keys = cluster.address, cluster.config.keys_dir or None
        conn = stack.enter_context(PipelineConnection(address, keys_dir=keys))
        return run_chat(conn, tokenizer, template=chat_template, params=params)


def _errors() -> tuple[type[Exception], ...]:
    from dejavu.runtime.checkpoint import CheckpointError
    from dejavu.runtime.sampling import SamplingError
    from dejavu.runtime.settings import SettingsError
    from dejavu.runtime.tokenizer import TokenizerError
    from dejavu.tools.generate import GenerateError

    from .chat import ChatError
    from .config import PipelineConfigError
    from .launch import LaunchError
    from .transport import TransportError
    from .zmq_client import SchedulerGone

    return (PipelineGenerateError, GenerateError, CheckpointError, SamplingError,
            SettingsError, TokenizerError, ChatError, PipelineConfigError, LaunchError,
            TransportError, SchedulerGone, TimeoutError)


# Errors a user can cause and fix: the CLI prints them as one line.
PIPELINE_ERRORS = _errors()
