import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def version() -> None:
    print("0.1.0")


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
    max_new_tokens: int = typer.Option(None, "--max-new-tokens"),
    temperature: float = typer.Option(None, "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(None, "--top-p"),
    top_k: int = typer.Option(None, "--top-k", help="0 = no cut"),
    seed: int = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    device: str = typer.Option(None, "--device", help="cpu | cuda"),
    dtype: str = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object at the end"),
    config: str = typer.Option(None, "--config", help="settings file (default ./dejavu.toml)"),
    sparse: bool = typer.Option(None, "--sparse/--dense",
                                help="contextual sparsity (default: when predictors exist)"),
) -> None:
    """Generate a continuation of one prompt (streams text; --json prints one object)."""
    from dejavu.runtime.settings import load_settings
    from dejavu.tools.generate import USER_ERRORS, GenerateRequest, run_generate

    try:
        settings = load_settings(config, {
            "model.path": model, "model.device": device, "model.dtype": dtype,
            "generation.max_new_tokens": max_new_tokens, "generation.temperature": temperature,
            "generation.top_p": top_p, "generation.top_k": top_k, "generation.seed": seed,
        })
        run_generate(settings, GenerateRequest(prompt, prompt_ids, tuple(stop or ())),
                     as_json=as_json, sparse=sparse)
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
    from dejavu.runtime.checkpoint import CheckpointError
    from dejavu.tools.convert import convert as run_convert

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
    from dejavu.runtime.settings import SettingsError, load_settings, render

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
    from dejavu.tools.train_model import main as train_main

    try:
        train_main(list(ctx.args))
    except ValueError as exc:
        raise _user_error(exc) from None


# --- serving: the OpenAI-compatible HTTP server ------------------------------------------

@app.command()
def serve(
    host: str = typer.Option(None, "--host", help="address to bind (default 127.0.0.1)"),
    port: int = typer.Option(None, "--port", help="TCP port (default 8000)"),
    api_key: str = typer.Option(None, "--api-key",
                                help="require 'Authorization: Bearer KEY' (all but /health)"),
    workers: int = typer.Option(None, "--workers", help="worker processes (1 = in-process)"),
    model: str = typer.Option(None, "--model", help="checkpoint directory or Hugging Face id"),
    max_batch: int = typer.Option(8, "--max-batch", help="sequences decoded together"),
    served_model_name: str = typer.Option(None, "--served-model-name",
                                          help="the model name clients use (default --model)"),
    config: str = typer.Option(None, "--config", help="settings file (default ./dejavu.toml)"),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (completions, chat, metrics)."""
    from dejavu.runtime.checkpoint import CheckpointError
    from dejavu.runtime.settings import SettingsError, load_settings
    from dejavu.runtime.tokenizer import TokenizerError
    from dejavu.scheduler.serve import ServeError, ServeOptions, run_server

    try:
        settings = load_settings(config, {"model.path": model, "serve.host": host,
                                          "serve.port": port, "pipeline.workers": workers})
        if max_batch < 1:
            raise ServeError(f"--max-batch {max_batch}: expected at least 1")
        options = ServeOptions(host=settings.serve.host, port=settings.serve.port,
                               api_key=api_key or None, workers=settings.pipeline.workers,
                               max_batch=max_batch, model_name=served_model_name)
        run_server(settings, options)
    except (SettingsError, CheckpointError, TokenizerError, ServeError) as exc:
        raise _user_error(exc) from None


# --- sparsity: train-predictors ---------------------------------------------------------------

@app.command("train-predictors")
def train_predictors(
    model: str = typer.Option(None, "--model", help="checkpoint directory or Hugging Face id"),
    data: str = typer.Option(..., "--data", help="calibration text: .txt, .jsonl or .jsonl.xz"),
    out: str = typer.Option(..., "--out", help="directory for predictors.safetensors + report"),
    tokens: int = typer.Option(100_000, "--tokens", help="calibration tokens (bounds memory)"),
    rank: int = typer.Option(128, "--rank", help="rank of the MLP predictors"),
    head_rank: int = typer.Option(64, "--head-rank", help="rank of the head predictors"),
    mlp_recall: float = typer.Option(0.95, "--mlp-recall",
                                     help="recall target that sets each layer's MLP top-k"),
    mlp_density: float = typer.Option(None, "--mlp-density",
                                      help="fixed MLP density instead of --mlp-recall"),
    head_density: float = typer.Option(0.5, "--head-density", help="heads kept per token"),
    epochs: int = typer.Option(4, "--epochs"),
    window: int = typer.Option(512, "--window", help="tokens per calibration sequence"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="model dtype while collecting"),
    config: str = typer.Option(None, "--config", help="settings file (default ./dejavu.toml)"),
) -> None:
    """Train per-layer DejaVu predictors (MLP neurons and heads) for a model."""
    from dejavu.runtime.checkpoint import CheckpointError
    from dejavu.runtime.settings import SettingsError, load_settings
    from dejavu.runtime.tokenizer import TokenizerError
    from dejavu.tools.collect_labels import CalibrationDataError
    from dejavu.tools.train_predictors import TrainConfig, run

    try:
        settings = load_settings(config, {"model.path": model})
        cfg = TrainConfig(tokens=tokens, window=window, mlp_rank=rank, head_rank=head_rank,
                          epochs=epochs, mlp_recall=mlp_recall, mlp_density=mlp_density,
                          head_density=head_density)
        run(settings.model_path(), data, out, cfg, device=device, dtype=dtype)
    except (SettingsError, CheckpointError, TokenizerError, CalibrationDataError,
            ValueError) as exc:
        raise _user_error(exc) from None


# --- kernels: bench ---------------------------------------------------------------------------

@app.command()
def bench(
    out: str = typer.Option("bench/results", "--out", help="directory for <date>-<gpu>.json/.md"),
    small: bool = typer.Option(False, "--small",
                               help="dry run: tiny shapes (on a CPU through TRITON_INTERPRET)"),
    time_budget: float = typer.Option(480.0, "--time-budget",
                                      help="seconds; scenarios that would not fit are skipped"),
    offload_layers: int = typer.Option(4, "--offload-layers",
                                       help="decoder layers built in pinned memory (offload)"),
    only: list[str] = typer.Option(None, "--only",
                                   help="tune | kernels | resident | offload | accelerate"),
) -> None:
    """Benchmark the sparse kernels, resident and offloaded decode (writes JSON + Markdown)."""
    import os
    import sys
    from pathlib import Path

    import torch

    if not torch.cuda.is_available():
        if not small:
            raise _user_error(ValueError("bench needs a CUDA GPU; use --small for a CPU dry run"))
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from dejavu.tools.bench import BenchOptions, main

    main(BenchOptions(out_dir=Path(out), small=small, time_budget_s=time_budget,
                      offload_layers=offload_layers, only=tuple(only or ()),
                      command="dejavu-run bench " + " ".join(sys.argv[2:])))
