"""Train predictors one decoder layer at a time, for models larger than the GPU and the host.

Each layer's weights are read once from the checkpoint (``layer_reader.LayerReader``:
``load_model`` of the one-layer span, only its tensors, straight from safetensors, read on
a background thread while the layer before runs), run over every calibration token, and
freed. What the later layers need stays on the host between layers: the residual stream
of every token (in the compute dtype) and the predictor input of the next layer (float16;
the wiring of ``sparse.predictor_source``, which reads at most one layer back). The pass
records the layer's labels (``collect_labels.label_hooks``), fits the layer's predictors
(``train_predictors.train_layer``) and writes them, with their frequencies and report row,
to OUT/partial/layer-NNNNN.safetensors before the next layer starts. Peak memory is two
layers (the one running and the next being read, with its MLP predictor's starting point)
plus these activations and, where they fit the GPU budget, one layer's labels on the GPU.

With ``fit_behind`` (where the budget holds a second copy of a layer's tables) a layer's
fit runs on a thread and stream of its own (``FitBehind``), on that copy, while the next
layer is read and run forward, so that the fit's many small kernels and the forward pass's
few large ones share the GPU instead of taking turns. Off by default: on an H100 at the
OPT-13B shape it was no faster (42.7 s against 41.2 s in line), the reader's MLP start then
being the slowest of the three (bench/NOTES.md, seventh session).

Each layer's log line and report row split its wall time: waiting for the weights
(``read_s``; ``load_s`` and ``init_s`` say how long reading and layer_hash + the MLP
predictor's start took on the reader's thread, overlapped), ``forward_s``, ``tables_s``,
``mlp_fit_s``, ``head_fit_s``, ``calibrate_s``, ``frequencies_s`` and ``save_s``; fitting
behind, the caller's part is ``read_s``, ``forward_s``, ``fit_wait_s`` (for the layer
before's fit) and ``copy_s``, and the rest ran on the fit's thread. On CUDA each phase
ends with a synchronisation of its thread's stream, so it is charged for its own kernels.

Before any work, ``plan_resources`` sizes the run: activations and labels stay in host
memory when they fit the host budget, else they are numpy memmaps in OUT/partial (the page
cache keeps what it can); when neither fits, or one layer does not fit the GPU budget, it
raises ``ResourceError`` naming the numbers.

Resuming: a rerun with the same settings and data keeps the finished layers. Spilled
activations are double-buffered by layer parity (layer l reads buffers l % 2 and writes
(l + 1) % 2), so a run killed inside layer l finds layer l's inputs intact; activations
held in memory are rebuilt by running the finished layers forward again (no fitting).

The result equals ``train_predictors.train_predictors`` (the whole model in memory) run
with the same settings: the same labels and inputs, token for token, and the same seeds.

What this module does not know: how a layer's predictors are fitted or scored
(train_predictors) or what the labels mean (collect_labels).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..runtime.checkpoint import inspect_checkpoint, load_model, parse_dtype, resolve_model_dir
from ..runtime.model import Batch, full_positions
from ..runtime.opt_config import OPTConfig
from ..runtime.predictors import (
    Fingerprint,
    Frequencies,
    OperatingPoint,
    PredictorSet,
    config_hash,
)
from ..runtime.selection import count
from ..runtime.sparse import predictor_source
from .collect_labels import Collected, calibration_windows, iter_texts, label_hooks
from .layer_reader import LayerReader
from .progress import Bar
from .textdata import check_text_file
from .train_predictors import (
    Clock,
    TrainConfig,
    _split,
    finish,
    fit_steps,
    init_layer,
    layer_frequencies,
    layer_line,
    make_report,
    train_layer,
    write_outputs,
)

WORK = "partial"  # OUT/partial: finished layers and spilled activations until the end
GIB = 2**30
CHUNK = 8  # windows per forward batch (the whole-model collector's batch)
BEHIND_CHUNK = 2  # the fewest windows per forward batch that fitting behind may leave


class ResourceError(ValueError):
    """The memory or disk a training run needs is not there (raised before any work)."""


# --- sizing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    tokens: int
    chunk: int  # windows per forward batch
    spill: bool  # activations and labels as memmaps in OUT/partial
    tables_on_device: bool  # a layer's inputs and labels move to the device to be fitted
    activation_bytes: int  # residual + next predictor input, two buffers each
    label_bytes: int  # one layer's neuron bits and head norms
    layer_bytes: int  # the largest one-layer span (embeddings or LM head included)
    init_bytes: int  # computing an MLP predictor's starting point from a layer
    host_bytes: int
    disk_bytes: int
    device_bytes: int  # 0 on the CPU
    fit_behind: bool = False  # a layer's fit runs beside the next layer's read and forward
    in_line_why: str = ""  # why a fit asked for behind runs in line

    def describe(self) -> str:
        where = "memmaps in OUT/partial" if self.spill else "host memory"
        dev = f", device {size(self.device_bytes)}" if self.device_bytes else ""
        labels = " (on the GPU while fitted)" if self.tables_on_device else ""
        behind = ("; each layer fitted behind the next one's forward pass, on a copy of its "
                  "tables" if self.fit_behind else "; each layer fitted in line"
                  + (f" ({self.in_line_why})" if self.in_line_why else ""))
        return (f"plan: {self.tokens} tokens; activations {size(self.activation_bytes)} "
                f"+ labels {size(self.label_bytes)} in {where}{labels}; two layers of "
                f"{size(self.layer_bytes)} (one running, the next being read) + "
                f"{size(self.init_bytes)} for its predictor's start{behind}; host "
                f"{size(self.host_bytes)}, disk {size(self.disk_bytes)}{dev}")


def size(nbytes: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def layer_params(c: OPTConfig) -> int:
    """Parameters of the largest one-layer span: a decoder layer plus the embeddings (first
    layer) or the LM head and final norm (last layer), whichever is larger; both for a
    one-layer model."""
    layer = 4 * c.hidden_size * (c.hidden_size + 1) + 2 * c.hidden_size * c.ffn_dim \
        + c.ffn_dim + 5 * c.hidden_size
    proj = c.word_embed_proj_dim * c.hidden_size if c.has_projections else 0
    embed = c.vocab_size * c.word_embed_proj_dim + \
        (c.max_position_embeddings + 2) * c.hidden_size + proj
    head = c.vocab_size * c.word_embed_proj_dim + proj + 2 * c.hidden_size
    return layer + (embed + head if c.num_hidden_layers == 1 else max(embed, head))


def predictor_bytes(c: OPTConfig, cfg: TrainConfig) -> int:
    per = (c.hidden_size * cfg.mlp_rank + cfg.mlp_rank * c.ffn_dim + c.ffn_dim
           + c.hidden_size * cfg.head_rank + cfg.head_rank * c.num_attention_heads
           + c.num_attention_heads + c.ffn_dim + c.num_attention_heads)
    return 4 * per * c.num_hidden_layers


def plan_resources(c: OPTConfig, cfg: TrainConfig, *, tokens: int, window: int,
                   dtype: torch.dtype, on_gpu: bool, host_budget: int, disk_free: int,
                   device_budget: int = 0, fit_behind: bool = False) -> Plan:
    """Where the run keeps what, and what it needs; ``ResourceError`` if it cannot run.
    Budgets and free space are in bytes (the caller measures them). ``fit_behind``: fit
    each layer beside the next layer's forward pass, on a copy of its tables, where the copy
    fits (else in line, ``in_line_why`` says why)."""
    dsize = torch.empty((), dtype=dtype).element_size()
    n, cdim, f, h = tokens, c.hidden_size, c.ffn_dim, c.num_attention_heads
    acts = 2 * n * cdim * (dsize + 2)
    labels = n * ((f + 7) // 8 + 2 * h + 2 * cdim)  # with the layer's own MLP input
    layer = layer_params(c) * dsize
    # svd_weights: a float64 copy of fc1 and, hidden x hidden, its Gram matrix, the
    # eigenvectors and the solver's work space.
    init = (f * cdim + 3 * cdim * cdim) * 8 if cfg.mlp_init == "svd" else 0
    ahead = 2 * layer + init  # the running layer, the next one and its predictor's start
    n_eval = math.ceil(n / 10) + window  # calibrate or report split (10% of documents)
    # Fitting: scores and labels of one evaluation split [n_eval, F] (float32 + bool), a
    # training batch, and the predictors with AdamW's two moments.
    fit = n_eval * f * 5 + cfg.batch_size * (cdim + f) * 8 + 4 * predictor_bytes(
        c, cfg) // c.num_hidden_layers
    tables = n * (4 * cdim + (f + 7) // 8 + 2 * h)  # inputs, bits and norms of one layer

    def forward(chunk: int) -> int:  # one forward batch; CPU attention materializes T x T
        t = chunk * window
        attn = chunk * h * window * window * 4 if not on_gpu or dsize == 4 else 0
        return t * (6 * cdim + 2 * f) * max(dsize, 4) + attn

    chunk, tables_on_device, device_bytes = CHUNK, False, 0
    if on_gpu:
        while chunk > 1 and ahead + forward(chunk) + fit > device_budget:
            chunk //= 2
        device_bytes = ahead + forward(chunk) + fit
        if device_bytes > device_budget:
            raise ResourceError(
                f"one layer needs {size(device_bytes)} on the GPU (weights of it and the "
                f"next one read ahead 2 x {size(layer)}, the next one's predictor start "
                f"{size(init)}, a forward batch of one {window}-token window "
                f"{size(forward(1))}, fitting {size(fit)}), more than the budget of "
                f"{size(device_budget)}; raise --gpu-memory-gib or train on the CPU")
        tables_on_device = device_bytes + tables <= device_budget
        device_bytes += tables if tables_on_device else 0
        # A layer passes through the host tensor by tensor; fitting gathers rows there.
        base = layer + fit
    else:
        base = ahead + forward(chunk) + fit
    outputs = 2 * predictor_bytes(c, cfg)  # the layer files and the final file
    if base > host_budget:
        parts = (f"its weights {size(layer)} in {str(dtype).removeprefix('torch.')}"
                 + ("" if on_gpu else
                    f", twice (the next layer is read ahead), the next one's predictor start "
                    f"{size(init)}, a forward batch of {chunk} {window}-token windows "
                    f"{size(forward(chunk))}") + f", fitting {size(fit)}")
        raise ResourceError(
            f"one layer needs {size(base)} of host memory ({parts}), more than the "
            f"{size(host_budget)} available; free memory or raise --host-memory-gib")
    spill = base + acts + labels > host_budget
    disk = outputs + (acts + labels if spill else 0)
    if disk > disk_free:
        why = (f"activations and labels of {n} tokens ({size(acts + labels)}) do "
               f"not fit the host memory budget ({size(host_budget - base)} after "
               "one layer) and must go to disk, which" if spill else "the outputs")
        raise ResourceError(
            f"{why} needs {size(disk)} free in the output directory, which has "
            f"{size(disk_free)}; lower --tokens or put --out on a larger disk")
    host_bytes = base + (0 if spill else acts + labels)
    # Fitting behind: the fit reads a copy of the layer's tables (the next forward pass
    # overwrites them), where they are fitted; never with spilled activations, whose
    # parity buffers a resumed run needs intact (the next layer's pass overwrites layer l's
    # inputs before layer l's file is written).
    # On a GPU the copy may take forward batches down to BEHIND_CHUNK windows (a forward
    # batch of a few thousand tokens keeps the GPU as busy as a larger one).
    why = ""
    if fit_behind and spill:
        fit_behind, why = False, ("the activations go to disk, and a resumed run needs a "
                                  "layer's inputs there intact until its fit is written")
    elif fit_behind and on_gpu:
        def device_need(chunk: int) -> int:  # both copies of the tables on the device
            return ahead + forward(chunk) + fit + 2 * tables

        behind = chunk
        while behind > BEHIND_CHUNK and device_need(behind) > device_budget:
            behind //= 2
        if device_need(behind) <= device_budget:
            chunk, tables_on_device, device_bytes = behind, True, device_need(behind)
        else:
            fit_behind, why = False, (
                f"a second copy of a layer's tables needs {size(device_need(behind))} of "
                f"GPU memory, more than the budget of {size(device_budget)}")
    elif fit_behind:
        if host_bytes + tables <= host_budget:
            host_bytes += tables
        else:
            fit_behind, why = False, (
                f"a second copy of a layer's tables needs {size(host_bytes + tables)} of "
                f"host memory, more than the {size(host_budget)} available")
    return Plan(n, chunk, spill, tables_on_device, acts, labels, layer, init,
                host_bytes, disk, device_bytes, fit_behind, why)


def host_available() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --- the state kept between layers -------------------------------------------------------------


class Buffers:
    """Per-token tables: residual and predictor input (two of each, by layer parity) and
    one layer's labels; torch tensors in memory (pinned with ``pin``, so a GPU's copies in
    and out run at the link's speed without a bounce through pageable memory), or views of
    memmaps in ``work``. With ``labels`` a GPU, the layer's labels and MLP input live there
    instead: the forward writes them where they are fitted (no round trip through the host)
    and no later layer reads them."""

    def __init__(self, n: int, c: OPTConfig, dtype: torch.dtype, work: Path | None,
                 pin: bool = False, labels: torch.device | None = None) -> None:
        self.work, self._maps, self.pin = work, [], pin and work is None
        self.resid = [self._table(f"resid-{p}", (n, c.hidden_size), dtype) for p in (0, 1)]
        self.source = [self._table(f"source-{p}", (n, c.hidden_size), torch.float16)
                       for p in (0, 1)]
        on = labels if labels is not None and labels.type != "cpu" else None
        self.mlp_in = self._table("mlp-in", (n, c.hidden_size), torch.float16, on)
        self.bits = self._table("bits", (n, (c.ffn_dim + 7) // 8), torch.uint8, on)
        self.norms = self._table("norms", (n, c.num_attention_heads), torch.float16, on)

    def _table(self, name: str, shape: tuple[int, int], dtype: torch.dtype,
               device: torch.device | None = None) -> Tensor:
        if device is not None:
            return torch.empty(shape, dtype=dtype, device=device)
        if self.work is None:
            if self.pin:
                try:
                    return torch.empty(shape, dtype=dtype, pin_memory=True)
                except RuntimeError:  # page-locked memory refused: pageable, slower copies
                    self.pin = False
            return torch.empty(shape, dtype=dtype)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        path = self.work / f"{name}.bin"
        # r+ keeps what an interrupted run wrote; w+ creates (zero-filled, sparse on disk).
        mode = "r+" if path.is_file() and path.stat().st_size == nbytes else "w+"
        m = np.memmap(path, dtype=np.uint8, mode=mode, shape=(nbytes,))
        self._maps.append(m)
        return torch.from_numpy(m).view(dtype).view(shape)  # bfloat16 has no numpy dtype

    @property
    def spilled(self) -> bool:
        return self.work is not None

    def flush(self) -> None:
        for m in self._maps:
            m.flush()


class Work:
    """OUT/partial: the run's key (settings, model and data: ``run_parts``) and its finished
    layers. A directory left by another run is started over, naming what differs."""

    def __init__(self, path: Path, parts: dict, log) -> None:
        self.path, self.key = path, run_key(parts)
        stamp = path / "run.json"
        if path.is_dir():
            try:
                old = json.loads(stamp.read_text())
            except (OSError, ValueError):
                old = {}
            if old.get("key") != self.key:
                log(f"{path}: left by a run with {differences(old.get('parts'), parts)}; "
                    "starting over")
                shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"key": self.key, "parts": parts}) + "\n")

    def layer_file(self, layer: int) -> Path:
        return self.path / f"layer-{layer:05d}.safetensors"

    def finished(self, layers: int) -> int:
        """How many layers from the first are finished (a later one alone does not count)."""
        done = 0
        while done < layers and self.layer_file(done).is_file():
            done += 1
        return done

    def save_layer(self, layer: int, preds: PredictorSet, freq: Frequencies, row: dict,
                   lhash: str) -> None:
        tensors = {f"{kind}.{name}": t.detach().to("cpu").contiguous()
                   for kind, table in (("mlp", preds.mlp), ("heads", preds.heads))
                   for name, t in table[layer].state_dict().items()}
        tensors["freq.mlp"] = freq.mlp[layer].contiguous()
        tensors["freq.heads"] = freq.heads[layer].contiguous()
        meta = {"key": self.key, "layer_hash": lhash, "row": json.dumps(row),
                "point": json.dumps(asdict(preds.points[layer]))}
        tmp = self.layer_file(layer).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.layer_file(layer))  # a layer is finished once its file exists

    def load_layer(self, layer: int, preds: PredictorSet, freq: Frequencies, cfg: TrainConfig
                   ) -> tuple[dict, str]:
        with safe_open(str(self.layer_file(layer)), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        preds.mlp[layer], preds.heads[layer] = init_layer(preds.config, layer, cfg)
        for kind, table in (("mlp", preds.mlp), ("heads", preds.heads)):
            table[layer].load_state_dict({k[len(kind) + 1:]: v for k, v in tensors.items()
                                          if k.startswith(kind + ".")})
        preds.points[layer] = OperatingPoint(**json.loads(meta["point"]))
        freq.mlp[layer], freq.heads[layer] = tensors["freq.mlp"], tensors["freq.heads"]
        return json.loads(meta["row"]), meta["layer_hash"]


def run_parts(c: OPTConfig, cfg: TrainConfig, dtype: torch.dtype, windows: Tensor,
              docs: Tensor) -> dict:
    """What a run's results depend on, part by part: the model's config, the dtype, the
    settings (all but the memory cap) and the calibration windows."""
    data = hashlib.sha256(windows.to(torch.int64).numpy().tobytes())
    data.update(docs.to(torch.int64).numpy().tobytes())
    return {"model": config_hash(c), "dtype": str(dtype).removeprefix("torch."),
            "settings": {k: v for k, v in asdict(cfg).items() if k != "max_memory_gb"},
            "data": data.hexdigest()}


def run_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# TrainConfig fields whose train-predictors option is named otherwise.
_FLAGS = {"mlp_rank": "--rank", "mlp_select": "--select", "seed": "seed"}


def differences(old: dict | None, new: dict) -> str:
    """What changed between two runs' ``run_parts``, in words."""
    if not isinstance(old, dict):
        return "other settings, model or data (written before runs named them)"
    said = [f"{name} {old.get(name)} -> {new[name]}" if name == "dtype" else
            {"model": "another model", "data": "other calibration data"}[name]
            for name in ("model", "dtype", "data") if old.get(name) != new[name]]
    before = old.get("settings") or {}
    said += [f"{_FLAGS.get(k, '--' + k.replace('_', '-'))} {before.get(k)!r} -> {v!r}"
             for k, v in new["settings"].items() if before.get(k) != v]
    return ", ".join(said) or "other settings"


# --- one layer ---------------------------------------------------------------------------------


@torch.no_grad()
def forward_layer(span, layer_id: int, windows: Tensor, bufs: Buffers, chunk: int,
                  labels: bool, bar: Phases | None = None) -> None:
    """Run layer ``layer_id`` (the only layer of ``span``) over every window: read its
    input from the parity buffers (the embeddings for layer 0), write its output and the
    next layer's predictor input to the other parity, and with ``labels`` fill the label
    tables through the collector's hooks."""
    layer = span.layers()[0]
    n_layers, cdim = span.config.num_hidden_layers, span.config.hidden_size
    dev = next(layer.parameters()).device
    dtype = next(layer.parameters()).dtype
    here, nxt = predictor_source(layer_id), predictor_source(layer_id + 1)
    if here.layer not in (layer_id - 1, layer_id):
        raise ValueError(f"layer {layer_id}'s predictors read layer {here.layer}: training "
                         "one layer at a time keeps only the previous layer's tensors")
    cur, new = layer_id % 2, (layer_id + 1) % 2
    t = windows.shape[1]
    rows = [0, 0]
    hooks = label_hooks(
        layer, lambda b: _store(bufs.bits[rows[0]:rows[1]], b),
        lambda n: _store(bufs.norms[rows[0]:rows[1]], n)) if labels else []
    try:
        for s in range(0, windows.shape[0], chunk):
            ids = windows[s:s + chunk]
            b = ids.shape[0]
            rows[:] = [s * t, (s + b) * t]
            batch = Batch(full_positions(b, t, dev))
            if layer_id == 0:
                h = span.embed(ids.to(dev), batch.positions)
            else:
                h = bufs.resid[cur][rows[0]:rows[1]].to(dev, non_blocking=True).to(
                    dtype).view(b, t, cdim)
            sites = {"layer_in": h}
            sites["mlp_in"] = layer.attention_block(h, batch)
            out = layer.mlp_block(sites["mlp_in"])
            if here.layer == layer_id:
                _store(bufs.source[cur][rows[0]:rows[1]], sites[here.site])
            if labels:
                _store(bufs.mlp_in[rows[0]:rows[1]], sites["mlp_in"])
            if layer_id + 1 < n_layers:
                if nxt.layer == layer_id:
                    _store(bufs.source[new][rows[0]:rows[1]], sites[nxt.site])
                _store(bufs.resid[new][rows[0]:rows[1]], out)
            if bar is not None:
                bar.advance(b * t)
    finally:
        for hook in hooks:
            hook.remove()
        if dev.type == "cuda":
            # The tables' copies out have landed; this stream only, not the one that reads
            # the next layer ahead.
            torch.cuda.current_stream(dev).synchronize()


def _store(table: Tensor, x: Tensor) -> None:
    """Copy ``x`` (rows of it, on the device) into ``table`` (host rows), converted on the
    device first; without a wait when the table is pinned (``forward_layer`` synchronises
    once at its end)."""
    x = x.reshape(table.shape).to(table.dtype)
    table.copy_(x, non_blocking=table.is_pinned())


# --- the run -----------------------------------------------------------------------------------


class Phases:
    """One progress bar per phase of a layer (read, forward, fit), advanced step by step;
    drawn only on a terminal (tools/progress.Bar)."""

    def __init__(self, stream=None) -> None:
        self.stream, self.bar, self.done = stream, None, 0

    def start(self, desc: str, total: int, unit: str) -> None:
        self.bar, self.done = Bar(desc, total, unit, self.stream), 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.done)


# The phases of a layer's wall time on the caller's thread, in order, and the two that ran
# on the reader's thread (overlapped with the layer before when reading ahead).
PHASES = ("read_s", "forward_s", "tables_s", "mlp_fit_s", "head_fit_s", "calibrate_s",
          "frequencies_s", "save_s")
FIT_PHASES = ("tables_s", "mlp_fit_s", "head_fit_s", "calibrate_s", "frequencies_s")
READER_PHASES = ("load_s", "init_s")
# Fitting behind (``FitBehind``): the caller's thread reads, runs the layer forward, waits
# for the layer before's fit and copies this layer's tables; the fit's phases, from
# ``tables_s`` (now only the head labels) to ``save_s``, run on the fit's thread beside the
# next layer's read and forward pass.
BEHIND_PHASES = ("read_s", "forward_s", "fit_wait_s", "copy_s")
ALL_PHASES = ("read_s", "forward_s", "fit_wait_s", "copy_s", *PHASES[2:])


def phase_line(row: dict) -> str:
    names = {"read_s": "read", "forward_s": "forward", "fit_wait_s": "wait for fit",
             "copy_s": "copy", "tables_s": "tables", "mlp_fit_s": "mlp fit",
             "head_fit_s": "head fit", "calibrate_s": "calibrate", "frequencies_s": "freq",
             "save_s": "save"}

    def parts(keys) -> str:
        return ", ".join(f"{names[k]} {row[k]:.2f}" for k in keys if k in row)

    reader = f"reader: load {row['load_s']:.2f}, init {row['init_s']:.2f}"
    if "copy_s" not in row:
        return f"{row['layer_s']:.2f} s: {parts(PHASES)} ({reader})"
    fit = PHASES[2:]
    return (f"{row['layer_s']:.2f} s: {parts(BEHIND_PHASES)} ({reader}); fitted behind the "
            f"next layer in {sum(row[k] for k in fit):.2f} s: {parts(fit)}")


def _forward_one(layer: int, reader: LayerReader, windows: Tensor, bufs: Buffers, plan: Plan,
                 c: OPTConfig, cfg: TrainConfig, preds: PredictorSet, dev: torch.device,
                 bar: Phases, clock: Clock, stall_in_layer: int | None):
    """Take layer ``layer``'s weights, start its predictors and run it forward over every
    window (``read_s``, ``forward_s`` on ``clock``); returns what the reader handed over,
    its weights already dropped."""
    tag = f"layer {layer + 1}/{c.num_hidden_layers}"
    bar.start(f"{tag} read", 1, "layer")
    got = reader.take(layer)
    bar.advance()
    preds.mlp[layer], preds.heads[layer] = init_layer(c, layer, cfg)
    if got.mlp_start is not None:
        preds.mlp[layer].load_state_dict(got.mlp_start)
    clock.lap("read_s")
    bar.start(f"{tag} forward", bufs.bits.shape[0], "tok")
    forward_layer(got.span, layer, windows, bufs, plan.chunk, labels=True, bar=bar)
    del got.span  # the weights are no longer needed: fitting reads only the tables
    bufs.flush()
    clock.lap("forward_s")
    if stall_in_layer == layer:
        time.sleep(3600)
    return got


def _tables(bufs: Buffers, layer: int, c: OPTConfig, where: torch.device, *, copy: bool
            ) -> Collected:
    """Layer ``layer``'s tables for its fit: the buffers themselves, or (``copy``: the fit
    runs behind the next layer's forward pass, which overwrites them) copies of them in
    ``where``, queued on the current stream before anything that overwrites them."""
    def own(t: Tensor) -> Tensor:
        return t.to(where, non_blocking=t.is_pinned(), copy=True) if copy else t

    return Collected({layer: own(bufs.source[layer % 2])}, {layer: own(bufs.bits)},
                     {layer: own(bufs.norms)}, c.ffn_dim, bufs.bits.shape[0],
                     {layer: own(bufs.mlp_in)})


def _fit_one(layer: int, collected: Collected, got, c: OPTConfig, cfg: TrainConfig,
             split: dict[str, Tensor], preds: PredictorSet, freq: Frequencies,
             dev: torch.device, tables: torch.device, work: Work, clock: Clock | None,
             progress, before: dict[str, float] | None = None) -> dict:
    """Fit layer ``layer``'s predictors on ``collected``, count its frequencies, write its
    file; its report row. ``before``: the phases the caller's thread spent on this layer
    when fitting behind (its ``layer_s``; ``clock`` None: the fit's own starts here, on the
    fit's thread), else ``clock`` holds them and they add up to ``layer_s`` with the fit's."""
    clock = Clock(dev) if clock is None else clock
    row = train_layer(collected, layer, split, preds, cfg, dev, tables=tables,
                      progress=progress, clock=clock)
    freq.mlp[layer], freq.heads[layer] = layer_frequencies(
        collected.neuron_bits[layer], collected.head_norms[layer], c.ffn_dim, freq.head_k,
        dev)
    clock.lap("frequencies_s")
    preds.fingerprint.layer_hashes[layer] = got.lhash
    row.update(before or {}, **clock.seconds, **got.seconds)
    row["fit_s"] = sum(row[k] for k in FIT_PHASES)
    # The layer file keeps the row up to here: its own writing is timed after it.
    work.save_layer(layer, preds, freq, row, got.lhash)
    clock.lap("save_s")
    row.update(clock.seconds)
    if before is None:
        row["layer_s"] = sum(clock.seconds.values())
    return row


class FitBehind:
    """Fits a layer's predictors on a thread of their own (on CUDA, in a stream of their
    own) while the caller reads and runs the next layer: one fit at a time. The fit's
    kernels are small and many (tools/captured_fit.py), the forward pass's few and large,
    so the GPU runs both at once better than one after the other. The fit's stream starts
    where the caller's stood at ``submit`` (the tables' copies), and ends synchronised, so
    its tensors free safely on its thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fit-behind")
        # High priority: the fit's short kernels go ahead of the forward pass's long ones.
        self.stream = (torch.cuda.Stream(device, priority=-1) if device.type == "cuda"
                       else None)
        self.pending: Future | None = None
        self.layer, self.total, self.steps = -1, 0, 0

    def submit(self, layer: int, total_steps: int, fit) -> None:
        """Run ``fit(progress)`` behind; the layer before's must have been collected."""
        assert self.pending is None
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self.layer, self.total, self.steps = layer, total_steps, 0

        def step() -> None:
            self.steps += 1

        def run() -> dict:
            if self.stream is None:
                return fit(step)
            self.stream.wait_event(ready)
            with torch.cuda.stream(self.stream):
                try:
                    return fit(step)
                finally:
                    self.stream.synchronize()

        self.pending = self.pool.submit(run)

    def collect(self, bar: Phases, layers: int) -> dict | None:
        """The running fit's report row once it has finished (None when none runs); while
        waiting, its steps on ``bar``. A fit's exception is raised here."""
        if self.pending is None:
            return None
        if not self.pending.done():
            bar.start(f"layer {self.layer + 1}/{layers} fit", self.total, "step")
            while not self.pending.done():
                wait([self.pending], timeout=0.2)
                bar.advance(self.steps - bar.done)
        pending, self.pending = self.pending, None
        return pending.result()

    def close(self) -> None:
        """Wait for a fit still running (an error elsewhere left it behind) and stop."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def train_layerwise(model_path: str, data: str, out: str, cfg: TrainConfig, *,
                    device: str = "cpu", dtype: str = "float32", log=print,
                    host_memory_gib: float | None = None, gpu_memory_gib: float | None = None,
                    progress: Phases | None = None, stall_in_layer: int | None = None,
                    read_ahead: bool = True, fit_behind: bool = False) -> Path:
    """Train, write OUT/{predictors,frequencies}.safetensors and OUT/report.{json,md};
    returns the predictors' path. ``read_ahead``: read the next layer on a background
    thread (``LayerReader``); ``fit_behind``: fit each layer beside the next one's forward
    pass where the plan has room (``FitBehind``, ``plan_resources``); the result is the same
    either way. ``stall_in_layer`` (tests
    only) blocks inside that layer, after its forward pass and before its fit, for a test to
    kill the run there."""
    from ..runtime.tokenizer import load_tokenizer

    t_start = time.perf_counter()
    # What the run spends outside its layers: CUDA's start and the plan, tokenizing, the
    # tables' allocation (pinned on a GPU), rebuilding on resume, the last fit's tail.
    setup = Clock("cpu")
    dev, dt = torch.device(device), parse_dtype(dtype)
    model_dir = resolve_model_dir(model_path)
    c = inspect_checkpoint(model_dir).config  # headers only: no tensor is read yet
    check_text_file(data)  # before the plan and any work, not when the text is first read
    window = min(cfg.window or c.max_position_embeddings, c.max_position_embeddings)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    on_gpu = dev.type == "cuda"
    device_budget = 0
    if on_gpu:
        free = torch.cuda.mem_get_info(dev)[0]
        device_budget = free if gpu_memory_gib is None else min(free, int(gpu_memory_gib * GIB))
    host_budget = host_available() if host_memory_gib is None else int(host_memory_gib * GIB)
    plan = plan_resources(c, cfg, tokens=math.ceil(cfg.tokens / window) * window,
                          window=window, dtype=dt, on_gpu=on_gpu, host_budget=host_budget,
                          disk_free=shutil.disk_usage(out_dir).free,
                          device_budget=device_budget, fit_behind=fit_behind)
    log(plan.describe())
    if fit_behind and not plan.fit_behind:
        log(f"--fit-behind: fitting each layer in line instead: {plan.in_line_why}")
    setup.lap("plan_s")

    tok = load_tokenizer(model_dir)
    windows, docs = calibration_windows(iter_texts(data), tok.encode, window=window,
                                        tokens=cfg.tokens, per_doc=cfg.per_doc)
    n, n_layers = windows.numel(), c.num_hidden_layers
    setup.lap("tokenize_s")
    work = Work(out_dir / WORK, run_parts(c, cfg, dt, windows, docs), log)
    split = _split(docs, window)
    head_k = count(cfg.head_density, c.num_attention_heads)
    preds = PredictorSet(c, Fingerprint(config_hash(c), {}), cfg.mlp_rank, cfg.head_rank)
    freq = Frequencies({}, {}, n, head_k, preds.fingerprint)
    rows: list[dict] = []
    start = work.finished(n_layers)
    for layer in range(start):
        row, preds.fingerprint.layer_hashes[layer] = work.load_layer(layer, preds, freq, cfg)
        rows.append(row)
    # Activations an interrupted run spilled are used as they are, whatever the plan says.
    spilled = start > 0 and (work.path / "resid-0.bin").is_file()
    tables = dev if plan.tables_on_device else torch.device("cpu")
    bufs = Buffers(n, c, dt, work.path if plan.spill or spilled else None,
                   pin=dev.type == "cuda", labels=tables)
    setup.lap("buffers_s")
    bar = progress if progress is not None else Phases()
    if start and not spilled:
        log(f"resuming after layer {start - 1}: running layers 0..{start - 1} forward again "
            "to rebuild the activations held in memory")
        for layer in range(start):
            span = load_model(model_dir, layers=range(layer, layer + 1), dtype=dt, device=dev)
            forward_layer(span, layer, windows, bufs, plan.chunk, labels=False)
            del span
    elif start:
        log(f"resuming after layer {start - 1} from the activations in {work.path}")
    setup.lap("resume_s")

    reader = LayerReader(model_dir, cfg, dtype=dt, device=dev, layers=n_layers,
                         ahead=read_ahead)
    behind = FitBehind(dev) if plan.fit_behind else None

    def finished(row: dict | None) -> None:
        if row is None:
            return
        rows.append(row)
        per_layer = (time.perf_counter() - t_start) / (len(rows) - start)
        eta = per_layer * (n_layers - len(rows))
        log(f"{layer_line(row, seconds=False)}; {phase_line(row)}; {len(rows)}/{n_layers} "
            f"layers, ETA {eta:.0f} s")

    steps = fit_steps(cfg, split["train"].numel())
    try:
        for layer in range(start, n_layers):
            clock = Clock(dev)
            got = _forward_one(layer, reader, windows, bufs, plan, c, cfg, preds, dev, bar,
                               clock, stall_in_layer)
            if behind is None:
                collected = _tables(bufs, layer, c, tables, copy=False)
                bar.start(f"layer {layer + 1}/{n_layers} fit", steps, "step")
                finished(_fit_one(layer, collected, got, c, cfg, split, preds, freq, dev,
                                  tables, work, clock, bar.advance))
                continue
            finished(behind.collect(bar, n_layers))
            clock.lap("fit_wait_s")
            collected = _tables(bufs, layer, c, tables, copy=True)
            clock.lap("copy_s")
            before = dict(clock.seconds, layer_s=sum(clock.seconds.values()))
            behind.submit(layer, steps, partial(
                _fit_one, layer, collected, got, c, cfg, split, preds, freq, dev, tables,
                work, None, before=before))
        setup.lap("layers_s")
        if behind is not None:
            finished(behind.collect(bar, n_layers))
            setup.lap("last_fit_s")
    finally:
        reader.close()
        if behind is not None:
            behind.close()

    report = make_report(cfg, split, docs, dev, rows)
    report.update(model=str(model_dir), data=str(data))
    report["layerwise"] = {
        **asdict(plan), "resumed_at_layer": start, "wall_s": time.perf_counter() - t_start,
        "read_ahead": read_ahead,
        "setup_s": {k: v for k, v in setup.seconds.items() if k != "layers_s"},
        **{k: sum(r.get(k, 0.0) for r in rows[start:])
           for k in ALL_PHASES + ("fit_s", "layer_s")},
        # ru_maxrss is KiB on Linux; it counts the resident pages of mapped files too.
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_device_gib": torch.cuda.max_memory_allocated(dev) / GIB if on_gpu else 0.0,
    }
    finish(preds, cfg, report)
    del bufs
    path = write_outputs(out_dir, preds, freq, report, model_dir.name)
    shutil.rmtree(work.path)
    outside = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}"
                        for k, v in report["layerwise"]["setup_s"].items())
    log(f"wrote {path} ({time.perf_counter() - t_start:.0f} s; outside the layers: "
        f"{outside}, outputs {setup.lap('outputs_s'):.1f})")
    return path
