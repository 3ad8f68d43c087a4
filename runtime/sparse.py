"""Sparse execution: per token and layer, compute only the selected heads and MLP neurons.

The model (runtime/model.py) stays the one definition; a forward pass becomes sparse when
its ``Batch`` carries a ``SparseContext``. The context implements the predictor wiring
(which tensor predicts which layer, see ``predictor_source``), asks a selector for each
layer's selection, and keeps per-layer statistics. The two ops here replace the dense
projections inside ``mlp_block`` and ``OPTAttention`` when a selection is present:

- gather mode (a KV cache is present: decoding, prefill): the batch's selections are
  unioned, and only those rows are read: fc1 rows + biases and fc2 columns of the selected
  neurons, q/k/v rows and out_proj columns of the selected heads;
- mask mode (whole windows, no cache: scoring): every token keeps its own selection; the
  dense product is computed and unselected neurons/heads are zeroed. This is the same
  function as computing each token alone with its own gather (tests check it), used to
  measure quality at batch size one cheaply.

KV correctness (design.md): a head skipped at some position may be selected later. When
the cache keeps its attention inputs (``KVCache(keep_inputs=True)``) every written position
stores the post-LN input x and a per-head "K/V valid" bit; a selected head with missing
positions gets their K/V recomputed from the stored x (DejaVu's approach), so only the
selected heads' K/V rows are read and computed per token. Without stored inputs the op
falls back to computing K/V for every head (then K/V bytes do not reflect head sparsity).

What this module does not know: how selections are made (``selectors``), where weights
live, or how requests are batched.

Shapes: B rows, T tokens per row, C hidden, H heads, D head dim, F ffn dim, S cache slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.env import interpreting
from . import cpu_ops, sparse_backend
from .attention import masked_attention
from .lazy_kv import complete_missing_kv, fill_missing_kv, flag, head_rows

if TYPE_CHECKING:
    from .model import Batch, OPTAttention, OPTDecoderLayer


class SparsityError(RuntimeError):
    """A sparse forward pass that cannot run as asked (missing predictor input, bad masks)."""


# --- the wiring ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePoint:
    """Where a layer's predictors read the residual stream: ``site`` of layer ``layer``.
    "mlp_in" is the residual entering that layer's MLP block (after its attention block);
    "layer_in" is the residual entering the layer (only used for layer 0)."""

    layer: int
    site: Literal["mlp_in", "layer_in"]


def predictor_source(layer_id: int) -> SourcePoint:
    """Layer l's predictors (heads and neurons) read the residual entering layer l-1's MLP.

    Why: that tensor exists one MLP block before layer l starts, so prediction can run on a
    side stream beside layer l-1's MLP and is off the critical path for both of layer l's
    blocks (reading layer l's own input would put the head predictor on the critical path).
    The residual stream changes little from block to block (DejaVu's observation), so the
    lookahead costs little accuracy. Layer 0 has no earlier MLP; it reads its own input
    (the embeddings), once per token. At a pipeline boundary before layer a > 0 the stage
    that ran layer a-1 sends this tensor with the hidden state (``SparseContext.carry_out``).
    """
    if layer_id < 0:
        raise ValueError(f"layer id {layer_id} is negative")
    if layer_id == 0:
        return SourcePoint(0, "layer_in")
    return SourcePoint(layer_id - 1, "mlp_in")


# --- selections and statistics -------------------------------------------------------------


@dataclass
class Selection:
    """One layer's choice for one forward pass: per token boolean masks, [B, T, H] for heads
    and [B, T, F] for neurons; None keeps that block dense."""

    heads: Tensor | None = None
    neurons: Tensor | None = None
    # Gather mode: the neurons' union as sorted indices [n], found once by the context for
    # its density and handed to the MLP op (which would otherwise find it again).
    neuron_index: Tensor | None = None
    # A captured step's union compacted on the device by the selector itself (no masks):
    # the valid entries at the front of ``neuron_index`` (int32, any order), [1] int32.
    neuron_count: Tensor | None = None
    # A zeroed workspace for this layer's chained MLP kernel alone: a captured step zeroes
    # every layer's at once, so that no MLP launches a memset of its own.
    mlp_workspace: Tensor | None = None
    head_index: Tensor | None = None  # the heads' union, as for neuron_index
    # An offloaded layer's decode step: the union padded to every id (``padded_union``),
    # its valid entries at the front, their count [1] int32 on the device.
    head_count: Tensor | None = None


# A selector maps (layer id, predictor input [B, T, C]) to that layer's Selection.
Selector = Callable[[int, Tensor], Selection]


@dataclass
class LayerStats:
    tokens: int = 0
    mlp_computed: float = 0.0  # sum over tokens of the fraction of neurons computed
    heads_computed: float = 0.0  # sum over tokens of the fraction of heads computed
    predictor_s: float = 0.0  # host wall time in the selector (predictors + top-k)
    kv_recomputed: int = 0  # (position, head) K/V pairs recomputed lazily
    # Counted on the device (no host read inside a step), [3] float64: tokens x fraction of
    # neurons and of heads (padded unions), K/V pairs recomputed (batched completion); folded
    # in by ``SparseStats.settle``.
    pending: Tensor | None = None

    def add_pending(self, kind: str, count: Tensor, scale: float = 1.0) -> None:
        """Add ``count`` ([1] on the device) x ``scale`` to ``kind``'s pending sum ("neurons",
        "heads" or "kv"; one launch)."""
        if self.pending is None:
            self.pending = torch.zeros(3, dtype=torch.float64, device=count.device)
        i = PENDING.index(kind)
        self.pending[i:i + 1].add_(count, alpha=scale)

    def add_kv(self, filled: int | Tensor) -> None:
        """K/V pairs a completion filled: an int, or [1] on the device (kept pending)."""
        if isinstance(filled, Tensor):
            self.add_pending("kv", filled)
        else:
            self.kv_recomputed += filled


PENDING = ("neurons", "heads", "kv")


@dataclass
class SparseStats:
    """Measured densities per layer, accumulated over forward passes."""

    layers: dict[int, LayerStats] = field(default_factory=dict)

    def layer(self, layer_id: int) -> LayerStats:
        return self.layers.setdefault(layer_id, LayerStats())

    def settle(self) -> None:
        """Fold the fractions counted on the device into the host counts (one read per
        layer that has any; readers call it, outside the steps)."""
        for s in self.layers.copy().values():
            pending, s.pending = s.pending, None
            if pending is not None:
                mlp, heads, kv = pending.tolist()
                s.mlp_computed += mlp
                s.heads_computed += heads
                s.kv_recomputed += round(kv)

    def snapshot(self) -> SparseStats:
        """A copy of the counts so far (``since`` subtracts it later)."""
        self.settle()
        return SparseStats({i: replace(s) for i, s in self.layers.copy().items()})

    def since(self, earlier: SparseStats) -> SparseStats:
        """What was counted after ``earlier`` (a ``snapshot`` of this object): the
        densities of some steps alone, e.g. decode steps without the prompt's prefill."""
        self.settle()
        out = SparseStats()
        for i, s in self.layers.copy().items():
            e = earlier.layers.get(i, LayerStats())
            if s.tokens > e.tokens:
                out.layers[i] = LayerStats(
                    s.tokens - e.tokens, s.mlp_computed - e.mlp_computed,
                    s.heads_computed - e.heads_computed, s.predictor_s - e.predictor_s,
                    s.kv_recomputed - e.kv_recomputed)
        return out

    def _mean(self, attr: str) -> float:
        self.settle()
        per_layer = [getattr(s, attr) / s.tokens for s in self.layers.values() if s.tokens]
        return sum(per_layer) / len(per_layer) if per_layer else float("nan")

    @property
    def mlp_density(self) -> float:
        """Fraction of neurons computed, averaged over tokens and then layers."""
        return self._mean("mlp_computed")

    @property
    def head_density(self) -> float:
        return self._mean("heads_computed")

    def per_layer(self) -> list[tuple[int, float, float]]:
        """(layer id, fraction of neurons, fraction of heads computed per token), by layer."""
        # A copy first (atomic): a front end may read while the engine's thread adds layers.
        self.settle()
        return [(i, s.mlp_computed / s.tokens, s.heads_computed / s.tokens)
                for i, s in sorted(self.layers.copy().items()) if s.tokens]

    def as_dict(self) -> dict:
        self.settle()
        return {
            "mlp_density": self.mlp_density,
            "head_density": self.head_density,
            "layers": {
                str(i): {
                    "tokens": s.tokens,
                    "mlp_density": s.mlp_computed / s.tokens if s.tokens else None,
                    "head_density": s.heads_computed / s.tokens if s.tokens else None,
                    "predictor_s": s.predictor_s,
                    "kv_recomputed": s.kv_recomputed,
                }
                for i, s in sorted(self.layers.items())
            },
        }


Mode = Literal["auto", "gather", "mask"]


class SparseContext:
    """The sparse side of one forward pass over a span of layers (put it in ``Batch``).

    ``carry`` is the predictor input of the span's first layer when that layer is not 0 (it
    came from the previous pipeline stage); after the pass ``carry_out`` holds the tensor the
    next stage's first predictor needs. ``mode``: "gather" unions the batch's selections and
    reads only those rows, "mask" keeps per-token selections, "auto" gathers when the batch
    has a KV cache (decoding) and masks otherwise (scoring whole windows). ``ahead``: the
    lookahead of gather-mode passes (``Lookahead``); None selects each layer when it starts.
    """

    def __init__(self, selector: Selector, *, stats: SparseStats | None = None,
                 carry: Tensor | None = None, mode: Mode = "auto",
                 dense_above: float = 0.9, ahead: Lookahead | None = None) -> None:
        if mode not in ("auto", "gather", "mask"):
            raise ValueError(f"sparse mode {mode!r}: expected 'auto', 'gather' or 'mask'")
        self.selector = selector
        self.stats = stats if stats is not None else SparseStats()
        self.mode = mode
        # Gathering a union that covers most rows reads almost every row anyway, through a
        # slower path: above this union density the block runs dense (measured on the
        # shipped model, layer 0's union passes 0.9 from 4 decoding rows).
        self.dense_above = dense_above
        self._sources: dict[int, Tensor] = {}
        self._carry = carry
        self.carry_out: Tensor | None = None
        self.ahead = ahead
        self._early: dict[int, Selection] = {}  # made by ``lookahead``, used by ``select``
        # A resident layer's padded head union, by layer: (mask, ids, device count)
        self._padded: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._batch: Batch | None = None  # the pass's batch, known from the first ``select``

    def gather(self, batch: Batch) -> bool:
        return self.mode == "gather" or (self.mode == "auto" and batch.cache is not None)

    def select(self, layer: OPTDecoderLayer, h: Tensor, batch: Batch) -> Selection:
        """Layer ``layer``'s selection; ``h`` is its input [B, T, C]. A selection made one
        layer early (``lookahead``) or given by the previous stage (``Lookahead.given``) is
        used as it is. Where the layer's neurons are predicted from its own MLP input, they
        come later (``select_mlp``): this selection holds its heads only."""
        lid = layer.layer_id
        self._batch = batch
        early = self._early.pop(lid, None)
        if early is not None:
            return early
        given = self.ahead.given.pop(lid, None) if self.ahead is not None else None
        if given is not None:
            self._carry = None  # the previous stage already read it for this selection
            return self._account(layer, given, h.shape, batch)
        source = self.source(lid, h)
        t0 = time.perf_counter()
        sel = self.selector(lid, source)
        self.stats.layer(lid).predictor_s += time.perf_counter() - t0
        return self._account(layer, sel, h.shape, batch)

    def select_mlp(self, layer: OPTDecoderLayer, h: Tensor, batch: Batch, sel: Selection,
                   normed: tuple[Tensor, torch.nn.LayerNorm] | None = None) -> Selection:
        """``sel`` with the layer's neurons when its MLP predictor reads its own input:
        ``h`` [B, T, C] is the residual entering the layer's MLP block (``normed``: the
        block's LayerNorm output over it and that norm, for a selector that can read it;
        this eager context does not). An offloaded layer starts reading the rows now."""
        lid = layer.layer_id
        if not mlp_reads_own_input(self.selector, lid):
            return sel
        t0 = time.perf_counter()
        neurons = self.selector.select_neurons(lid, h)  # type: ignore[attr-defined]
        self.stats.layer(lid).predictor_s += time.perf_counter() - t0
        neurons, index, count = self._part(layer, neurons, None, "neurons", h.shape, batch)
        if self.gather(batch) and sparse_backend.is_offloaded(layer):
            layer.offloaded.prefetch(Selection(neurons=neurons, neuron_index=index,
                                               neuron_count=count))
        return replace(sel, neurons=neurons, neuron_index=index, neuron_count=count)

    def _account(self, layer: OPTDecoderLayer, sel: Selection, shape: torch.Size,
                 batch: Batch) -> Selection:
        """Check a layer's masks, count what they compute and, in gather mode, union them;
        an offloaded layer starts reading their rows. A layer whose neurons come from
        ``select_mlp`` has its heads accounted here, its neurons there."""
        lid = layer.layer_id
        self.stats.layer(lid).tokens += shape[0] * shape[1]
        # A selection sent ahead by the previous stage comes unioned: its index tensors
        # are kept (the prefetch it started is matched by identity).
        heads, head_index, head_count = self._part(layer, sel.heads, sel.head_index,
                                                   "heads", shape, batch, sel.head_count)
        out = Selection(heads=heads, head_index=head_index, head_count=head_count)
        if not mlp_reads_own_input(self.selector, lid):
            neurons, neuron_index, neuron_count = self._part(
                layer, sel.neurons, sel.neuron_index, "neurons", shape, batch,
                sel.neuron_count)
            out = replace(out, neurons=neurons, neuron_index=neuron_index,
                          neuron_count=neuron_count)
        if self.gather(batch) and sparse_backend.is_offloaded(layer):
            # its rows start crossing the link now, beside the work issued before
            layer.offloaded.prefetch(out)
        return out

    def _part(self, layer: OPTDecoderLayer, mask: Tensor | None, index: Tensor | None,
              kind: str, shape: torch.Size, batch: Batch, count: Tensor | None = None
              ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """One kind's mask ("heads" or "neurons"), checked, its computed fraction counted;
        in gather mode the union the block computes (None: dense) with its indices
        (``index``, when it came known) and, for an offloaded layer's decode step, its
        device count (the union padded, ``padded_union``: nothing read from the device)."""
        _check_mask(mask, kind, shape)
        stat = "heads_computed" if kind == "heads" else "mlp_computed"
        stats = self.stats.layer(layer.layer_id)
        tokens = shape[0] * shape[1]
        if not self.gather(batch):
            setattr(stats, stat, getattr(stats, stat) + _masked_fraction(mask, tokens))
            return mask, None, None
        offloaded = sparse_backend.is_offloaded(layer)
        pads = layer.offloaded.pads(kind, shape) if offloaded else \
            sparse_backend.pads_resident(layer, kind, shape, batch)
        if mask is not None and (count is not None or index is None) and pads:
            if count is None:
                index, count = padded_union(mask)
            stats.add_pending(kind, count, tokens / mask.shape[-1])
            if kind == "heads" and not offloaded:  # for selected_attention (padded_heads)
                self._padded[layer.layer_id] = (mask, index, count)
            return mask, index, count
        # An offloaded layer has no dense weights on the device: it always gathers.
        mask, index, union = self._union(mask, offloaded, index)
        setattr(stats, stat, getattr(stats, stat) + tokens * union)  # each token: the union
        return mask, index, None

    def padded_heads(self, layer_id: int, heads: Tensor) -> tuple[Tensor, Tensor] | None:
        """The padded union ``select`` made of this head mask (the same tensor) for a
        resident layer, as (ids, device count), once; None if it made none."""
        got = self._padded.pop(layer_id, None)
        return (got[1], got[2]) if got is not None and got[0] is heads else None

    def source(self, lid: int, h: Tensor) -> Tensor:
        """Layer ``lid``'s predictor input (the wiring of ``predictor_source``); ``h`` is
        the layer's input [B, T, C]."""
        point = predictor_source(lid)
        if point.site == "layer_in":
            source = h
        elif lid in self._sources:
            source = self._sources.pop(lid)
        elif self._carry is not None:
            source, self._carry = self._carry, None
        else:
            raise SparsityError(
                f"no predictor input for layer {lid}: it reads the residual entering layer "
                f"{point.layer}'s MLP block; a stage starting at layer {lid} must receive it "
                "from the previous stage (SparseContext(carry=...))"
            )
        if source.shape != h.shape:
            raise SparsityError(
                f"predictor input for layer {lid} has shape {tuple(source.shape)}, the hidden "
                f"state {tuple(h.shape)}"
            )
        return source

    def _union(self, mask: Tensor | None, offloaded: bool, index: Tensor | None = None
               ) -> tuple[Tensor | None, Tensor | None, float]:
        """A gather-mode mask -> (the mask, or None to run dense; its union's indices, found
        here unless given; the fraction computed). One host read: the union's size."""
        if mask is None:
            return None, None, 1.0
        if index is None:
            index = union_index(mask)
        union = index.numel() / mask.shape[-1]
        if union >= self.dense_above and not offloaded:
            return None, None, 1.0
        return mask, index, union

    def lookahead(self, layer_id: int, h: Tensor,
                  normed: tuple[Tensor, torch.nn.LayerNorm] | None = None) -> None:
        """``h`` enters layer ``layer_id``'s MLP block: it is layer ``layer_id + 1``'s
        predictor input. With a ``Lookahead`` (gather mode), layer ``layer_id + 1``'s
        selection is made now, before this MLP block runs: an offloaded next layer of this
        span starts reading its rows (``prefetch``), a next layer on the next stage gets
        its selection sent ahead (``Lookahead.send``). Only what is known this early: the
        heads, and the neurons of a layer whose MLP predictor reads this source (an
        own-input layer's come in its ``select_mlp``). ``normed``: the block's LayerNorm
        output over ``h`` and that norm, for a selector that can read it (the captured
        step's fused selection; this eager context does not)."""
        self._sources[layer_id + 1] = h
        self.carry_out = h
        ahead, batch = self.ahead, self._batch
        if ahead is None or batch is None or not self.gather(batch):
            return
        nxt = layer_id + 1
        if nxt in ahead.layers:
            layer = ahead.layers[nxt]
            # ``select`` starts the offloaded layer's reads (``prefetch``) as it unions.
            self._early[nxt] = self.select(layer, h, batch)
        elif nxt == ahead.send_layer and ahead.send is not None:
            t0 = time.perf_counter()
            sel = self.selector(nxt, h)
            # Charged to this stage's last layer: this stage's time, not the next one's.
            self.stats.layer(layer_id).predictor_s += time.perf_counter() - t0
            if mlp_reads_own_input(self.selector, nxt):  # not known yet: the next stage's
                sel = Selection(heads=sel.heads)       # select_mlp makes them
            _check_mask(sel.neurons, "neurons", h.shape)
            _check_mask(sel.heads, "heads", h.shape)
            ahead.send(nxt, sel)


@dataclass
class Lookahead:
    """What a span's gather-mode passes do one layer early (``SparseContext.lookahead``).

    ``layers``: this span's offloaded layers (by id) whose selection is made while the
    layer before computes, then handed to their ``prefetch``; ``send_layer``/``send``: the
    next stage's first layer, whose selection this stage makes from its last layer's MLP
    input and passes to ``send`` (the worker puts it on the wire ahead of the activations);
    ``given``: selections the previous stage sent ahead, used instead of the selector's
    (each once)."""

    layers: dict[int, OPTDecoderLayer] = field(default_factory=dict)
    send_layer: int | None = None
    send: Callable[[int, Selection], None] | None = None
    given: dict[int, Selection] = field(default_factory=dict)


def mlp_reads_own_input(selector: Selector | None, layer_id: int) -> bool:
    """Whether ``selector`` predicts layer ``layer_id``'s neurons from the residual entering
    that layer's MLP block (``selector.select_neurons(layer_id, h)``, after attention)
    rather than with its heads from the lookahead source."""
    own = getattr(selector, "mlp_reads_own_input", None)
    return own is not None and bool(own(layer_id))


def _check_mask(mask: Tensor | None, what: str, shape: torch.Size) -> None:
    if mask is not None and (mask.dtype != torch.bool
                             or tuple(mask.shape[:2]) != tuple(shape[:2])):
        raise SparsityError(
            f"{what} selection must be a bool mask [B, T, n] matching the hidden state "
            f"{tuple(shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
        )


def _masked_fraction(mask: Tensor | None, tokens: int) -> float:
    """Mask mode: the sum over tokens of the fraction each computes."""
    return float(tokens) if mask is None else float(mask.double().mean(-1).sum())


def needs_kv_inputs(selector: Selector | None) -> bool:
    """Whether a cache must keep attention inputs (``KVCache(keep_inputs=True)``): only
    where some step may skip a head whose K/V a later step then recomputes. A selector that
    keeps every head says so (``keeps_every_head``); storing and checking inputs for it
    would only cost every layer of every step."""
    return selector is not None and not getattr(selector, "keeps_every_head", False)


def union_index(mask: Tensor) -> Tensor:
    """[..., n] bool -> sorted indices of the entries selected by any token."""
    return mask.reshape(-1, mask.shape[-1]).any(0).nonzero().squeeze(1)


def padded_union(mask: Tensor) -> tuple[Tensor, Tensor]:
    """[..., n] bool -> (ids [n]: the union's ids ascending, then every other id ascending;
    count [1] int32: how many lead). ``union_index`` without reading the device: the size
    stays on it, and ops over the ids take the count (entries past it are padding, real ids
    that must not count as selected)."""
    if mask.is_cuda or interpreting():
        from ..kernels.select import padded_union as one_launch  # imports triton: on use
        return one_launch(mask)
    return padded_union_reference(mask)


def padded_union_reference(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``padded_union`` in torch ops (the CPU's; kernels/select.py's one launch is compared
    with it)."""
    any_ = mask.reshape(-1, mask.shape[-1]).any(0)
    ids = torch.argsort(~any_, stable=True)
    return ids, any_.sum(dtype=torch.int32).reshape(1)


# --- the MLP op ----------------------------------------------------------------------------


class NotCapturable(SparsityError):
    """A sparse step that cannot run without reading the device from the host."""


def selected_mlp(layer: OPTDecoderLayer, x: Tensor, neurons: Tensor | None, gather: bool,
                 index: Tensor | None = None, *, device_only: bool = False,
                 count: Tensor | None = None, residual: Tensor | None = None,
                 workspace: Tensor | None = None) -> Tensor:
    """fc2(relu(fc1(x))) over the selected neurons only. x [B, T, C], neurons [B, T, F];
    ``index``: their union's indices when already known (``Selection.neuron_index``).
    ``device_only`` (a step runtime/graphs.py captures): never read the device from the
    host; the union is compacted on the device and the kernel reads its count there.
    ``count``: the union came compacted (``Selection.neuron_count``; no masks).
    ``residual`` [B, T, C]: returned plus it (the device-only kernel adds it in its
    epilogue: one launch less); ``workspace``: ``Selection.mlp_workspace``."""
    if count is not None and not sparse_backend.is_offloaded(layer):
        _check_kernel_applies(layer, x)
        return sparse_backend.mlp_gather(layer, x, index, count, residual=residual,
                                         workspace=workspace)
    if device_only and gather and count is None:
        return _compacted_mlp(layer, x, neurons, residual, workspace)
    out = _selected_mlp(layer, x, neurons, gather, index, count)
    return out if residual is None else residual + out


def _selected_mlp(layer: OPTDecoderLayer, x: Tensor, neurons: Tensor | None, gather: bool,
                  index: Tensor | None, count: Tensor | None) -> Tensor:
    """``selected_mlp`` where no kernel adds the residual."""
    fc1, fc2 = layer.fc1, layer.fc2
    if count is not None:  # an offloaded layer
        return layer.offloaded.mlp(x, index, count)
    if not gather:
        return fc2(F.relu(fc1(x)) * neurons.to(x.dtype))
    idx = index if index is not None else union_index(neurons)
    # Fast paths, each with gathered_mlp_reference as its twin: the Triton kernel (GPU) and
    # whole-row gathers of fc2 transposed (CPU: the reference's strided column gather cost
    # more there than the dense product).
    if sparse_backend.mlp_kernel_applies(layer, x):
        return sparse_backend.mlp_gather(layer, x, idx)
    if x.device.type == "cpu":
        return cpu_ops.gathered_mlp(x, fc1.weight, fc1.bias, layer.fc2_rows(), fc2.bias, idx)
    return gathered_mlp_reference(layer, x, idx)


def gathered_mlp_reference(layer: OPTDecoderLayer, x: Tensor, idx: Tensor) -> Tensor:
    """fc2(relu(fc1(x))) over neurons ``idx`` [n] only, in plain torch: x [..., C]."""
    fc1, fc2 = layer.fc1, layer.fc2
    w1 = fc1.weight.index_select(0, idx)  # [n, C]: the neurons' fc1 rows
    b1 = fc1.bias.index_select(0, idx) if fc1.bias is not None else None
    w2 = fc2.weight.index_select(1, idx)  # [C, n]: their fc2 columns
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, fc2.bias)


def _compacted_mlp(layer: OPTDecoderLayer, x: Tensor, neurons: Tensor,
                   residual: Tensor | None, workspace: Tensor | None) -> Tensor:
    """The union of the batch's neurons, written to the front of an index buffer on the
    device (kernels/select.py), through the kernel with the count on the device: the same
    set as ``union_index``, in an order that may vary (fp32 accumulation order only)."""
    _check_kernel_applies(layer, x)
    from ..kernels.select import threshold_select

    flags = neurons.reshape(-1, neurons.shape[-1]).to(x.dtype)  # 1.0 where selected
    idx, count = threshold_select(flags, 0.5, capacity=flags.shape[1])
    return sparse_backend.mlp_gather(layer, x, idx, count, residual=residual,
                                     workspace=workspace)


def _check_kernel_applies(layer: OPTDecoderLayer, x: Tensor) -> None:
    if sparse_backend.is_offloaded(layer) or not sparse_backend.mlp_kernel_applies(layer, x):
        raise NotCapturable(f"layer {layer.layer_id}: the sparse MLP kernel does not apply "
                            f"({x.dtype}, {x.shape[0] * x.shape[1]} rows, "
                            f"{sparse_backend.backend_of(layer)} backend)")


# --- the attention op ----------------------------------------------------------------------


def selected_attention(attn: OPTAttention, x: Tensor, layer_id: int, batch: Batch,
                     heads: Tensor, gather: bool) -> Tensor:
    """Attention over the selected heads only; x is the block's (post-LN) input [B, T, C],
    heads a [B, T, H] bool mask. Equals dense attention with unselected heads' outputs
    zeroed before out_proj."""
    if not gather:
        return _masked_attention(attn, x, layer_id, batch, heads)
    if attn.offloaded is not None:
        known = attn.offloaded.known_union(heads)
    else:
        known = batch.sparse.padded_heads(layer_id, heads) if batch.sparse is not None else None
    idx, count = known if known is not None else (union_index(heads), None)
    if count is not None:  # a decode step over a padded union: no host read
        return sparse_backend.attention_gather(attn, x, layer_id, batch, idx, count)
    if sparse_backend.attention_kernel_applies(attn, x, batch):  # decode steps, lazy K/V kept
        return sparse_backend.attention_gather(attn, x, layer_id, batch, idx)
    b, t, _ = x.shape
    d = attn.head_dim
    wq, bq = head_rows(attn.q_proj, idx, d)
    q = (F.linear(x, wq, bq) * attn.scaling).view(b, t, -1, d).transpose(1, 2)  # [B, h, T, D]
    if batch.cache is None:
        # Whole windows: every position's input is here, so the selected heads' K/V are
        # exact for the full prefix.
        k = F.linear(x, *head_rows(attn.k_proj, idx, d)).view(b, t, -1, d).transpose(1, 2)
        v = F.linear(x, *head_rows(attn.v_proj, idx, d)).view(b, t, -1, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    else:
        out = _gathered_cached_attention(attn, x, q, idx, layer_id, batch)
    out = out.transpose(1, 2).reshape(b, t, -1)  # [B, T, h*D]
    c = attn.out_proj.weight.shape[0]
    wo = attn.out_proj.weight.view(c, -1, d).index_select(1, idx).reshape(c, -1)
    return F.linear(out, wo, attn.out_proj.bias)


def _masked_attention(attn: OPTAttention, x: Tensor, layer_id: int, batch: Batch,
                      heads: Tensor) -> Tensor:
    """Mask mode is the dense op with unselected heads zeroed per token."""
    out = attn.head_outputs(x, layer_id, batch)
    out = out * heads.transpose(1, 2)[..., None].to(out.dtype)  # [B, H, T, D] * [B, H, T, 1]
    return attn.merge_heads(out)


def _gathered_cached_attention(attn: OPTAttention, x: Tensor, q: Tensor, idx: Tensor,
                               layer_id: int, batch: Batch) -> Tensor:
    """Write the selected heads' K/V for this step, make every selected head's K/V exact
    for each row's whole prefix, and attend. q: [B, h, T, D]. Returns [B, h, T, D]."""
    cache, slots, pos = batch.cache, batch.slots, batch.positions
    assert cache is not None and slots is not None
    b, t, _ = x.shape
    d = attn.head_dim
    cache_k, cache_v = cache.layer(layer_id)  # [S, H, L, D]
    rows = slots[:, None].expand_as(pos)  # [B, T]
    if cache.inputs is None:
        # No stored inputs: K/V for every head, so that later steps find them.
        k = attn.k_proj(x).view(b, t, -1, d)
        v = attn.v_proj(x).view(b, t, -1, d)
        cache_k[rows, :, pos] = k.to(cache_k.dtype)
        cache_v[rows, :, pos] = v.to(cache_v.dtype)
    else:
        xs, valid = cache.layer_inputs(layer_id)  # [S, L, C], [S, H, L]
        xs[rows, pos] = x.to(xs.dtype)
        valid[rows, :, pos] = flag(False, valid)  # this position's other heads are now stale
        k = F.linear(x, *head_rows(attn.k_proj, idx, d)).view(b, t, -1, d)  # [B, T, h, D]
        v = F.linear(x, *head_rows(attn.v_proj, idx, d)).view(b, t, -1, d)
        r3, p3 = rows[..., None], pos[..., None]  # broadcast against idx: [B, T, h]
        cache_k[r3, idx, p3] = k.to(cache_k.dtype)
        cache_v[r3, idx, p3] = v.to(cache_v.dtype)
        valid[r3, idx, p3] = flag(True, valid)
        filled = complete_missing_kv(attn, cache_k, cache_v, xs, valid, idx, slots, pos,
                                     batch.attended_length())
        if batch.sparse is not None:
            batch.sparse.stats.layer(layer_id).add_kv(filled)
    length = batch.attended_length()
    keys = cache_k[slots[:, None], idx[None, :], :length]  # [B, h, L, D]
    values = cache_v[slots[:, None], idx[None, :], :length]
    visible = torch.arange(length, device=pos.device)[None, None, :] <= pos[:, :, None]
    return masked_attention(q, keys.to(q.dtype), values.to(q.dtype), visible[:, None])


def complete_kv(attn: OPTAttention, layer_id: int, batch: Batch) -> int:
    """Before a dense step on a cache that sparse steps also use: recompute every head's
    missing K/V over each row's prefix, so that dense attention reads exact values."""
    cache = batch.cache
    assert cache is not None and batch.slots is not None
    cache_k, cache_v = cache.layer(layer_id)
    xs, valid = cache.layer_inputs(layer_id)
    every = torch.arange(attn.num_heads, device=valid.device)
    return fill_missing_kv(attn, cache_k, cache_v, xs, valid, every, batch.slots,
                            batch.positions)
