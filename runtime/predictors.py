"""DejaVu predictors: per layer, low-rank classifiers that score MLP neurons and heads.

For layer l, ``mlp(x)`` scores its F neurons (d -> r -> F) and ``heads(x)`` its H heads
(d -> r -> H). The heads read the residual-stream tensor that ``sparse.predictor_source(l)``
names (the residual entering layer l-1's MLP block); the neurons read either that tensor
("lookahead") or the residual entering layer l's own MLP block ("mlp_in": what fc1 sees,
through its layer norm), as the layer's operating point says (``mlp_source``). Each layer
also carries its operating point: how many neurons and heads to keep per token (top-k or
a calibrated threshold), chosen when the predictors were trained for a target recall.

The file format is one safetensors file with string metadata: the format tag, the model's
fingerprint (a hash of its config and, per layer, of a fixed sample of its weights, rounded
to float16 so that the same checkpoint loaded in float32 or float16 matches), sizes, the
wiring, ranks, operating points and the training report. Loading checks the fingerprint
against the model it is meant for and refuses predictors made for another model.

What this module does not know: how labels are collected (tools/train_predictors.py) or how
a selection is executed (runtime/sparse.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .opt_config import OPTConfig

# Version 2 added the per-layer MLP source (``OperatingPoint.mlp_source``); a version 1
# file has none, and every layer of it reads the lookahead source, as it was trained.
FORMAT = "dejavu-predictors/2"
FORMATS = ("dejavu-predictors/1", FORMAT)
FILE_NAME = "predictors.safetensors"
# The head wiring (and the "lookahead" MLP source) is fixed (sparse.predictor_source); the
# tag is stored so that a file made for another wiring is refused instead of mispredicting.
WIRING = "layer l <- residual entering layer l-1's MLP block; layer 0 <- its own input"
# Where a layer's MLP predictor reads: "lookahead" = the heads' source (above, one MLP
# block early, so prediction can run beside the previous block and rows can be fetched
# ahead), "mlp_in" = the residual entering the layer's own MLP block (exact input of fc1
# up to its layer norm: more precise, but on the critical path between the two blocks).
MLP_SOURCES = ("lookahead", "mlp_in")
_SAMPLE = 512  # weights hashed per matrix


class PredictorError(ValueError):
    """A predictor file that cannot be used with this model (mismatch, corrupt, missing)."""


class LowRankClassifier(nn.Module):
    """x [..., C] -> logits [..., n] through rank r: LayerNorm (no affine: the residual's
    scale grows with depth, the predictor should not care), C -> r, r -> n."""

    def __init__(self, hidden: int, rank: int, out: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(F.layer_norm(x, (self.hidden,))))


@dataclass
class OperatingPoint:
    """Per layer: how many neurons/heads a token keeps (top-k; or, for neurons, every one
    whose logit exceeds ``mlp_threshold`` when that is set) and what held-out tokens
    measured at that point."""

    mlp_k: int
    head_k: int
    mlp_threshold: float | None = None
    # Calibrated thresholds for other recall targets ({"0.9": t, ...}), so that a run can
    # trade recall for density without retraining (SelectionConfig.mlp_recall).
    mlp_thresholds: dict[str, float] | None = None
    mlp_recall: float | None = None  # None until measured
    mlp_precision: float | None = None
    head_recall: float | None = None
    mlp_source: str = "lookahead"  # one of MLP_SOURCES (absent in version 1 files)

    def __post_init__(self) -> None:
        if self.mlp_source not in MLP_SOURCES:
            raise PredictorError(f"mlp_source {self.mlp_source!r}: expected one of "
                                 f"{MLP_SOURCES}")


@dataclass
class Fingerprint:
    config_hash: str
    layer_hashes: dict[int, str]

    @property
    def model_hash(self) -> str:
        h = hashlib.sha256(self.config_hash.encode())
        for i in sorted(self.layer_hashes):
            h.update(f"{i}:{self.layer_hashes[i]}".encode())
        return h.hexdigest()


def config_hash(config: OPTConfig) -> str:
    fields = asdict(config)
    fields.pop("torch_dtype")  # the storage dtype does not change the model
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _weights(layer: nn.Module) -> dict[str, Tensor]:
    """The layer's parameters by name. An offloaded layer (runtime/offload.py) keeps its big
    weights as meta tensors on the module and their values in host records: those are read
    back from the records, so that the layer hashes as it did before it was offloaded."""
    params = dict(layer.named_parameters())
    if not any(p.is_meta for p in params.values()):
        return params
    from .sparse_backend import offloaded_ops
    from .weight_store import unpack_heads, unpack_neurons

    host = offloaded_ops(layer).rows.host
    c, d = layer.fc1.weight.shape[1], layer.self_attn.head_dim  # type: ignore[union-attr]
    fc1_w, fc1_b, fc2_w = unpack_neurons(host.neurons, c)
    heads = unpack_heads(host.heads, c, d)
    back = {"fc1.weight": fc1_w, "fc1.bias": fc1_b, "fc2.weight": fc2_w,
            "self_attn.out_proj.weight": heads["o_w"]}
    for x in ("q", "k", "v"):
        back[f"self_attn.{x}_proj.weight"] = heads[f"{x}_w"]
        back[f"self_attn.{x}_proj.bias"] = heads[f"{x}_b"]
    return {name: back[name] if p.is_meta else p for name, p in params.items()}


@torch.no_grad()
def layer_hash(layer: nn.Module) -> str:
    """A hash of a fixed sample of one decoder layer's weights rounded to float16 (the
    names are the layer's own, so a layer loaded alone hashes as it does in the model)."""
    h = hashlib.sha256()
    for name, p in sorted(_weights(layer).items()):
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLE, flat.numel()))
        # float32 rounds positions past 2**24 (an OPT-13B fc1 has 1e8 weights) up beyond the
        # last one; clamping keeps every smaller tensor's sample, and so its hash, as it was.
        idx = idx.long().clamp_(max=flat.numel() - 1)
        sample = flat[idx.to(flat.device)].to("cpu", torch.float16)
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: nn.Module) -> Fingerprint:
    """Config hash and, for every layer the model (span) holds, ``layer_hash``."""
    config: OPTConfig = model.config  # type: ignore[assignment]
    hashes = {layer.layer_id: layer_hash(layer) for layer in model.layers()}  # type: ignore
    return Fingerprint(config_hash(config), hashes)


@dataclass
class PredictorSet:
    """Predictors for some layers of one model, with their operating points."""

    config: OPTConfig
    fingerprint: Fingerprint
    mlp_rank: int
    head_rank: int
    mlp: dict[int, LowRankClassifier] = field(default_factory=dict)
    heads: dict[int, LowRankClassifier] = field(default_factory=dict)
    points: dict[int, OperatingPoint] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    # "topk" (k neurons per token) or "threshold" (the calibrated logit threshold).
    mlp_select: str = "topk"

    @classmethod
    def create(cls, model: nn.Module, mlp_rank: int, head_rank: int) -> PredictorSet:
        """Untrained predictors for every layer the model holds (operating points dense)."""
        c: OPTConfig = model.config  # type: ignore[assignment]
        out = cls(c, fingerprint(model), mlp_rank, head_rank)
        for layer in model.layers():  # type: ignore[operator]
            i = layer.layer_id
            out.mlp[i] = LowRankClassifier(c.hidden_size, mlp_rank, c.ffn_dim)
            out.heads[i] = LowRankClassifier(c.hidden_size, head_rank, c.num_attention_heads)
            out.points[i] = OperatingPoint(c.ffn_dim, c.num_attention_heads)
        return out

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.mlp)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PredictorSet:
        for m in list(self.mlp.values()) + list(self.heads.values()):
            m.to(device=device, dtype=dtype)
        return self

    # --- file format -----------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (a directory gets predictors.safetensors inside)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path.mkdir(parents=True, exist_ok=True)
            path = path / FILE_NAME
        tensors: dict[str, Tensor] = {}
        for kind, table in (("mlp", self.mlp), ("heads", self.heads)):
            for i, m in table.items():
                for name, t in m.state_dict().items():
                    tensors[f"layers.{i}.{kind}.{name}"] = t.detach().to("cpu").contiguous()
        c = self.config
        meta = {
            "format": FORMAT,
            "model_hash": self.fingerprint.model_hash,
            "config_hash": self.fingerprint.config_hash,
            "layer_hashes": json.dumps(
                {str(k): v for k, v in self.fingerprint.layer_hashes.items()}),
            "num_layers": str(c.num_hidden_layers),
            "hidden_size": str(c.hidden_size),
            "ffn_dim": str(c.ffn_dim),
            "num_heads": str(c.num_attention_heads),
            "wiring": WIRING,
            "mlp_rank": str(self.mlp_rank),
            "head_rank": str(self.head_rank),
            "operating_points": json.dumps({str(k): asdict(v) for k, v in self.points.items()}),
            "mlp_select": self.mlp_select,
            "report": json.dumps(self.report),
        }
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *,
             device: torch.device | str = "cpu", extra_layers: tuple[int, ...] = ()
             ) -> PredictorSet:
        """Load predictors for ``model`` (a whole model or a span); refuse a file made for
        another model, naming what differs. ``extra_layers``: also these layers' predictors
        (a pipeline stage selects the next stage's first layer ahead); their weights are
        not here to check, the stage that holds them checks the same file."""
        path = predictor_file(path)
        if not path.is_file():
            raise PredictorError(f"{path}: no such predictor file "
                                 "(train one with `dejavu-run train-predictors`)")
        meta, tensors = _read_safetensors(path)
        if meta.get("format") not in FORMATS:
            raise PredictorError(f"{path}: format {meta.get('format')!r}; this runtime reads "
                                 f"{' and '.join(FORMATS)}: retrain the predictors with "
                                 "`dejavu-run train-predictors`")
        if meta.get("wiring") != WIRING:
            raise PredictorError(f"{path}: trained for wiring {meta.get('wiring')!r}; this "
                                 f"runtime uses {WIRING!r}")
        c: OPTConfig = model.config  # type: ignore[assignment]
        mine = fingerprint(model)
        sizes = {"num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
                 "ffn_dim": c.ffn_dim, "num_heads": c.num_attention_heads}
        for key, value in sizes.items():
            if meta.get(key) != str(value):
                raise PredictorError(
                    f"{path}: predictors were made for a model with {key}={meta.get(key)}, "
                    f"this model has {key}={value}; train predictors for this model"
                )
        if meta.get("config_hash") != mine.config_hash:
            raise PredictorError(f"{path}: predictors were made for another model (config "
                                 "hash differs); train predictors for this model")
        theirs = {int(k): v for k, v in json.loads(meta["layer_hashes"]).items()}
        for i, h in mine.layer_hashes.items():
            if theirs.get(i) != h:
                # The same checkpoint in bfloat16 hashes differently: its weights are rounded
                # to another format than float16 (which float32 preserves).
                hint = ("; this model is loaded in bfloat16: load it as float16 or float32, "
                        "or run dense (--dense)") if _dtype_of(model) == torch.bfloat16 else ""
                raise PredictorError(
                    f"{path}: predictors were made for another model (model hash "
                    f"{meta.get('model_hash', '?')[:12]}): layer {i}'s weights differ from "
                    f"this model's; train predictors for this model{hint}"
                )
        out = cls(c, Fingerprint(mine.config_hash, theirs), int(meta["mlp_rank"]),
                  int(meta["head_rank"]))
        points = json.loads(meta["operating_points"])
        out.report = json.loads(meta.get("report", "{}"))
        out.mlp_select = meta.get("mlp_select", "topk")
        for i in [*mine.layer_hashes, *(e for e in extra_layers if e not in mine.layer_hashes)]:
            out.mlp[i] = LowRankClassifier(c.hidden_size, out.mlp_rank, c.ffn_dim)
            out.heads[i] = LowRankClassifier(c.hidden_size, out.head_rank,
                                             c.num_attention_heads)
            for kind, m in (("mlp", out.mlp[i]), ("heads", out.heads[i])):
                prefix = f"layers.{i}.{kind}."
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                try:
                    m.load_state_dict(state)
                except RuntimeError as exc:
                    raise PredictorError(f"{path}: layer {i} {kind} predictor: {exc}") from None
            if str(i) not in points:
                raise PredictorError(f"{path}: no operating point for layer {i}")
            out.points[i] = _point(path, meta["format"], i, points[str(i)])
        return out.to(device)


def predictor_file(path: str | Path) -> Path:
    """The predictor file ``path`` names: itself, or FILE_NAME in it if a directory."""
    path = Path(path)
    return path / FILE_NAME if path.is_dir() else path


def stored_head_ks(path: str | Path) -> dict[int, int]:
    """Heads kept per token at each layer's stored operating point, from the file's
    metadata alone (no tensor read, no model needed): what a planner reads before any
    weight is loaded. ``PredictorSet.load`` checks the file properly."""
    path = predictor_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            points = json.loads((f.metadata() or {})["operating_points"])
        return {int(layer): int(fields["head_k"]) for layer, fields in points.items()}
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as exc:
        raise PredictorError(f"{path}: unreadable operating points ({exc})") from None


def _dtype_of(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first weight that is not a meta tensor (None: none)."""
    return next((p.dtype for p in model.parameters() if not p.is_meta), None)


def _point(path: Path, fmt: str, layer: int, fields: dict) -> OperatingPoint:
    """A stored operating point; version 1 files have no ``mlp_source`` (lookahead)."""
    if fmt == FORMATS[0] and "mlp_source" in fields:
        raise PredictorError(f"{path}: a {fmt} file with a layer {layer} mlp_source")
    try:
        return OperatingPoint(**fields)
    except TypeError as exc:
        raise PredictorError(f"{path}: layer {layer}'s operating point: {exc}") from None


def find_predictors(model_dir: str | Path) -> Path | None:
    """The predictors shipped next to a checkpoint (``<model>/predictors/``), if any."""
    path = Path(model_dir) / "predictors" / FILE_NAME
    return path if path.is_file() else None


# --- firing frequencies (what placement reads) -----------------------------------------------

FREQUENCIES_FORMAT = "dejavu-frequencies/1"
FREQUENCIES_FILE = "frequencies.safetensors"


@dataclass
class Frequencies:
    """How often each neuron and head of each layer is needed, over the calibration tokens
    the predictors were trained on (all of them: train, calibrate and report splits).

    ``mlp[i]`` [F] float32: the fraction of tokens on which neuron j of layer i fires (fc1
    pre-activation > 0, the MLP predictor's label). ``heads[i]`` [H] float32: the fraction of
    tokens on which head h is among the ``head_k`` heads with the largest contribution to
    the residual, ||out_proj[:, h] o_h|| (the head predictor's label, scored as the oracle
    of the sparsity studies scores heads). ``model_hash`` is the hash the predictors carry
    (``Fingerprint.model_hash``)."""

    mlp: dict[int, Tensor]
    heads: dict[int, Tensor]
    tokens: int
    head_k: int
    fingerprint: Fingerprint

    @property
    def model_hash(self) -> str:
        return self.fingerprint.model_hash

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (a directory gets frequencies.safetensors inside)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path.mkdir(parents=True, exist_ok=True)
            path = path / FREQUENCIES_FILE
        tensors = {f"layers.{i}.mlp": t.detach().to("cpu", torch.float32).contiguous()
                   for i, t in self.mlp.items()}
        tensors.update({f"layers.{i}.heads": t.detach().to("cpu", torch.float32).contiguous()
                        for i, t in self.heads.items()})
        meta = {
            "format": FREQUENCIES_FORMAT,
            "model_hash": self.model_hash,
            "config_hash": self.fingerprint.config_hash,
            "layer_hashes": json.dumps(
                {str(k): v for k, v in self.fingerprint.layer_hashes.items()}),
            "tokens": str(self.tokens),
            "head_k": str(self.head_k),
            "mlp": "fraction of calibration tokens on which the neuron fires (fc1 > 0)",
            "heads": "fraction of calibration tokens on which the head is among the head_k "
                     "heads with the largest ||out_proj[:, h] o_h||",
        }
        save_file(tensors, str(path), metadata=meta)
        return path


def load_frequencies(path: str | Path, model: nn.Module | None = None, *,
                     model_hash: str | None = None) -> Frequencies:
    """Read ``frequencies.safetensors`` (or the predictors directory holding it).

    Pass the model (or a span of it: its layers' weights are checked one by one) or the
    ``model_hash`` its predictors carry; a file made for another model is refused, naming
    what differs. With neither, nothing can be checked, so that is refused too."""
    path = Path(path)
    if path.is_dir():
        path = path / FREQUENCIES_FILE
    if model is None and model_hash is None:
        raise PredictorError(f"{path}: pass the model or its hash, to check the file is its")
    if not path.is_file():
        raise PredictorError(f"{path}: no such frequencies file "
                             "(`dejavu-run train-predictors` writes it beside the predictors)")
    meta, tensors = _read_safetensors(path)
    if meta.get("format") != FREQUENCIES_FORMAT:
        raise PredictorError(f"{path}: format {meta.get('format')!r}, expected "
                             f"{FREQUENCIES_FORMAT!r}")
    try:
        theirs = {int(k): v for k, v in json.loads(meta["layer_hashes"]).items()}
        fp = Fingerprint(meta["config_hash"], theirs)
        tokens, head_k = int(meta["tokens"]), int(meta["head_k"])
    except (KeyError, ValueError) as exc:
        raise PredictorError(f"{path}: corrupt metadata ({exc})") from None
    if fp.model_hash != meta.get("model_hash"):
        raise PredictorError(f"{path}: corrupt metadata (its model hash does not match its "
                             "layer hashes)")
    if model_hash is not None and model_hash != fp.model_hash:
        raise PredictorError(f"{path}: frequencies of another model (hash "
                             f"{fp.model_hash[:12]}, expected {model_hash[:12]}); train "
                             "predictors for this model")
    layers = sorted(theirs)
    if model is not None:
        mine = fingerprint(model)
        if mine.config_hash != fp.config_hash:
            raise PredictorError(f"{path}: frequencies of another model (config hash "
                                 "differs); train predictors for this model")
        for i, h in mine.layer_hashes.items():
            if theirs.get(i) != h:
                raise PredictorError(f"{path}: frequencies of another model: layer {i}'s "
                                     "weights differ from this model's")
        layers = sorted(mine.layer_hashes)
    try:
        mlp = {i: tensors[f"layers.{i}.mlp"] for i in layers}
        heads = {i: tensors[f"layers.{i}.heads"] for i in layers}
    except KeyError as exc:
        raise PredictorError(f"{path}: missing tensor {exc.args[0]}") from None
    if model is not None:
        c: OPTConfig = model.config  # type: ignore[assignment]
        for i in layers:
            if (mlp[i].shape, heads[i].shape) != ((c.ffn_dim,), (c.num_attention_heads,)):
                raise PredictorError(f"{path}: layer {i} has {tuple(mlp[i].shape)} neuron and "
                                     f"{tuple(heads[i].shape)} head frequencies, the model "
                                     f"({c.ffn_dim},) and ({c.num_attention_heads},)")
    return Frequencies(mlp, heads, tokens, head_k, fp)


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, every tensor) of a safetensors file on the CPU; PredictorError naming the
    file when it cannot be read as one (the predictor and the frequencies files alike)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise PredictorError(f"{path}: not a readable safetensors file: {exc}") from None
