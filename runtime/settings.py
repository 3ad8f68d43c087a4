"""Typed, validated run settings: defaults < dejavu.toml < command-line options.

Each section of dejavu.toml is a dataclass below; each field carries its own check (type,
range or choices) and a one-line description, used both in error messages and by
``dejavu-run config show``. Validation happens once, at load time: unknown sections or keys,
wrong types, NaN/inf and out-of-range values are ``SettingsError``s naming the key, the
value and what is accepted; invalid TOML is reported as path:line:col.

To add a setting: add a field with ``setting(...)`` to a section (or a new section class
to ``Settings``) and a commented line to dejavu.toml. Nothing else needs to change.

What this module does not know: what the settings do. Commands read them.
"""

import math
import re
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

# The repository root (for the shipped default model and the default config file).
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAME = "dejavu.toml"
# The project's shared data (evaluation tasks, training text), beside the repository: data
# paths resolve here, never against the working directory.
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_MODEL = "models/opt-gutenberg-31m"


class SettingsError(ValueError):
    """A setting that cannot be used; one line naming the key, the value and the fix."""


def setting(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
            choices: tuple[Any, ...] | None = None, low_open: bool = False) -> Any:
    """A dataclass field with its check and description (``low_open``: low is excluded)."""
    return field(default=default, metadata={"doc": doc, "low": low, "high": high,
                                            "choices": choices, "low_open": low_open})


@dataclass
class ModelSettings:
    path: str = setting(DEFAULT_MODEL, "checkpoint directory or Hugging Face id")
    dtype: str = setting("float32", "weight and activation dtype",
                         choices=("float32", "float16", "bfloat16"))
    device: str = setting("cpu", "where the in-process engine runs", choices=("cpu", "cuda"))


@dataclass
class GenerationSettings:
    max_new_tokens: int = setting(64, "tokens generated per request at most", low=1, high=2048)
    temperature: float = setting(0.0, "0 is greedy; higher is more random", low=0.0, high=100.0)
    top_p: float = setting(1.0, "nucleus sampling mass, 1 keeps everything", low=0.0, high=1.0,
                           low_open=True)
    top_k: int = setting(0, "sample among the k most likely tokens, 0 = no cut", low=0)
    seed: int | None = setting(None, "random seed (absent = a fresh seed per request)", low=0,
                               high=2**63 - 1)
    repetition_penalty: float = setting(
        1.0, "divide positive / multiply negative logits of tokens already in the prompt or "
        "output (Hugging Face, vLLM); 1 = off", low=0.1, high=10.0)
    frequency_penalty: float = setting(
        0.0, "subtract this x how often a token was generated (OpenAI); 0 = off",
        low=-2.0, high=2.0)
    presence_penalty: float = setting(
        0.0, "subtract this from every token already generated (OpenAI); 0 = off",
        low=-2.0, high=2.0)
    min_p: float = setting(0.0, "when sampling, drop tokens less likely than min_p x the most "
                           "likely one (vLLM); 0 = off", low=0.0, high=1.0)


# `chat`'s sampling wherever its command line says nothing ([generation] is for requests):
# greedy decoding repeats itself on a small base model ("Absolutely." ten times) and the
# repeat carries into later turns. A key the engine's SamplingParams lacks is skipped.
CHAT_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1}


@dataclass
class SparsitySettings:
    enabled: bool = setting(True, "run sparse when predictors are found (the predictors key, "
                            "else <model dir>/predictors); false = always dense")
    predictors: str | None = setting(None, "predictor directory or .safetensors file "
                                     "(absent = <model dir>/predictors)")
    mlp_density: float | None = setting(None, "fraction of MLP neurons computed per token "
                                        "(absent = each layer's trained operating point)",
                                        low=0.0, high=1.0, low_open=True)
    head_density: float | None = setting(None, "fraction of attention heads computed per token "
                                         "(absent = each layer's trained operating point)",
                                         low=0.0, high=1.0, low_open=True)
    dense_layers: str = setting("", "comma-separated layer ids always computed dense, e.g. \"0\"")
    mlp_recall: float | None = setting(0.955, "MLP threshold selection at this calibrated recall "
                                       "(one the predictor file stores: 0.8 ... 0.99); absent = "
                                       "the file's operating point", low=0.0, high=1.0,
                                       low_open=True)
    backend: str = setting("auto", "who computes the selected rows: \"triton\" kernels, "
                           "\"torch\", or \"auto\" (Triton on CUDA for float16/bfloat16)",
                           choices=("auto", "torch", "triton"))
    selector: str = setting("predictors", "who picks the rows: the trained \"predictors\", or "
                            "\"random\" (uniform at mlp_density/head_density, which it needs: "
                            "a benchmark baseline, e.g. for random-weight models)",
                            choices=("predictors", "random"))
    lookahead: bool = setting(False, "select an offloaded layer's rows one layer early and "
                              "start reading them while the layer before computes; across "
                              "workers, a stage sends the next stage's first selection ahead "
                              "of its activations")


@dataclass
class PipelineSettings:
    workers: int = setting(1, "worker processes (one per GPU), each owning a span of layers",
                           low=1, high=64)
    # The rest is read by `launch` (scheduler/config.py turns it into a PipelineConfig).
    slots: int = setting(8, "KV-cache slots per worker: sequences in flight at once",
                         low=1, high=1024)
    max_len: int = setting(0, "positions per cache slot; 0 = the model's maximum", low=0)
    micro_batches: int = setting(0, "batches cycling through the pipeline; 0 = workers + 1 "
                                 "(1 for one worker), at most the slots",
                                 low=0, high=1024)
    run_dir: str = setting("", "private directory of the ipc sockets and the lock; \"\" = "
                           "$XDG_RUNTIME_DIR/dejavu-run or /tmp/dejavu-run-<uid>")
    control_address: str = setting("", "scheduler <-> workers address; \"\" = ipc:// in run_dir")
    client_address: str = setting("", "client API address (chat, generate --connect); \"\" = "
                                  "ipc:// in run_dir")
    data_addresses: str = setting("", "comma-separated data addresses of workers 1..N-1; "
                                  "\"\" = ipc:// in run_dir")
    keys_dir: str = setting("", "CURVE keys from `dejavu-run keys`; required for any address "
                            "other than ipc:// or 127.0.0.1")
    spawn: bool = setting(True, "start the workers here; false = wait for workers started on "
                          "other hosts with `dejavu-run worker`")
    heartbeat_s: float = setting(1.0, "seconds between worker heartbeats; 3 missed = dead",
                                 low=0.0, high=60.0, low_open=True)
    watchdog_s: float = setting(60.0, "a step running longer than this stops its worker",
                                low=0.0, high=86400.0, low_open=True)
    handshake_timeout_s: float = setting(30.0, "seconds a worker waits for its setup",
                                         low=0.0, high=3600.0, low_open=True)
    startup_timeout_s: float = setting(600.0, "seconds a worker may take to load its layers",
                                       low=0.0, high=86400.0, low_open=True)
    drain_timeout_s: float = setting(30.0, "on Ctrl-C/SIGTERM, seconds running requests get "
                                     "to finish", low=0.0, high=3600.0)
    restart: str = setting("never", "when a worker dies: stop the cluster, or restart it",
                           choices=("never", "on-failure"))
    max_restarts: int = setting(3, "restarts per worker before the cluster stops", low=0)
    gpu_memory_gib: float | None = setting(
        None, "GPU memory per worker in GiB (weights, KV cache, activations); layers that do "
        "not fit stay in pinned host memory and only their selected rows are read; needs "
        "[model] dtype float16 or bfloat16; absent = no limit", low=0.0, high=1e6,
        low_open=True)
    offload_cache: bool = setting(
        False, "with gpu_memory_gib: the budget left after whole layers caches recently read "
        "rows of offloaded layers (LRU); off by default: a miss reads its row twice, and no "
        "GPU run has yet shown a net gain")
    data_plane: str = setting(
        "auto", "activations between neighbouring workers of one host: \"auto\" = through "
        "buffers the two share (CUDA IPC on GPUs, shared memory on CPUs) where they can, else "
        "the socket; \"socket\" = always the ZeroMQ socket", choices=("auto", "socket"))
    data_plane_slots: int = setting(4, "shared buffers each receiving worker offers (hops in "
                                    "flight; when all are in use a hop takes the socket)",
                                    low=1, high=64)
    data_plane_slot_mib: float = setting(16.0, "MiB per shared buffer at most; a larger "
                                         "activation (a long prefill batch) takes the socket",
                                         low=0.0, high=4096.0, low_open=True)
    data_plane_spin_us: float = setting(
        0.0, "after a step, microseconds a worker spins on its shared ring for the next hop "
        "before it sleeps on the socket (a hop then skips the socket's thread wake-ups); 0 = "
        "off, the default: one hop alone gains (bench_hops), but in a 2-worker pipeline on "
        "one H100 no hop was picked up early (the slower stage's input was already queued) "
        "and a spin takes a core",
        low=0.0, high=100000.0)


@dataclass
class ServeSettings:
    host: str = setting("127.0.0.1", "address the HTTP server binds")
    port: int = setting(8000, "TCP port of the HTTP server", low=1, high=65535)
    max_pending: int = setting(256, "requests accepted at once (running + waiting); more get "
                               "429", low=1, high=1_000_000)
    max_body_kib: int = setting(4096, "largest request body in KiB; a larger one gets 413",
                                low=1, high=1 << 20)
    chat_max_tokens: int = setting(256, "tokens a chat completion without max_tokens may "
                                   "generate (fewer when the context has less room left)",
                                   low=1, high=1 << 20)
    max_connections: int = setting(1024, "open HTTP connections at most; at the cap a new "
                                   "one closes the longest-idle connection, else gets 503",
                                   low=1, high=1_000_000)
    idle_timeout_s: float = setting(5.0, "seconds a keep-alive connection may wait for its "
                                    "next request", low=0.0, high=3600.0, low_open=True)
    header_timeout_s: float = setting(10.0, "seconds a request's headers may take to arrive",
                                      low=0.0, high=3600.0, low_open=True)
    body_timeout_s: float = setting(30.0, "seconds a request's body may take to arrive",
                                    low=0.0, high=3600.0, low_open=True)
    tokenize_threads: int = setting(1, "threads that tokenise long prompts off the event loop",
                                    low=1, high=64)
    tokenize_queue: int = setting(8, "long prompts being tokenised or waiting for a thread; "
                                  "more get 503 with Retry-After", low=1, high=4096)


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    sparsity: SparsitySettings = field(default_factory=SparsitySettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    # "section.key" -> "default" | "<path to dejavu.toml>" | "command line"
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # Directory that a relative path from the config file is relative to (a str: the
    # settings cross process boundaries whole, runtime/wire.py).
    config_dir: str | None = field(default=None, compare=False, repr=False)

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("sources", "config_dir")}

    def model_path(self) -> str:
        """[model] path, with a relative path resolved against the file it came from (the
        repository root for the default); a value that is no such directory is passed on
        unchanged (a Hugging Face id, or a path the loader will report as missing)."""
        value = self.model.path
        source = self.sources.get("model.path", "default")
        if Path(value).is_absolute():
            return value
        if source == "default":  # the shipped model, wherever the command runs from
            return str(REPO_ROOT / value)
        base = Path(self.config_dir) if self.config_dir and source != "command line" else None
        if base is not None and (base / value).is_dir():
            return str(base / value)
        return value

    def predictors_path(self) -> Path | None:
        """[sparsity] predictors as a path: a relative one from dejavu.toml is relative to
        that file's directory, one from the command line to the working directory; None
        when unset (then <model dir>/predictors is looked for)."""
        value = self.sparsity.predictors
        if not value:
            return None
        source = self.sources.get("sparsity.predictors", "default")
        if Path(value).is_absolute() or not self.config_dir or source == "command line":
            return Path(value)
        return Path(self.config_dir) / value


# --- validation ------------------------------------------------------------------------------


def _expected(f: Any) -> str:
    meta, kind = f.metadata, _base_type(f)
    if meta["choices"]:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        what += f" in {'(' if meta['low_open'] else '['}{low}, {high}]"
    elif low is not None:
        what += f" {'>' if meta['low_open'] else '>='} {low}"
    return what


def _base_type(f: Any) -> type:
    # Annotations are real types here (no `from __future__ import annotations`).
    if isinstance(f.type, types.UnionType):  # `int | None`: optional, absent = None
        return next(a for a in typing.get_args(f.type) if a is not type(None))
    return f.type


def check_value(section: str, f: Any, value: Any, where: str) -> Any:
    """Return the value converted to the field's type, or raise naming key, value and fix."""
    kind = _base_type(f)
    key = f"[{section}] {f.name} = {value!r}"
    fix = f"expected {_expected(f)} ({f.metadata['doc']})"
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[kind]
    if not ok:
        raise SettingsError(f"{where}: {key} has the wrong type; {fix}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise SettingsError(f"{where}: {key} is not a finite number; {fix}")
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise SettingsError(f"{where}: {key} is not allowed; {fix}")
    if meta["low"] is not None and meta["low_open"] and value == meta["low"]:
        raise SettingsError(f"{where}: {key} is out of range; {fix}")
    if (meta["low"] is not None and value < meta["low"]) or (
            meta["high"] is not None and value > meta["high"]):
        raise SettingsError(f"{where}: {key} is out of range; {fix}")
    return value


def _apply(settings: Settings, raw: dict[str, Any], where: str) -> None:
    sections = settings.sections()
    for name, table in raw.items():
        if name not in sections:
            raise SettingsError(f"{where}: unknown section [{name}]; known sections: "
                                f"{', '.join(sections)}")
        if not isinstance(table, dict):
            raise SettingsError(f"{where}: {name} = {table!r} should be a section [{name}]")
        section = sections[name]
        known = {f.name: f for f in fields(section)}
        for key, value in table.items():
            if key not in known:
                raise SettingsError(f"{where}: unknown key [{name}] {key}; known keys: "
                                    f"{', '.join(known)}")
            setattr(section, key, check_value(name, known[key], value, where))
            settings.sources[f"{name}.{key}"] = where


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        # Python 3.11's error has no line/column attributes, only "(at line L, column C)".
        found = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if found:
            line, col = found.groups()
        else:  # "(at end of document)"
            line, col = str(text.count("\n") + 1), str(len(text.rsplit("\n", 1)[-1]) + 1)
        reason = re.sub(r"\s*\(at [^)]*\)$", "", msg)
        raise SettingsError(f"{path}:{line}:{col}: invalid TOML: {reason}") from None


def make_settings(values: dict[str, Any]) -> Settings:
    """Defaults, then ``values`` ({"section.key": value}), validated as command-line
    options are; no file is read (benchmarks, tests, embedding)."""
    return load_settings(None, values, find_file=False)


def load_settings(path: str | Path | None = None,
                  overrides: dict[str, Any] | None = None, *,
                  find_file: bool = True) -> Settings:
    """Defaults, then the config file (``path``; or ./dejavu.toml when it exists and
    ``find_file``), then ``overrides`` ({"section.key": value}; a None value means "not
    given")."""
    settings = Settings()
    for section_name, section in settings.sections().items():
        for f in fields(section):
            settings.sources[f"{section_name}.{f.name}"] = "default"
            if f.default is MISSING:  # pragma: no cover - every setting has a default
                raise SettingsError(f"[{section_name}] {f.name} has no default")
    if path is None and find_file and Path(CONFIG_NAME).is_file():
        path = Path(CONFIG_NAME)
    if path is not None:
        path = Path(path)
        _apply(settings, read_toml(path), str(path))
        settings.config_dir = str(path.resolve().parent)
    sections = settings.sections()
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        name, _, key = dotted.partition(".")
        known = {f.name: f for f in fields(sections[name])}
        # Name the option the user typed: --max-new-tokens for generation.max_new_tokens
        # (--model for model.path, the one that does not follow the rule).
        option = "--model" if dotted == "model.path" else "--" + key.replace("_", "-")
        setattr(sections[name], key,
                check_value(name, known[key], value, f"command line {option}"))
        settings.sources[dotted] = "command line"
    _check_combinations(settings)
    return settings


def _where(settings: Settings, dotted: str) -> str:
    source = settings.sources.get(dotted, "default")
    return f"command line --{dotted.partition('.')[2].replace('_', '-')}" \
        if source == "command line" else source


def _check_combinations(settings: Settings) -> None:
    """Rules between keys, checked once every source has been applied (a key may come from
    the file and the other from the command line)."""
    budget, dtype = settings.pipeline.gpu_memory_gib, settings.model.dtype
    if budget is not None and dtype == "float32":
        raise SettingsError(
            f"{_where(settings, 'pipeline.gpu_memory_gib')}: [pipeline] gpu_memory_gib = "
            f"{budget!r} needs [model] dtype = \"float16\" or \"bfloat16\" (layers that do not "
            f"fit run on the Triton kernels, which support only those), but dtype is "
            f"\"float32\" (from {_where(settings, 'model.dtype')}); set [model] dtype = "
            "\"float16\" in dejavu.toml (or pass --dtype float16) or remove gpu_memory_gib")
    sparsity = settings.sparsity
    if sparsity.selector == "random" and (sparsity.mlp_density is None
                                          or sparsity.head_density is None):
        raise SettingsError(
            f"{_where(settings, 'sparsity.selector')}: [sparsity] selector = \"random\" needs "
            "mlp_density and head_density (the fractions it draws uniformly per token); "
            "set both")


def render(settings: Settings) -> str:
    """The effective settings as TOML, each line commented with where its value came from."""
    lines: list[str] = []
    for name, section in settings.sections().items():
        lines.append(f"[{name}]")
        for f in fields(section):
            value = getattr(section, f.name)
            source = settings.sources.get(f"{name}.{f.name}", "default")
            # TOML has no null: an unset optional key is shown commented out.
            text = f"# {f.name} (unset)" if value is None else f"{f.name} = {_toml_value(value)}"
            lines.append(f"{text:<44} # from {source}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
