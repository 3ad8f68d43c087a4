import typer

from ..runtime.settings import CHAT_SAMPLING as CHAT_DEFAULTS
from ..runtime.settings import GenerationSettings

# Plain help text: with rich markup "[pipeline]" in a help string is read as a style tag
# and vanishes ("( spawn = false)").
app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        from .. import __version__  # the installed package's metadata

        typer.echo(f"dejavu-run {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit"),
) -> None:
    """Inference runtime for OPT models with Deja Vu contextual sparsity."""


def _default(key: str) -> str:
    """" [default: X]" for a [generation] key: the built-in value, which dejavu.toml's
    [generation] section may change."""
    return f" [default: {getattr(GenerationSettings(), key)}, or [generation] {key}]"


# Sampling options, one definition each (generate and chat).
MAX_NEW_TOKENS = typer.Option(None, "--max-new-tokens", help="tokens generated at most"
                              + _default("max_new_tokens"))
SEED = typer.Option(None, "--seed", help="random seed for sampling [default: a fresh seed "
                    "per request, or [generation] seed]")
RUN_DIR = typer.Option(None, "--run-dir", help="run directory of the launch to join "
                       "[default: [pipeline] run_dir, else $XDG_RUNTIME_DIR/dejavu-run or "
                       "/tmp/dejavu-run-<uid>]")

# One definition of where a command's in-process engine runs (generate, chat); unset,
# [model] device decides. A launch's workers keep their own devices.
DEVICE = typer.Option(None, "--device", help="cpu | cuda: where the model runs in this "
                      "process [default: cpu, or [model] device]")

# One definition for the commands that take a GPU budget (generate, launch, chat, serve).
GPU_MEMORY_GIB = typer.Option(None, "--gpu-memory-gib",
                              help="GPU memory per worker (GiB); layers beyond it are "
                              "offloaded to host memory (float16/bfloat16)")
# One definition of the model dtype (generate, eval, chat, serve); unset, [model] dtype
# decides. Validated with the settings: a bad value is one line naming it.
DTYPE = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 [default: float32, "
                     "or [model] dtype]")
# One definition of the penalty options for the commands that sample (generate, chat);
# unset, [generation] in dejavu.toml decides.
REPETITION_PENALTY = typer.Option(None, "--repetition-penalty", help="divide the logits of "
                                  "tokens seen in the prompt or output, 0.1..10 (>1 repeats "
                                  "less; default 1 = off)")
FREQUENCY_PENALTY = typer.Option(None, "--frequency-penalty", help="-2..2: subtract this x "
                                 "times generated (default 0 = off)")
PRESENCE_PENALTY = typer.Option(None, "--presence-penalty", help="-2..2: subtract this once "
                                "a token was generated (default 0 = off)")
MIN_P = typer.Option(None, "--min-p", help="0..1: when sampling, drop tokens below min-p x "
                     "the top probability (default 0 = off)")


def _penalties(repetition: float | None, frequency: float | None, presence: float | None,
               min_p: float | None) -> dict[str, float | None]:
    """The penalty options as settings overrides (None: not given)."""
    return {"generation.repetition_penalty": repetition,
            "generation.frequency_penalty": frequency,
            "generation.presence_penalty": presence, "generation.min_p": min_p}


@app.command()
def version() -> None:
    """Print the version (as --version does)."""
    _version(True)


# --- foundation: generate, convert, config show -------------------------------------------
# Library imports stay inside the commands so `dejavu-run --help` does not import torch.

def _user_error(exc: Exception) -> typer.Exit:
    """A user-fixable error as one line on stderr and exit status 2, no traceback."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


@app.command()
def generate(
    prompt: str = typer.Option(None, "--prompt", help="prompt text (BOS is added)"),
    prompt_ids: str = typer.Option(None, "--prompt-ids", help="prompt token ids: 2,133,44"),
    model: str = typer.Option(None, "--model", help="checkpoint directory or Hugging Face id"),
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = typer.Option(None, "--temperature",
                                      help="0 = greedy" + _default("temperature")),
    top_p: float = typer.Option(None, "--top-p", help="nucleus sampling: keep the most "
                                "likely tokens up to this probability mass" + _default("top_p")),
    top_k: int = typer.Option(None, "--top-k", help="sample among the k most likely tokens, "
                              "0 = no cut" + _default("top_k")),
    seed: int = SEED,
    stop: list[str] = typer.Option(None, "--stop", help="stop string (repeatable); the text "
                                   "and the tokens end before it"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object at the end"),
    config: str = typer.Option(None, "--config", help="settings file (default ./dejavu.toml)"),
    sparse: bool = typer.Option(None, "--sparse/--dense",
                                help="contextual sparsity (default: when predictors exist)"),
    workers: int = typer.Option(None, "--workers",
                                help="start a launch of N worker processes for this prompt"),
    connect: str = typer.Option(None, "--connect",
                                help="run through the launch at this client address"),
    run_dir: str = RUN_DIR,
    gpu_memory_gib: float = GPU_MEMORY_GIB,
    repetition_penalty: float = REPETITION_PENALTY,
    frequency_penalty: float = FREQUENCY_PENALTY,
    presence_penalty: float = PRESENCE_PENALTY,
    min_p: float = MIN_P,
) -> None:
    """Generate a continuation of one prompt (streams text; --json prints one object).

    Runs through a launch that is running (found through its run directory), else in this
    process; --workers N starts a launch for this prompt, --connect names one."""
    from ..runtime.settings import load_settings
    from ..scheduler.discover import choose
    from .generate import USER_ERRORS, GenerateRequest, run_generate

    try:
        settings = load_settings(config, {
            "model.path": model, "model.device": device, "model.dtype": dtype,
            "generation.max_new_tokens": max_new_tokens, "generation.temperature": temperature,
            "generation.top_p": top_p, "generation.top_k": top_k, "generation.seed": seed,
            "pipeline.gpu_memory_gib": gpu_memory_gib, "pipeline.workers": workers,
            "pipeline.run_dir": run_dir,
            **_penalties(repetition_penalty, frequency_penalty, presence_penalty, min_p),
        })
        request = GenerateRequest(prompt, prompt_ids, tuple(stop or ()))
        target = choose(settings, connect=connect, run_dir=run_dir)
        if target.kind != "local":  # the pipeline (scheduler/)
            from .pipeline_generate import PIPELINE_ERRORS, run_pipeline_generate

            try:
                run_pipeline_generate(settings, request, target=target, as_json=as_json,
                                      sparse=sparse)
            except PIPELINE_ERRORS as exc:
                raise _user_error(exc) from None
            return
        if target.note:
            typer.echo(target.note, err=True)
        run_generate(settings, request, as_json=as_json, sparse=sparse)
    except USER_ERRORS as exc:
        raise _user_error(exc) from None
    except KeyboardInterrupt:  # Ctrl-C while streaming: stop quietly, as shells expect
        typer.echo("", err=True)
        raise typer.Exit(130) from None


@app.command()
def convert(
    src: str = typer.Argument(..., help="directory with pytorch_model.bin (or its shards)"),
    dst: str = typer.Argument(..., help="new directory for the safetensors checkpoint"),
) -> None:
    """Convert a PyTorch .bin checkpoint to safetensors (weights-only loading)."""
    from ..runtime.checkpoint import CheckpointError
    from .convert import convert as run_convert

    try:
        out = run_convert(src, dst)
    except CheckpointError as exc:
        raise _user_error(exc) from None
    typer.echo(f"wrote {out}")


config_app = typer.Typer(no_args_is_help=True, help="Inspect settings (dejavu.toml).")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    config: str = typer.Option(None, "--config", help="settings file (default ./dejavu.toml)"),
) -> None:
    """Print the effective settings and where each value came from."""
    from ..runtime.settings import SettingsError, load_settings, render

    try:
        typer.echo(render(load_settings(config)), nl=False)
    except SettingsError as exc:
        raise _user_error(exc) from None


# --- model: train-model (eval follows) -------------------------------------------------------

@app.command(
    "train-model",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def train_model(ctx: typer.Context) -> None:
    """Train the small default OPT model (options: `dejavu-run train-model --help`; they are
    tools/train_model.py's, e.g. --corpus --tokenizer --out --steps N | --time-budget S)."""
    from .train_model import main as train_main

    try:
        train_main(list(ctx.args))
    except ValueError as exc:
        raise _user_error(exc) from None


@app.command("eval")
def eval_command(
    model: str = typer.Option(None, "--model", help="checkpoint directory or Hugging Face id"),
    task: list[str] = typer.Option(None, "--task", help="lambada | piqa | winogrande | copa | "
                                   "arc_easy | arc_challenge | openbook_qa | boolq | wikitext2 "
                                   "| zero-shot | all (repeatable)"),
    data: list[str] = typer.Option(None, "--data", help=".txt / .jsonl / .jsonl.xz file: "
                                   "perplexity and bits per byte (repeatable)"),
    limit: int = typer.Option(None, "--limit", help="first N rows (lines of a .txt)"),
    device: str = typer.Option(None, "--device", help="cpu | cuda"),
    dtype: str = DTYPE,
    batch_size: int = typer.Option(8, "--batch-size", help="sequences per forward pass"),
    window: int = typer.Option(1024, "--window", help="text: tokens per window"),
    stride: int = typer.Option(512, "--stride", help="text: new tokens scored per window"),
    eval_dir: str = typer.Option(None, "--eval-dir", help="folder of the task files "
                                 "[default: shared/data/eval beside the repository]"),
    as_json: bool = typer.Option(False, "--json", help="JSON: one object per task (a list "
                                 "for several)"),
    config: str = typer.Option(None, "--config", help="settings file (default ./dejavu.toml)"),
    sparse: bool = typer.Option(None, "--sparse/--dense", help="contextual sparsity (default: "
                                "when predictors exist); sparse adds measured densities"),
) -> None:
    """Perplexity / bits per byte of text (sliding window) and zero-shot task accuracy."""
    from ..runtime.build import BuildError
    from ..runtime.checkpoint import CheckpointError
    from ..runtime.predictors import PredictorError
    from ..runtime.selection import SelectionError
    from ..runtime.settings import SettingsError, load_settings
    from ..runtime.tokenizer import TokenizerError
    from .eval import EvalOptions
    from .sparse_eval import run_eval
    from .textdata import TextDataError

    try:
        settings = load_settings(config, {"model.path": model, "model.device": device,
                                          "model.dtype": dtype})
        opts = EvalOptions(tasks=task or (), data=data or (),
                           eval_dir=eval_dir or EvalOptions.eval_dir, limit=limit,
                           batch_size=batch_size, window=window, stride=stride)
        typer.echo(run_eval(settings, opts, as_json, sparse=sparse))
    except (TextDataError, SettingsError, CheckpointError, TokenizerError, OSError,
            PredictorError, SelectionError, BuildError) as exc:
        raise _user_error(exc) from None


# --- serving: the OpenAI-compatible HTTP server ------------------------------------------

@app.command()
def serve(
    host: str = typer.Option(None, "--host", help="address to bind (default 127.0.0.1)"),
    port: int = typer.Option(None, "--port", help="TCP port (default 8000)"),
    api_key: str = typer.Option(None, "--api-key",
                                help="require 'Authorization: Bearer KEY' (all but /health); "
                                "never empty; default: $DEJAVU_API_KEY"),
    api_key_file: str = typer.Option(None, "--api-key-file",
                                     help="read the API key from this file's first line"),
    workers: int = typer.Option(None, "--workers", help="start a launch of N worker "
                                "processes (1 = in-process) [default: join a running launch, "
                                "else [pipeline] workers]"),
    connect: str = typer.Option(None, "--connect",
                                help="serve the launch at this client address"),
    run_dir: str = RUN_DIR,
    model: str = typer.Option(None, "--model", help="checkpoint directory or Hugging Face id"),
    max_batch: int = typer.Option(None, "--max-batch", help="sequences decoded together by "
                                  "the engine serve runs or starts [default: 8]; a launch it "
                                  "joins keeps its own"),
    served_model_name: str = typer.Option(None, "--served-model-name",
                                          help="the model name clients use (default --model)"),
    config: str = typer.Option(None, "--config", help="settings file (default ./dejavu.toml)"),
    dtype: str = DTYPE,
    gpu_memory_gib: float = GPU_MEMORY_GIB,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (completions, chat, metrics)."""
    from ..runtime.checkpoint import CheckpointError
    from ..runtime.settings import SettingsError, load_settings
    from ..runtime.tokenizer import TokenizerError
    from ..scheduler.discover import JoinError, choose, ignored_on_join

    try:
        from ..scheduler.serve import (
            ServeError,
            options_from_settings,
            read_api_key,
            run_server,
        )
    except ModuleNotFoundError as exc:  # a runtime-only install
        raise _user_error(RuntimeError(
            f"serve needs {exc.name}, which the [serve] extra installs: "
            "pip install -e '.[serve]' (or 'dejavu-run[serve]')")) from None

    try:
        settings = load_settings(config, {"model.path": model, "model.dtype": dtype,
                                          "serve.host": host,
                                          "serve.port": port, "pipeline.workers": workers,
                                          "pipeline.gpu_memory_gib": gpu_memory_gib,
                                          "pipeline.run_dir": run_dir})
        target = choose(settings, connect=connect, run_dir=run_dir)
        if target.note:
            typer.echo(target.note, err=True)
        given = [f"--max-batch {max_batch}"] if max_batch is not None else []
        if target.kind == "connect" and (ignored := ignored_on_join(settings, target.address,
                                                                    others=given)):
            typer.echo(ignored, err=True)
        run_server(settings, options_from_settings(
            settings, api_key=read_api_key(api_key, api_key_file), max_batch=max_batch,
            model_name=served_model_name, connect=target.address or None,
            workers=target.workers))
    except (SettingsError, CheckpointError, TokenizerError, ServeError, JoinError) as exc:
        raise _user_error(exc) from None


# --- sparsity: train-predictors ---------------------------------------------------------------

@app.command("train-predictors")
def train_predictors(
    model: str = typer.Option(None, "--model", help="checkpoint directory or Hugging Face id"),
    data: str = typer.Option(..., "--data", help="calibration text: .txt, .jsonl or .jsonl.xz"),
    out: str = typer.Option(..., "--out", help="directory for predictors.safetensors + report"),
    tokens: int = typer.Option(100_000, "--tokens", help="calibration tokens (bounds memory)"),
    rank: int = typer.Option(256, "--rank", help="rank of the MLP predictors"),
    mlp_source: str = typer.Option("mlp_in", "--mlp-source",
                                   help="MLP predictor input: mlp_in (the layer's own MLP "
                                   "input) or lookahead (the heads' source, one block early)"),
    mlp_init: str = typer.Option("svd", "--mlp-init",
                                 help="svd (closed form from fc1; needs mlp_in) or random"),
    mlp_epochs: int = typer.Option(None, "--mlp-epochs",
                                   help="fitting epochs of the MLP predictors (default: 0 "
                                   "with --mlp-init svd, --epochs with random)"),
    head_rank: int = typer.Option(64, "--head-rank", help="rank of the head predictors"),
    mlp_recall: float = typer.Option(0.95, "--mlp-recall",
                                     help="recall of firing neurons that sets each layer's "
                                     "MLP top-k, or its threshold with --select threshold"),
    mlp_density: float = typer.Option(None, "--mlp-density",
                                      help="fixed MLP density instead of --mlp-recall"),
    head_density: float = typer.Option(0.5, "--head-density",
                                       help="head labels: each token's top heads by norm"),
    head_point: float = typer.Option(1.0, "--head-point",
                                     help="heads kept per token at the default operating point"),
    epochs: int = typer.Option(8, "--epochs", help="passes over the training tokens per "
                               "predictor fit"),
    batch_size: int = typer.Option(256, "--batch-size", help="tokens per fitting step"),
    lr: float = typer.Option(5e-3, "--lr", help="peak learning rate of the fitting"),
    select: str = typer.Option("topk", "--select",
                               help="MLP selection: topk (k per token) or threshold"),
    window: int = typer.Option(None, "--window", help="tokens per calibration sequence "
                               "(default: the model's positions)"),
    per_doc: int = typer.Option(4096, "--per-doc", help="calibration tokens from one document "
                                "at most (fewer: more documents, a wider sample)"),
    device: str = typer.Option(None, "--device", help="cpu | cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="model dtype while collecting"),
    config: str = typer.Option(None, "--config", help="settings file (default ./dejavu.toml)"),
    gpu_memory_gib: float = typer.Option(None, "--gpu-memory-gib",
                                         help="GPU memory for one layer, its forward batches "
                                         "and fitting (GiB; default: what is free)"),
    host_memory_gib: float = typer.Option(None, "--host-memory-gib",
                                          help="host memory for the run: a layer (two on "
                                          "the CPU), fitting and every token's activations "
                                          "(GiB; default: what is available); activations "
                                          "beyond it go to disk"),
    fit_behind: bool = typer.Option(False, "--fit-behind/--fit-in-line",
                                    help="fit each layer's predictors while the next layer "
                                    "is read and runs forward, on a copy of the layer's "
                                    "inputs and labels (tokens x (4 x hidden + ffn / 8 + 2 "
                                    "x heads) bytes more, on the GPU when training there); "
                                    "not when activations go to disk; measured no faster "
                                    "yet (README)"),
    debug_stall_in_layer: int = typer.Option(None, "--debug-stall-in-layer", hidden=True,
                                             help="tests only: block inside this layer"),
) -> None:
    """Train per-layer DejaVu predictors (MLP neurons and heads) for a model, one layer in
    memory at a time; rerun the same command to resume after an interruption."""
    from pathlib import Path

    from ..runtime.build import resolve_device
    from ..runtime.checkpoint import CheckpointError
    from ..runtime.settings import SettingsError, load_settings
    from ..runtime.tokenizer import TokenizerError
    from .collect_labels import CalibrationDataError
    from .train_layerwise import WORK, train_layerwise
    from .train_predictors import TrainConfig

    try:
        settings = load_settings(config, {"model.path": model, "model.device": device})
        cfg = TrainConfig(tokens=tokens, window=window, per_doc=per_doc, mlp_rank=rank,
                          head_rank=head_rank,
                          epochs=epochs, batch_size=batch_size, lr=lr,
                          mlp_recall=mlp_recall, mlp_density=mlp_density,
                          mlp_select=select, mlp_source=mlp_source, mlp_init=mlp_init,
                          mlp_epochs=mlp_epochs,
                          head_density=head_density, head_point=head_point)
        if gpu_memory_gib is None:
            gpu_memory_gib = settings.pipeline.gpu_memory_gib
        train_layerwise(settings.model_path(), data, out, cfg,
                        device=str(resolve_device(settings)), dtype=dtype,
                        gpu_memory_gib=gpu_memory_gib, host_memory_gib=host_memory_gib,
                        fit_behind=fit_behind, stall_in_layer=debug_stall_in_layer)
    except (SettingsError, CheckpointError, TokenizerError, CalibrationDataError,
            ValueError) as exc:
        raise _user_error(exc) from None
    except KeyboardInterrupt:
        kept = len(list((Path(out) / WORK).glob("layer-*.safetensors")))
        typer.echo(f"interrupted: {kept} finished layer(s) kept in {Path(out) / WORK}; run "
                   "the same command again to resume", err=True)
        raise typer.Exit(130) from None


# --- kernels: bench ---------------------------------------------------------------------------

@app.command()
def bench(
    out: str = typer.Option(None, "--out", help="directory for <date>-<gpu>.json/.md "
                            "[default: the repository's bench/results; with --small a new "
                            "temporary directory]"),
    small: bool = typer.Option(False, "--small",
                               help="dry run: tiny shapes (on a CPU through TRITON_INTERPRET)"),
    time_budget: float = typer.Option(480.0, "--time-budget",
                                      help="seconds; scenarios that would not fit are skipped"),
    offload_layers: int = typer.Option(4, "--offload-layers",
                                       help="decoder layers built in pinned memory (offload)"),
    only: list[str] = typer.Option(None, "--only",
                                   help="tune | kernels | resident | offload | accelerate | "
                                   "e2e (repeatable) [default: all but e2e]"),
) -> None:
    """Benchmark the sparse kernels, resident and offloaded decode (writes JSON + Markdown)."""
    import os
    import sys
    from pathlib import Path

    import torch

    from ..bench.bench import check_only

    try:  # a misspelt scenario is named before anything else is said or run
        check_only(tuple(only or ()))
    except ValueError as exc:
        raise _user_error(exc) from None
    if not torch.cuda.is_available():
        if not small:
            raise _user_error(ValueError("bench needs a CUDA GPU; use --small for a CPU dry run"))
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import tempfile

    from ..bench.bench import BenchOptions, main
    from ..runtime.settings import REPO_ROOT

    if out is None:  # a dry run's meaningless numbers never land in the repository
        out = (tempfile.mkdtemp(prefix="dejavu-bench-") if small
               else str(REPO_ROOT / "bench" / "results"))
    try:
        failed = main(BenchOptions(out_dir=Path(out), small=small, time_budget_s=time_budget,
                                   offload_layers=offload_layers, only=tuple(only or ()),
                                   command="dejavu-run bench " + " ".join(sys.argv[2:])))
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        typer.echo(f"error: bench failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    if failed:
        typer.echo(f"error: {len(failed)} scenario(s) failed: {', '.join(failed)} (the results "
                   "file names each error)", err=True)
        raise typer.Exit(1)


# --- pipeline: launch, worker, chat, keys ----------------------------------------------------

@app.command()
def launch(
    workers: int = typer.Option(None, "--workers", help="worker processes (one per GPU)"),
    model: str = typer.Option(None, "--model", help="checkpoint directory or Hugging Face id"),
    run_dir: str = typer.Option(None, "--run-dir", help="private directory for ipc sockets"),
    config: str = typer.Option(None, "--config", help="settings file (default ./dejavu.toml)"),
    debug_fault: list[str] = typer.Option(None, "--debug-fault", hidden=True,
                                          help="tests only: worker=W,action=A[,step=K]..."),
    gpu_memory_gib: float = GPU_MEMORY_GIB,
) -> None:
    """Start the scheduler and N workers in the foreground (Ctrl-C stops them cleanly)."""
    import sys

    from ..runtime.settings import SettingsError, load_settings
    from ..scheduler.config import PipelineConfigError, from_settings
    from ..scheduler.launch import launch as run_launch
    from ..scheduler.logs import setup_logging
    from ..workers.faults import parse_fault

    try:
        settings = load_settings(config, {"model.path": model, "pipeline.workers": workers,
                                          "pipeline.run_dir": run_dir,
                                          "pipeline.gpu_memory_gib": gpu_memory_gib})
        faults = [parse_fault(spec) for spec in debug_fault or ()]
        cluster_config = from_settings(settings, faults=faults or None)
    except (SettingsError, PipelineConfigError, ValueError) as exc:
        raise _user_error(exc) from None
    setup_logging("scheduler")
    sys.exit(run_launch(cluster_config))


@app.command()
def worker(
    index: int = typer.Option(..., "--index", help="this worker's place in the pipeline"),
    control: str = typer.Option(..., "--control", help="the scheduler's control address"),
    keys_dir: str = typer.Option(None, "--keys-dir", help="CURVE keys (dejavu-run keys)"),
    run_dir: str = typer.Option(None, "--run-dir",
                                help="run directory of a local launch, whose keys to use"),
) -> None:
    """Run one worker that connects to a launch on another host ([pipeline] spawn = false)."""
    import sys

    from ..workers.main import main as worker_main

    argv = ["--index", str(index), "--control", control]
    argv += ["--keys-dir", keys_dir] if keys_dir else []
    sys.exit(worker_main(argv + (["--run-dir", run_dir] if run_dir else [])))


@app.command()
def chat(
    connect: str = typer.Option(None, "--connect", help="client address of a running launch"),
    workers: int = typer.Option(None, "--workers", help="start a launch of N workers for "
                                "this chat"),
    run_dir: str = RUN_DIR,
    model: str = typer.Option(None, "--model", help="checkpoint directory or Hugging Face id"),
    template: str = typer.Option(None, "--template", help="chat template TOML file"),
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = typer.Option(None, "--temperature", help="0 = greedy "
                                      f"[default: {CHAT_DEFAULTS['temperature']}]"),
    top_p: float = typer.Option(None, "--top-p", help="nucleus sampling mass "
                                f"[default: {CHAT_DEFAULTS['top_p']}]"),
    top_k: int = typer.Option(None, "--top-k", help="sample among the k most likely tokens, "
                              f"0 = no cut [default: {CHAT_DEFAULTS['top_k']}]"),
    seed: int = typer.Option(None, "--seed", help="turn i samples with a seed made from this "
                             "and i: a session replays exactly [default: fresh seeds]"),
    sparse: bool = typer.Option(None, "--sparse/--dense", help="in-process chat: contextual "
                                "sparsity (default: when predictors exist)"),
    config: str = typer.Option(None, "--config", help="settings file (default ./dejavu.toml)"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    gpu_memory_gib: float = GPU_MEMORY_GIB,
    repetition_penalty: float = typer.Option(
        None, "--repetition-penalty", help="divide the logits of tokens seen in the "
        "conversation or answer (>1 repeats less; 1 = off) "
        f"[default: {CHAT_DEFAULTS['repetition_penalty']}]"),
    frequency_penalty: float = FREQUENCY_PENALTY,
    presence_penalty: float = PRESENCE_PENALTY,
    min_p: float = MIN_P,
) -> None:
    """Chat in the terminal, streaming answers (/help, /reset, /stats, /quit).

    Joins a launch that is running (found through its run directory), else runs the model
    in this process; --workers N starts a launch for this chat, --connect names one."""
    from ..runtime.settings import load_settings
    from ..scheduler.discover import choose
    from .pipeline_generate import PIPELINE_ERRORS, start_chat

    try:
        settings = load_settings(config, {
            "model.path": model, "model.device": device, "model.dtype": dtype,
            "pipeline.workers": workers,
            "pipeline.run_dir": run_dir, "generation.max_new_tokens": max_new_tokens,
            "generation.temperature": temperature, "generation.top_p": top_p,
            "generation.top_k": top_k, "generation.seed": seed,
            "pipeline.gpu_memory_gib": gpu_memory_gib,
            **_penalties(repetition_penalty, frequency_penalty, presence_penalty, min_p)})
        target = choose(settings, connect=connect, run_dir=run_dir)
        code = start_chat(settings, target=target, template=template, sparse=sparse)
    except PIPELINE_ERRORS as exc:
        raise _user_error(exc) from None
    raise typer.Exit(code)


@app.command()
def keys(
    directory: str = typer.Argument(..., help="new directory for the cluster's CURVE keys"),
) -> None:
    """Create CURVE keys for a multi-host cluster (set [pipeline] keys_dir to the directory)."""
    from ..scheduler.transport import TransportError, create_keys

    try:
        out = create_keys(directory)
    except (TransportError, OSError) as exc:
        raise _user_error(exc) from None
    typer.echo(f"wrote server and client key pairs to {out}; copy the directory to every "
               "host and set [pipeline] keys_dir")
