"""``dejavu-run generate`` and ``chat`` through a pipeline (a running launch, or one started
with ``--workers N``; scheduler/discover.py picks): one prompt printed exactly as the
in-process ``generate`` prints it (streamed text, or one JSON object with ``--json``).

The prompt is checked and tokenised here with the model's own tokenizer (the cluster
refuses bad requests too, naming the field); the text comes back from the scheduler's
detokeniser, so stop strings behave as in-process.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

from ..runtime.build import density_report
from ..runtime.checkpoint import resolve_model_dir
from ..scheduler.config import from_settings
from ..scheduler.discover import Target, describe, ignored_on_join, join
from ..scheduler.launch import Cluster
from ..scheduler.zmq_client import PipelineConnection


class PipelineGenerateError(ValueError):
    """The pipeline could not produce the completion; one line."""


def _prompt_ids(settings, request) -> list[int]:
    from .generate import GenerateError, parse_prompt_ids

    if (request.prompt is None) == (request.prompt_ids is None):
        raise GenerateError("give exactly one of --prompt TEXT or --prompt-ids 2,133,...")
    if request.prompt_ids is not None:
        return parse_prompt_ids(request.prompt_ids)
    if request.prompt == "":
        raise GenerateError("--prompt: empty prompt; give some text")
    from ..runtime.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_dir(settings.model_path())).encode(request.prompt)


@contextlib.contextmanager
def connection(settings, target: Target, *, announce: bool = True,
               err: TextIO | None = None, sparse: bool | None = None
               ) -> Iterator[PipelineConnection]:
    """A connection to the running launch of ``target``, or to one started here (stopped
    when the connection closes; ``sparse`` is its --sparse/--dense). ``announce`` says on
    ``err`` which cluster it is."""
    err = err or sys.stderr
    if target.note and announce:
        err.write(target.note + "\n")
    keys = settings.pipeline.keys_dir or None
    with contextlib.ExitStack() as stack:
        if target.kind == "connect":
            run_dir = target.found_in or settings.pipeline.run_dir or None
            conn = stack.enter_context(join(target.address, keys_dir=keys, run_dir=run_dir))
            if announce:
                err.write(describe(conn.health(), target.address)
                          + (f" (found in {target.found_in})" if target.found_in else "")
                          + "\n")
            ignored = ignored_on_join(settings, target.address, sparse=sparse)
            if ignored:  # announced or not: a flag that does nothing is never silent
                err.write(ignored + "\n")
            yield conn
            return
        cluster = Cluster(from_settings(settings, workers=target.workers, sparse=sparse))
        stack.callback(cluster.stop)
        if announce:
            err.write(f"starting a launch of {cluster.config.workers} worker(s)...\n")
        cluster.start(log=cluster.run_dir / "launch.log")
        yield stack.enter_context(PipelineConnection(
            cluster.address, keys_dir=cluster.config.keys_dir or None,
            run_dir=str(cluster.run_dir)))


def run_pipeline_generate(settings, request, *, target: Target, as_json: bool,
                          out: TextIO | None = None, sparse: bool | None = None) -> dict:
    """``sparse`` (--sparse/--dense) applies to a cluster started here; a running one keeps
    its own. The result's ``sparsity`` (a sparse cluster) holds the densities its workers
    measured since they started: this request's alone when the cluster was started for
    it."""
    from .generate import GenerateError, finish_output, print_stream, sampling_params

    out = out or sys.stdout
    params = sampling_params(settings, request.stop)
    ids = _prompt_ids(settings, request)
    with connection(settings, target, sparse=sparse) as conn:
        try:
            result = print_stream(conn.stream(ids, params), ids, out, as_json=as_json)
        except GenerateError as exc:
            raise PipelineGenerateError(str(exc)) from None
        health = conn.health()
    if health.layer_densities:
        result["sparsity"] = density_report(health.layer_densities)
    finish_output(result, out, as_json=as_json)
    return result


def start_chat(settings, *, target: Target, template: str | None,
               sparse: bool | None = None) -> int:
    """Chat until EOF with the engine ``target`` names: a running launch, one started
    here, or the in-process engine."""
    from ..runtime.tokenizer import load_tokenizer
    from ..scheduler.chat import ChatTemplate, chat_params, run_chat

    chat_template = ChatTemplate.from_file(template) if template else ChatTemplate()
    model_dir = resolve_model_dir(settings.model_path())
    tokenizer = load_tokenizer(model_dir)
    from .generate import sampling_params

    given = {key.split(".", 1)[1] for key, source in settings.sources.items()
             if key.startswith("generation.") and source == "command line"}
    params = chat_params(sampling_params(settings), given)
    if target.kind != "local":
        with connection(settings, target, sparse=sparse) as conn:
            return run_chat(conn, tokenizer, template=chat_template, params=params)
    from ..runtime.build import resolve
    from ..runtime.opt_config import OPTConfig
    from ..scheduler.client import LocalConnection
    from .generate import build_engine

    if target.note:
        sys.stderr.write(target.note + "\n")
    max_len = OPTConfig.from_file(model_dir / "config.json").max_position_embeddings
    engine, _ = build_engine(resolve(settings, sparse), tokenizer, max_len=max_len)
    sys.stderr.write(f"no launch running: chatting with {model_dir} in this process "
                     f"({settings.model.device})\n")
    with LocalConnection(engine, str(model_dir), settings.model.device) as conn:
        return run_chat(conn, tokenizer, template=chat_template, params=params)


def _errors() -> tuple[type[Exception], ...]:
    from ..runtime.checkpoint import CheckpointError
    from ..runtime.sampling import SamplingError
    from ..runtime.settings import SettingsError
    from ..runtime.tokenizer import TokenizerError
    from ..scheduler.chat import ChatError
    from ..scheduler.config import PipelineConfigError
    from ..scheduler.discover import JoinError
    from ..scheduler.launch import LaunchError
    from ..scheduler.transport import TransportError
    from ..scheduler.zmq_client import SchedulerGone
    from .generate import USER_ERRORS, GenerateError

    return (PipelineGenerateError, GenerateError, CheckpointError, SamplingError,
            SettingsError, TokenizerError, ChatError, PipelineConfigError, LaunchError,
            TransportError, SchedulerGone, TimeoutError, JoinError, *USER_ERRORS)


# Errors a user can cause and fix: the CLI prints them as one line.
PIPELINE_ERRORS = _errors()
