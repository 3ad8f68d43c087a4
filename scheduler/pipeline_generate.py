"""``dejavu-run generate --workers N`` and ``--connect ADDRESS``: one prompt through the
pipeline, printed exactly as the in-process ``generate`` prints it (streamed text, or one
JSON object with ``--json``).

The prompt is checked and tokenised here with the model's own tokenizer (the cluster
refuses bad requests too, naming the field); the text comes back from the scheduler's
detokeniser, so stop strings behave as in-process.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

from ..runtime.checkpoint import resolve_model_dir
from .config import from_settings
from .launch import Cluster
from .zmq_client import PipelineConnection


class PipelineGenerateError(ValueError):
    """The pipeline could not produce the completion; one line."""


def _prompt_ids(settings, request) -> list[int]:
    from ..tools.generate import GenerateError, parse_prompt_ids

    if (request.prompt is None) == (request.prompt_ids is None):
        raise GenerateError("give exactly one of --prompt TEXT or --prompt-ids 2,133,...")
    if request.prompt_ids is not None:
        return parse_prompt_ids(request.prompt_ids)
    if request.prompt == "":
        raise GenerateError("--prompt: empty prompt; give some text")
    from ..runtime.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_dir(settings.model_path())).encode(request.prompt)


@contextlib.contextmanager
def connection(settings, *, connect: str | None, workers: int | None,
               announce: bool = False) -> Iterator[PipelineConnection]:
    """A connection to the launch at ``connect``, or to one started here with ``workers``
    (stopped when the connection closes)."""
    with contextlib.ExitStack() as stack:
        if connect:
            address, keys = connect, settings.pipeline.keys_dir or None
            run_dir = settings.pipeline.run_dir or None
        else:
            cluster = Cluster(from_settings(settings, workers=workers))
            stack.callback(cluster.stop)
            if announce:
                sys.stderr.write(f"starting {cluster.config.workers} worker(s)...\n")
            cluster.start(log=cluster.run_dir / "launch.log")
            address, keys = cluster.address, cluster.config.keys_dir or None
            run_dir = str(cluster.run_dir)
        yield stack.enter_context(PipelineConnection(address, keys_dir=keys, run_dir=run_dir))


def run_pipeline_generate(settings, request, *, workers: int | None, connect: str | None,
                          as_json: bool, out: TextIO | None = None) -> dict:
    from ..tools.generate import GenerateError, finish_output, print_stream, sampling_params

    out = out or sys.stdout
    params = sampling_params(settings, request.stop)
    ids = _prompt_ids(settings, request)
    with connection(settings, connect=connect, workers=workers) as conn:
        try:
            result = print_stream(conn.stream(ids, params), ids, out, as_json=as_json)
        except GenerateError as exc:
            raise PipelineGenerateError(str(exc)) from None
    finish_output(result, out, as_json=as_json)
    return result


def start_chat(settings, *, connect: str | None, workers: int | None,
               template: str | None) -> int:
    """Connect to ``connect`` (or start a launch with ``workers``) and chat until EOF."""
    from ..runtime.tokenizer import load_tokenizer
    from .chat import ChatTemplate, run_chat

    chat_template = ChatTemplate.from_file(template) if template else ChatTemplate()
    tokenizer = load_tokenizer(resolve_model_dir(settings.model_path()))
    from ..tools.generate import sampling_params

    params = sampling_params(settings)
    with connection(settings, connect=connect, workers=workers, announce=True) as conn:
        return run_chat(conn, tokenizer, template=chat_template, params=params)


def _errors() -> tuple[type[Exception], ...]:
    from ..runtime.checkpoint import CheckpointError
    from ..runtime.sampling import SamplingError
    from ..runtime.settings import SettingsError
    from ..runtime.tokenizer import TokenizerError
    from ..tools.generate import GenerateError
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
