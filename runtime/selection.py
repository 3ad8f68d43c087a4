"""Selectors: turn a layer's predictor input into its per-token head and neuron masks.

A selector is a callable ``(layer_id, source [B, T, C]) -> sparse.Selection`` (masks
[B, T, H] and [B, T, F]). Four kinds:

- ``PredictorSelector``: the trained predictors, top-k per token at each layer's operating
  point or at a density given in the settings; layers listed as dense stay dense;
- ``RandomSelector``: k uniformly random neurons/heads per token, the baseline that shows
  what the predictors are worth at the same density;
- ``FixedSelector``: masks given per layer (oracle selections in tests and analyses);
- ``OracleHeadSelector`` (and ``AdaptiveOracleHeadSelector``): the heads that matter most,
  from the layer's true outputs (an analysis of what a perfect head predictor could reach;
  it runs the model itself).

What this module does not know: how the selection is executed (runtime/sparse.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.env import interpreting
from .cpu_ops import store_for_gemv
from .predictors import PredictorSet
from .sparse import Selection


class SelectionError(ValueError):
    """A density or layer setting that cannot be applied to this model."""


@dataclass(frozen=True)
class SelectionConfig:
    """Densities are fractions computed per token; None uses each layer's calibrated
    operating point. ``layer_mlp_density`` overrides single layers."""

    mlp_density: float | None = None
    head_density: float | None = None
    dense_layers: frozenset[int] = frozenset()
    layer_mlp_density: dict[int, float] = field(default_factory=dict)
    layer_head_density: dict[int, float] = field(default_factory=dict)
    # None: as the predictor file says; "topk" or "threshold" to override it.
    mlp_select: str | None = None
    # Threshold selection at another calibrated recall target (one of the file's).
    mlp_recall: float | None = None

    def __post_init__(self) -> None:
        for name in ("mlp_density", "head_density"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise SelectionError(f"{name}={value}: expected a fraction in (0, 1]")
        for name in ("layer_mlp_density", "layer_head_density"):
            for layer, value in getattr(self, name).items():
                if not 0.0 < value <= 1.0:
                    raise SelectionError(f"{name}[{layer}]={value}: expected a fraction "
                                         "in (0, 1]")


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """[..., n] scores -> bool mask of each row's k best."""
    n = scores.shape[-1]
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(
        -1, idx, True)


def count(density: float, n: int) -> int:
    """Entries kept for a density: at least one, rounded to nearest."""
    return max(1, min(n, round(density * n)))


# The predictors normalize with F.layer_norm's default eps (runtime/predictors.py); a model
# norm with another eps does not fold into them.
_PREDICTOR_EPS = 1e-5
# A norm weight below this would blow a folded factor up past what float16 holds well.
MIN_FOLD_WEIGHT = 1e-2


def fold_layer_norm(down_t: Tensor, up_t: Tensor, bias: Tensor, weight: Tensor,
                    norm_bias: Tensor) -> tuple[Tensor, Tensor]:
    """A low-rank predictor ``(x_hat @ down_t) @ up_t + bias`` over the plain normalization
    x_hat of its input, rewritten to read y = x_hat * weight + norm_bias (an affine
    LayerNorm's output over the same input): x_hat = (y - norm_bias) / weight, so
    down_t becomes down_t / weight (per input row) and bias loses
    ((norm_bias / weight) @ down_t) @ up_t. down_t [C, r], up_t [r, F], bias [F]."""
    folded = down_t / weight[:, None]
    return folded, bias - (norm_bias / weight) @ down_t @ up_t


class PredictorSelector:
    def __init__(self, predictors: PredictorSet, config: SelectionConfig | None = None) -> None:
        self.predictors = predictors
        self.config = config or SelectionConfig()
        # Per layer: (key of the predictor's weights, its factors for the fused kernel).
        self._fused: dict[int, tuple[tuple, tuple[Tensor, Tensor, Tensor]]] = {}
        # The same with a model LayerNorm folded in (_folded), or None where it does not fold.
        self._folds: dict[int, tuple[tuple, tuple[Tensor, Tensor, Tensor] | None]] = {}
        for classifier in predictors.mlp.values():  # a CPU reads [F, r] faster transposed
            store_for_gemv(classifier.up)
        n = predictors.config.num_hidden_layers
        bad = [i for i in self.config.dense_layers if not 0 <= i < n]
        if bad:
            raise SelectionError(f"dense_layers {sorted(bad)}: the model has layers 0..{n - 1}")

    @property
    def keeps_every_head(self) -> bool:
        """Whether no layer ever skips a head: such steps can be CUDA-graph captured
        (runtime/graphs.py)."""
        h = self.predictors.config.num_attention_heads
        return all(layer in self.config.dense_layers or self.ks(layer)[1] >= h
                   for layer in self.predictors.layer_ids)

    def ks(self, layer_id: int) -> tuple[int, int]:
        """(neurons, heads) kept per token at this layer."""
        c, cfg = self.predictors.config, self.config
        point = self.predictors.points[layer_id]
        mlp = cfg.layer_mlp_density.get(layer_id, cfg.mlp_density)
        head = cfg.layer_head_density.get(layer_id, cfg.head_density)
        mlp_k = point.mlp_k if mlp is None else count(mlp, c.ffn_dim)
        head_k = point.head_k if head is None else count(head, c.num_attention_heads)
        return mlp_k, head_k

    def threshold(self, layer_id: int) -> float | None:
        """The layer's calibrated neuron threshold, unless a density setting overrides it."""
        cfg = self.config
        if cfg.layer_mlp_density.get(layer_id, cfg.mlp_density) is not None:
            return None
        if (cfg.mlp_select or self.predictors.mlp_select) != "threshold":
            return None
        point = self.predictors.points[layer_id]
        table = point.mlp_thresholds
        if cfg.mlp_recall is None or not table:  # a file without a table keeps its own point
            return point.mlp_threshold
        key = f"{cfg.mlp_recall:g}"
        if key not in table:
            raise SelectionError(f"mlp_recall={cfg.mlp_recall}: layer {layer_id}'s predictors "
                                 f"are calibrated for recall {sorted(table)} only")
        return table[key]

    def mlp_reads_own_input(self, layer_id: int) -> bool:
        """Whether the layer's neurons are predicted from its own MLP input (then the
        context asks ``select_neurons`` after the attention block)."""
        point = self.predictors.points.get(layer_id)
        return (point is not None and point.mlp_source == "mlp_in"
                and layer_id not in self.config.dense_layers)

    @torch.no_grad()
    def compact(self, layer_id: int, source: Tensor, live: Tensor,
                normed: tuple[Tensor, torch.nn.LayerNorm] | None = None,
                scratch: Tensor | None = None) -> Selection | None:
        """The layer's union of neurons compacted on the device by one fused kernel
        (kernels/select.py: the predictor's two factors, its bias and the threshold in one
        launch), for a captured decode step: ``Selection(neuron_index=ids [F] int32,
        neuron_count=[1] int32)``; ``live`` [1] int32 counts the real rows of ``source``
        [B, T, C] (the rest pad the batch). The same set as ``__call__``'s masks, up to
        rounding at the threshold (the kernel scores in fp32 from the model dtype). None
        where it does not apply (top-k selection, a dense layer, a head selection, float32,
        more than 16 rows, no kernels here): the caller then takes the masks.

        ``normed``: (that LayerNorm's output, the LayerNorm) where the model normalizes
        ``source`` anyway (the MLP block's input): the predictor reads it, its own
        normalization folded into its factors (``fold_layer_norm``), and launches none.
        ``scratch``: a zeroed int32 buffer the kernel may sum into (kernels/select.py's
        ``scratch_numel``; the count then lives in it), None for one of its own."""
        c = self.predictors.config
        threshold = self.threshold(layer_id)
        b, t, hidden = source.shape
        if (layer_id in self.config.dense_layers or threshold is None
                or layer_id not in self.predictors.mlp
                or self.ks(layer_id)[1] < c.num_attention_heads
                or source.dtype not in (torch.float16, torch.bfloat16) or b * t > 16
                or not (source.is_cuda or interpreting())):
            return None
        from ..kernels.select import lowrank_threshold_select  # imports triton: on use

        folded = None if normed is None else self._folded(layer_id, source.dtype, normed[1])
        if folded is not None:
            (p1, p2, bias), x = folded, normed[0].reshape(b * t, hidden)
        else:
            p1, p2, bias = self._factors(layer_id, source.dtype)
            x = F.layer_norm(source.reshape(b * t, hidden), (hidden,))  # the classifier's own
        idx, count = lowrank_threshold_select(x, p1, p2, threshold, c.ffn_dim, bias=bias,
                                              live=live, scratch=scratch)
        return Selection(neuron_index=idx, neuron_count=count)

    def _factors(self, layer_id: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The layer's MLP predictor as the fused kernel reads it: down^T [C, r] and up^T
        [r, F] in the model dtype, rows contiguous, and up's bias [F] in float32. Made once
        (again if the predictor's weights change)."""
        p = self.predictors.mlp[layer_id]
        key = tuple((w.data_ptr(), w._version, w.device) for w in
                    (p.down.weight, p.up.weight, p.up.bias)) + (dtype,)
        cached = self._fused.get(layer_id)
        if cached is None or cached[0] != key:
            factors = (p.down.weight.t().to(dtype).contiguous(),
                       p.up.weight.t().to(dtype).contiguous(), p.up.bias.float().contiguous())
            cached = self._fused[layer_id] = (key, factors)
        return cached[1]

    def _folded(self, layer_id: int, dtype: torch.dtype, norm: torch.nn.LayerNorm
                ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``_factors`` for reading ``norm``'s output instead of normalizing the source
        itself; None where that does not fold (another eps, a weight near zero). Made
        once per layer (again if a weight changes): checking the weight reads the device,
        which a captured step must not (its warm-up makes them)."""
        p = self.predictors.mlp[layer_id]
        w, b = norm.weight, norm.bias
        affine = tuple(t for t in (w, b) if t is not None)
        key = tuple((t.data_ptr(), t._version, t.device) for t in
                    (p.down.weight, p.up.weight, p.up.bias) + affine) + (dtype,)
        cached = self._folds.get(layer_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        factors = None
        if norm.eps == _PREDICTOR_EPS and tuple(norm.normalized_shape) == (p.hidden,) and (
                w is None or float(w.detach().abs().min()) >= MIN_FOLD_WEIGHT):
            down_t, bias = p.down.weight.t().double(), p.up.bias.double()
            if w is not None:
                down_t, bias = fold_layer_norm(down_t, p.up.weight.t().double(), bias,
                                               w.double(),
                                               (b if b is not None else w.new_zeros(())).double())
            factors = (down_t.to(dtype).contiguous(), p.up.weight.t().to(dtype).contiguous(),
                       bias.float().contiguous())
        self._folds[layer_id] = (key, factors)
        return factors

    @torch.no_grad()
    def __call__(self, layer_id: int, source: Tensor) -> Selection:
        if layer_id in self.config.dense_layers:
            return Selection()
        self._check_layer(layer_id)
        head_k = self.ks(layer_id)[1]
        p_heads = self.predictors.heads[layer_id]
        x = source.to(p_heads.up.weight.dtype)
        heads = topk_mask(p_heads(x), head_k) \
            if head_k < self.predictors.config.num_attention_heads else None
        neurons = None if self.mlp_reads_own_input(layer_id) else self._neurons(layer_id, x)
        return Selection(heads=heads, neurons=neurons)

    @torch.no_grad()
    def select_neurons(self, layer_id: int, mlp_in: Tensor) -> Tensor | None:
        """[B, T, F] neuron mask from the residual entering the layer's MLP block."""
        self._check_layer(layer_id)
        return self._neurons(layer_id, mlp_in.to(self.predictors.mlp[layer_id].up.weight.dtype))

    def _check_layer(self, layer_id: int) -> None:
        if layer_id not in self.predictors.mlp:
            raise SelectionError(f"no predictors for layer {layer_id} (the file has layers "
                                 f"{self.predictors.layer_ids})")

    def _neurons(self, layer_id: int, x: Tensor) -> Tensor | None:
        p_mlp = self.predictors.mlp[layer_id]
        threshold = self.threshold(layer_id)
        if threshold is not None:  # a calibrated threshold: as many neurons as the token needs
            return p_mlp(x) > threshold
        mlp_k = self.ks(layer_id)[0]
        # Selecting everything needs no prediction, and must stay exact (a density-1 run).
        return topk_mask(p_mlp(x), mlp_k) if mlp_k < self.predictors.config.ffn_dim else None


class RandomSelector:
    """Uniformly random k neurons and heads per token (seeded), for baselines."""

    def __init__(self, ffn_dim: int, num_heads: int, mlp_density: float, head_density: float,
                 *, seed: int = 0, dense_layers: frozenset[int] = frozenset()) -> None:
        self.mlp_k = count(mlp_density, ffn_dim)
        self.head_k = count(head_density, num_heads)
        self.ffn_dim, self.num_heads = ffn_dim, num_heads
        self.dense_layers = dense_layers
        self.seed = seed
        # One generator per device: drawing on the host and copying to a GPU made a sweep
        # point 40x slower than the predictors.
        self.generators: dict[torch.device, torch.Generator] = {}

    @property
    def keeps_every_head(self) -> bool:
        return self.head_k >= self.num_heads

    def _rand(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        g = self.generators.get(device)
        if g is None:
            g = self.generators[device] = torch.Generator(device).manual_seed(self.seed)
        return torch.rand(shape, generator=g, device=device)

    def __call__(self, layer_id: int, source: Tensor) -> Selection:
        if layer_id in self.dense_layers:
            return Selection()
        b, t = source.shape[:2]
        out = Selection()
        if self.mlp_k < self.ffn_dim:
            out.neurons = topk_mask(self._rand((b, t, self.ffn_dim), source.device), self.mlp_k)
        if self.head_k < self.num_heads:
            out.heads = topk_mask(self._rand((b, t, self.num_heads), source.device),
                                  self.head_k)
        return out


class FixedSelector:
    """Given masks per layer (a layer absent from both tables stays dense)."""

    def __init__(self, heads: dict[int, Tensor] | None = None,
                 neurons: dict[int, Tensor] | None = None) -> None:
        self.heads = heads or {}
        self.neurons = neurons or {}

    def __call__(self, layer_id: int, source: Tensor) -> Selection:
        return Selection(heads=self.heads.get(layer_id), neurons=self.neurons.get(layer_id))


class OracleHeadSelector:
    """Per token, the k heads whose true outputs matter most (MLP dense): what a perfect head
    predictor could reach at this density, an analysis tool and not an engine path.

    It recomputes the layer's attention from the actual residual stream (which earlier
    layers' skipped heads have already changed) and scores each head by its exact
    contribution to the residual, ``c_h = out_proj[:, h] @ o_h`` [C]:

    - ``"norm"``: the k heads with the largest ||c_h||;
    - ``"best"``: the k-subset S minimising ||sum_{h not in S} c_h||, the error of the
      attention block's output, by enumerating all subsets (C(H, k), with the per-token
      Gram matrix of the c_h). Optimal per token and layer; not a search over the whole
      network (a subset that is worse here could in principle be better downstream).

    Only for scoring whole windows from position 0 without a KV cache (``SparseContext``
    mask mode, as the sweep scores): the attention is recomputed over the source's own
    tokens. Layer l > 0 reads the residual entering layer l-1's MLP (the wiring of
    sparse.predictor_source) and runs that MLP dense to get layer l's input.
    """

    METHODS = ("norm", "best")

    def __init__(self, model, head_density: float, method: str = "norm",
                 max_subsets: int = 20_000) -> None:
        from math import comb

        if method not in self.METHODS:
            raise SelectionError(f"oracle method {method!r}: expected one of {self.METHODS}")
        if not 0.0 < head_density <= 1.0:
            raise SelectionError(f"head_density={head_density}: expected a fraction in (0, 1]")
        c = model.config
        self.model, self.method = model, method
        self.num_heads = c.num_attention_heads
        self.head_k = count(head_density, self.num_heads)
        if method == "best" and comb(self.num_heads, self.head_k) > max_subsets:
            raise SelectionError(f"oracle 'best' enumerates C({self.num_heads}, {self.head_k}) "
                                 f"subsets, more than {max_subsets}: use method 'norm'")
        self.layers = dict(model.decoder.layers.items())
        subsets = [m for m in range(1 << self.num_heads) if m.bit_count() == self.head_k]
        bits = torch.tensor([[(m >> h) & 1 for h in range(self.num_heads)] for m in subsets])
        self.subsets = bits.bool()  # [S, H]

    @torch.no_grad()
    def contributions(self, layer_id: int, source: Tensor) -> Tensor:
        """Each head's exact contribution to the residual [B, T, H, C] (no out_proj bias)."""
        from .model import Batch, full_positions

        layer = self.layers[str(layer_id)]
        h = source if layer_id == 0 else self.layers[str(layer_id - 1)].mlp_block(source)
        x = layer.self_attn_layer_norm(h) if layer.pre_ln else h
        b, t, _ = x.shape
        attn = layer.self_attn
        o = attn.head_outputs(x, layer_id, Batch(full_positions(b, t, x.device)))  # [B,H,T,D]
        w = attn.out_proj.weight.view(-1, self.num_heads, attn.head_dim)  # [C, H, D]
        return torch.einsum("bhtd,chd->bthc", o, w)

    @torch.no_grad()
    def __call__(self, layer_id: int, source: Tensor) -> Selection:
        contrib = self.contributions(layer_id, source).float()
        # A mask even at k = H: density 1 goes through the same masked path (tests).
        if self.method == "norm":
            return Selection(heads=topk_mask(contrib.norm(dim=-1), self.head_k))
        gram = torch.einsum("bthc,btgc->bthg", contrib, contrib)  # [B, T, H, H]
        dropped = (~self.subsets).to(gram)  # [S, H]
        err = torch.einsum("sh,bthg,sg->bts", dropped, gram, dropped)  # squared error
        best = err.argmin(-1)  # [B, T]
        return Selection(heads=self.subsets.to(best.device)[best])


class AdaptiveOracleHeadSelector(OracleHeadSelector):
    """Per token and layer, the fewest heads (best subset of each size, as ``"best"``) whose
    dropped contributions leave a relative error ||sum_{h not in S} c_h||^2 / ||sum_h c_h||^2
    of at most ``rel_error``: easy tokens keep few heads, hard ones many. ``rel_error`` is
    set on the first batch it sees (the first call is layer 0, whose source is the
    embeddings: the dense pass from there gives every layer's heads) so that the mean
    density over that batch's tokens and layers is ``head_density``; later batches keep it,
    so the measured density differs a little."""

    def __init__(self, model, head_density: float, max_subsets: int = 20_000) -> None:
        super().__init__(model, 1.0, "norm")
        self.method = "adaptive"
        if not 0.0 < head_density <= 1.0:
            raise SelectionError(f"head_density={head_density}: expected a fraction in (0, 1]")
        h = self.num_heads
        if 2**h > max_subsets:
            raise SelectionError(f"adaptive oracle enumerates 2^{h} subsets, more than "
                                 f"{max_subsets}")
        self.target = head_density
        self.subsets = torch.tensor([[(m >> j) & 1 for j in range(h)] for m in range(2**h)]
                                    ).bool()  # [2^H, H]
        self.sizes = self.subsets.sum(-1)  # [2^H]
        self.rel_error: float | None = None

    def best_by_size(self, contrib: Tensor) -> tuple[Tensor, Tensor]:
        """Per token and subset size k = 0..H: the smallest relative squared error [B, T, H+1]
        and the subset reaching it (index into ``subsets``)."""
        gram = torch.einsum("bthc,btgc->bthg", contrib, contrib)
        dropped = (~self.subsets).to(gram)
        err = torch.einsum("sh,bthg,sg->bts", dropped, gram, dropped)
        total = gram.sum((-1, -2)).clamp_min(1e-30)[..., None]
        rel = err / total
        vals, idxs = [], []
        for k in range(self.num_heads + 1):
            cols = (self.sizes == k).nonzero().squeeze(1).to(rel.device)
            v, i = rel.index_select(-1, cols).min(-1)
            vals.append(v)
            idxs.append(cols[i])
        return torch.stack(vals, -1), torch.stack(idxs, -1)

    @staticmethod
    def first_within(rel: Tensor, bound: float) -> Tensor:
        """Smallest size whose error is within ``bound`` ([..., H+1] -> [...])."""
        return (rel <= bound).to(torch.int8).argmax(-1)  # size H always has error 0

    @torch.no_grad()
    def calibrate(self, source: Tensor) -> float:
        """The bound whose mean density over ``source``'s tokens (layer 0's input, the
        dense pass from there) and all layers is closest to the target."""
        from .model import Batch, full_positions

        b, t, _ = source.shape
        batch = Batch(full_positions(b, t, source.device))
        rels, h, src = [], source, source
        for lid, layer in self.layers.items():
            rels.append(self.best_by_size(self.contributions(int(lid), src).float())[0])
            src = layer.attention_block(h, batch)
            h = layer.mlp_block(src)
        lo, hi = 0.0, 1.0  # density falls as the bound grows
        for _ in range(40):
            mid = (lo + hi) / 2
            dens = sum(float(self.first_within(r, mid).float().mean()) for r in rels)
            if dens / len(rels) / self.num_heads > self.target:
                lo = mid
            else:
                hi = mid
        return hi

    @torch.no_grad()
    def __call__(self, layer_id: int, source: Tensor) -> Selection:
        if self.rel_error is None:
            if layer_id != 0:
                raise SelectionError("the adaptive oracle calibrates on layer 0's input: run "
                                     "it over the whole model")
            self.rel_error = self.calibrate(source)
        rel, idx = self.best_by_size(self.contributions(layer_id, source).float())
        k = self.first_within(rel, self.rel_error)
        best = idx.gather(-1, k[..., None].long()).squeeze(-1)
        return Selection(heads=self.subsets.to(best.device)[best])


def parse_layers(text: str) -> frozenset[int]:
    """ "0, 3" -> {0, 3} (the [sparsity] dense_layers setting)."""
    out = set()
    for part in text.split(","):
        if part.strip():
            try:
                out.add(int(part))
            except ValueError:
                raise SelectionError(f"[sparsity] dense_layers = {text!r}: expected "
                                     "comma-separated layer ids such as \"0,1\"") from None
    return frozenset(out)
