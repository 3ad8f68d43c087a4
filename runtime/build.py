"""One way to build an engine: typed settings and a span of layers -> a ready ``Stage``.

``generate``, ``eval``, ``chat``, ``serve`` and every pipeline worker get their model and
stage here, so they cannot compute different things. Two steps:

- ``resolve`` runs once, where the settings are read (a front end in one process, the
  launch for a pipeline): it pins the checkpoint directory and decides dense or sparse,
  finding the predictors, so errors surface before any weight is read. Its output is the
  whole ``Settings``, which travels to workers unchanged (runtime/wire.py ``Setup``);
- ``build_model`` and ``build_stage`` turn resolved settings and a layer span into the
  model (loaded, fitted to ``[pipeline] gpu_memory_gib``, offloaded where it does not fit),
  its selector (predictors or random, the sparse backend applied, offloaded layers wrapped)
  and, for a stage, its KV cache. The stage captures decode steps as CUDA graphs itself.

What this module does not know: processes, sockets, requests or the command line.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checkpoint import load_model, resolve_model_dir
from .model import OPTModel
from .offload import budget_report, fit_gib, host_bytes_read, offload_selector
from .predictors import PredictorError, PredictorSet, find_predictors, stored_head_ks
from .selection import (
    PredictorSelector,
    RandomSelector,
    SelectionConfig,
    SelectionError,
    count,
    parse_layers,
)
from .settings import Settings
from .sparse import Selector, SparseStats, needs_kv_inputs
from .sparse_backend import BackendError, use_backend
from .stage import Stage, allocate_cache
from .weight_store import PlacementError, gib


class BuildError(ValueError):
    """Settings that cannot build an engine here; one line naming the setting and fix."""


def resolve(settings: Settings, sparse: bool | None = None) -> Settings:
    """A copy of ``settings`` that needs no further lookups: ``model.path`` is the
    checkpoint directory (a Hugging Face id is fetched), ``sparsity.enabled`` says whether
    the engine runs sparse and ``sparsity.predictors`` is the predictor file it reads.

    ``sparse`` is the command line's --sparse (True) / --dense (False) / neither (None).
    With neither, sparse runs when [sparsity] enabled is true and predictors are found;
    --sparse without predictors, or a configured predictors path that does not exist, is
    an error."""
    out = copy.deepcopy(settings)
    model_dir = resolve_model_dir(settings.model_path())
    out.model.path = str(model_dir)
    sparsity = out.sparsity
    if sparse is False or (sparse is None and not sparsity.enabled):
        sparsity.enabled = False
        return out
    sparsity.enabled = True
    if sparsity.selector == "random":  # a benchmark baseline: no predictors needed
        return out
    path = settings.predictors_path()
    if path is not None and not path.exists():
        raise SelectionError(f"[sparsity] predictors = {sparsity.predictors!r}: {path} does "
                             "not exist; train them with `dejavu-run train-predictors` or "
                             "remove the setting")
    path = path or find_predictors(model_dir)
    if path is None:
        if sparse:
            raise SelectionError(f"--sparse: {model_dir} has no predictors/ directory; "
                                 "train them with `dejavu-run train-predictors` or set "
                                 "[sparsity] predictors")
        sparsity.enabled = False
        return out
    sparsity.predictors = str(path.resolve())
    return out


@dataclass
class Built:
    """A span of the model as settings asked: ``selector`` None runs dense; ``offloaded``
    lists the layers held in host memory and ``report`` what the budget expects (None
    without a budget); ``stage`` is set by ``build_stage``."""

    model: OPTModel
    selector: Selector | None
    offloaded: list[int]
    report: dict | None
    stage: Stage | None = None


def resolve_device(settings: Settings, device: str | None = None) -> torch.device:
    """The device ``device`` or the settings name; ``BuildError`` naming where it was set when
    it is CUDA on a machine without it."""
    name = device or settings.model.device
    if name.startswith("cuda") and not torch.cuda.is_available():
        where = "--device" if settings.sources.get("model.device") == "command line" \
            else "[model] device ="
        raise BuildError(f"{where} {name}: CUDA is not available on this machine; use cpu")
    return torch.device(name)


def build_model(settings: Settings, *, layers: range | None = None, device: str | None = None,
                slots: int = 1, max_len: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> Built:
    """Load ``layers`` (None: all) of the resolved ``settings``' model on ``device`` (None:
    [model] device), fit it to the GPU budget for ``slots`` sequences of ``max_len``
    positions (None: the model's), and choose its selector."""
    dev = resolve_device(settings, device)
    budget = settings.pipeline.gpu_memory_gib
    # With a budget the weights are read into host memory first, so that offloaded layers
    # never occupy the GPU; what fits then moves.
    model = load_model(settings.model.path, layers=layers, dtype=settings.model.dtype,
                       device="cpu" if budget is not None else dev, progress=progress)
    offloaded: list[int] = []
    reserved = 0
    if budget is not None:
        try:
            offloaded, reserved = fit_gib(
                model, budget, device=dev, slots=slots,
                max_len=max_len or model.config.max_position_embeddings,
                caches=settings.pipeline.offload_cache, model_dir=settings.model.path,
                kv_inputs=steps_skip_heads(settings, model.config))
        except PlacementError as exc:
            raise BuildError(f"[pipeline] gpu_memory_gib = {budget:g}: {exc}") from None
    selector = _selector(settings, model, dev)
    report = None
    if budget is not None:
        selector = offload_selector(selector, offloaded, model.config)
        report = budget_report(model, offloaded, selector, budget_bytes=gib(budget),
                               reserved_bytes=reserved)
    return Built(model, selector, offloaded, report)


def steps_skip_heads(settings: Settings, config) -> bool:
    """Whether the selector these (resolved) settings build may skip a head, from the
    settings and the predictor file's operating points alone: the KV cache then keeps
    attention inputs (``sparse.needs_kv_inputs`` of that selector says the same for a whole
    model; a test holds them together), which a GPU budget must reserve. Read before any
    weight, so that the launch's plan and every worker reserve the same bytes (a worker of
    a span answers for the whole file, as the plan does)."""
    sparsity, heads = settings.sparsity, config.num_attention_heads
    if not sparsity.enabled:
        return False
    forced = None if sparsity.head_density is None else count(sparsity.head_density, heads)
    if sparsity.selector == "random":
        return forced is not None and forced < heads
    if not sparsity.predictors:
        return False
    dense = parse_layers(sparsity.dense_layers)
    try:
        stored = stored_head_ks(sparsity.predictors)
    except PredictorError:
        return True  # reserve for the worst; loading the file reports what is wrong with it
    return any((k if forced is None else forced) < heads
               for layer, k in stored.items() if layer not in dense)


def _selector(settings: Settings, model: OPTModel, device: torch.device) -> Selector | None:
    sparsity = settings.sparsity
    if not sparsity.enabled:
        return None
    try:  # who computes the selected rows (runtime/sparse_backend.py)
        use_backend(model, sparsity.backend)
    except BackendError as exc:
        raise SelectionError(str(exc)) from None
    dense_layers = parse_layers(sparsity.dense_layers)
    c = model.config
    if sparsity.selector == "random":
        if sparsity.mlp_density is None or sparsity.head_density is None:
            raise SelectionError("[sparsity] selector = \"random\" needs mlp_density and "
                                 "head_density (the fractions it draws per token)")
        return RandomSelector(c.ffn_dim, c.num_attention_heads, sparsity.mlp_density,
                              sparsity.head_density, dense_layers=dense_layers)
    if not sparsity.predictors:
        raise BuildError("sparse settings without a predictor file: pass the settings "
                         "through runtime.build.resolve first")
    # With lookahead a stage selects the next stage's first layer too (runtime/sparse.py).
    extra = (model.layer_ids[-1] + 1,) if sparsity.lookahead and not model.is_last else ()
    preds = PredictorSet.load(sparsity.predictors, model, device=device, extra_layers=extra)
    param = next(p for p in model.parameters() if not p.is_meta)  # not an offloaded weight
    preds.to(param.device, param.dtype)
    recall = sparsity.mlp_recall
    return PredictorSelector(preds, SelectionConfig(
        mlp_density=sparsity.mlp_density, head_density=sparsity.head_density,
        dense_layers=dense_layers, mlp_select="threshold" if recall is not None else None,
        mlp_recall=recall))


def build_stage(settings: Settings, *, layers: range | None = None, device: str | None = None,
                slots: int, max_len: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> Built:
    """``build_model``, then a KV cache of ``slots`` x ``max_len`` positions (keeping
    attention inputs when a step may skip heads, for lazy K/V) and the ``Stage`` that runs
    steps on it."""
    built = build_model(settings, layers=layers, device=device, slots=slots, max_len=max_len,
                        progress=progress)
    model, selector = built.model, built.selector
    max_len = max_len or model.config.max_position_embeddings
    cache = allocate_cache(model, slots, max_len, keep_inputs=needs_kv_inputs(selector))
    built.stage = Stage(model, cache, selector, lookahead=settings.sparsity.lookahead)
    return built


def sparsity_report(stats: SparseStats) -> dict:
    """Measured densities as ``generate --json``, /metrics and the pipeline report them:
    the means over layers and, per layer id, the fraction of MLP neurons and heads each
    token computed."""
    return density_report(stats.per_layer())


def density_report(per_layer: list[tuple[int, float, float]]) -> dict:
    """``sparsity_report`` from (layer id, MLP fraction, head fraction) triples, as the
    pipeline's workers report them: the same means, in the same order, as ``SparseStats``."""
    n = len(per_layer)
    nan = float("nan")
    return {"mlp_density": sum(m for _, m, _ in per_layer) / n if n else nan,
            "head_density": sum(h for _, _, h in per_layer) / n if n else nan,
            "layers": {str(lid): {"mlp_density": m, "head_density": h}
                       for lid, m, h in sorted(per_layer)}}


def offload_report(built: Built) -> dict | None:
    """What ``generate --json`` says about a budget: the plan and the host bytes read."""
    if built.report is None:
        return None
    return {"offloaded_layers": built.report["offloaded_layers"],
            "expected_gpu_bytes": built.report["gpu_bytes"],
            "expected_host_bytes_per_token": built.report["host_bytes_per_step"],
            "host_bytes_read": host_bytes_read(built.model)}
