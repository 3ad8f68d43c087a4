"""CUDA graphs for decode steps: one captured forward per padded batch size.

A decode step of a resident model is a few hundred small kernels, and at batch 1 their
launches cost more host time than the GPU spends reading the weights. ``DecodeGraphs``
captures the span's forward (embeddings on a first stage, then every layer) for one token
per row, once per batch bucket (1, 2, 4, ...), and replays it: the host then pays a few
small copies into the graph's input buffers and one launch.

What makes the forward capturable: every tensor it touches has a fixed address (weights,
the preallocated KV cache, the static input buffers) and no shape depends on the data.
Attention is the one place a shape would: the eager path gathers each row's cached prefix
up to the step's longest one. Under capture (``Batch.fixed_shape``) attention instead runs
the decode kernel (kernels/sparse_attention.py) over every head, which reads each row's
prefix in place up to the row's own position, taken from a device tensor.

Sparse steps are captured too when the selector keeps every head (the shipped default)
and says so (``keeps_every_head``, which the predictor and random selectors have):
predictors and top-k or thresholds run in the graph, the batch's union of neurons is
compacted on the device and the sparse MLP kernel reads its count there
(``selected_mlp(device_only=True)``, which ``Batch.fixed_shape`` asks for). A selector with
a ``compact`` method (the predictors selecting by threshold) skips the masks: one fused
kernel scores the layer's neurons and writes the live rows' union to the front of an index
buffer, and the MLP kernel reads that. It reads the LayerNorm output the model computes for
an MLP block anyway: for a layer whose predictor reads its own MLP input ("mlp_in"), that
layer's own (``select_mlp``, after attention); for a "lookahead" layer, the previous
layer's. Two things
differ from the eager sparse path, both documented where they are: a union above
``dense_above`` is not switched to the dense MLP (that decision reads the device), and
the per-layer predictor time is not measured. Densities are: the graph leaves each
layer's union size in a device buffer the stage folds into its statistics after the
replay. A selector that skips heads is not captured (lazy K/V recomputation reads the
device); its steps stay eager. A random selector's draws advance in the graph (its
generators are registered with it), but capture's warm-up draws too, so a captured
random baseline does not repeat an eager run's selections.

Rows beyond the step's batch (padding up to the bucket) repeat the first row: they write
the same keys and values at the same place, so they change nothing there. Their selections
are masked out by a live-row buffer before the union: a selector whose draws do not follow
its input (random baselines) would otherwise widen the union the real rows read.

On the last stage the graph goes on to the logits of each row's token and the penalties
(runtime/penalties.py): it counts the fed tokens in the per-slot counts and writes both the
raw and the penalized logits to output buffers. Warm-up runs with zero counting weights, so
capturing a step counts its tokens once, in the replay that follows.

Used only where all of this holds: CUDA, float16 or bfloat16, no offloaded layers, one new
token per row without prompt scoring. Any other step runs eagerly, unchanged.

What this module does not know: the random draw (the stage makes it on the host from the
graph's logits) or where steps come from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from .model import Batch, KVCache, OPTDecoderLayer, OPTModel, to_device
from .penalties import SlotPenalties
from .sparse import (
    NotCapturable,
    Selection,
    Selector,
    SparseContext,
    SparseStats,
    mlp_reads_own_input,
)
from .step import Step

log = logging.getLogger("dejavu.graphs")

DTYPES = (torch.float16, torch.bfloat16)


def bucket(n: int) -> int:
    """The padded batch size a step of ``n`` rows runs at: the next power of two."""
    return 1 << (n - 1).bit_length()


class CapturedSparse(SparseContext):
    """A ``SparseContext`` whose selections never read the device from the host: each
    layer's union size goes to its row of ``scratch`` (a device buffer, at the place
    kernels/select.py's fused selection leaves its count) instead of the stats.

    ``scratch`` [layers, W] int32 is zeroed once per step, one memset for every layer's
    kernels instead of two per layer: row i begins with layer i's fused selection scratch
    (its sums and its count, kernels/select.py; for a selector without one, just the count
    at the same place), then layer i's chained MLP workspace (kernels/mlp_chained.py). The
    price is memory and bytes zeroed: for OPT-13B's shape about 0.1 MB per layer and row
    of the bucket (at 16 rows, 66 MB over 40 layers)."""

    def __init__(self, selector: Selector, model: OPTModel, carry: Tensor | None,
                 live: Tensor, live_rows: Tensor) -> None:
        from ..kernels.mlp_chained import workspace_numel  # imports triton: on use
        from ..kernels.select import MAX_RANK, SCRATCH_COUNT, scratch_numel

        super().__init__(selector, mode="gather", carry=carry)
        self.index = {lid: i for i, lid in enumerate(model.layer_ids)}
        rows, device = live.shape[0], live.device
        self._count_at = SCRATCH_COUNT
        self._widths = torch.tensor([layer.fc1.out_features for layer in model.layers()],
                                    dtype=torch.float32, device=device)
        self._mlp_at = scratch_numel(rows, MAX_RANK)  # a multiple of 32: 128-byte aligned
        c = model.config
        width = self._mlp_at + workspace_numel(rows, c.hidden_size, c.ffn_dim)
        self.scratch = torch.zeros((len(self.index), width), dtype=torch.int32, device=device)
        self.initial_carry = carry
        self.live = live  # [R, 1, 1] bool: the step's real rows (the rest pad the bucket)
        self.live_rows = live_rows  # [1] int32: how many they are (they come first)
        # Per layer: its predictor input as the previous MLP block's LayerNorm left it.
        self._normed: dict[int, tuple[Tensor, torch.nn.LayerNorm]] = {}

    @property
    def union(self) -> Tensor:
        """[layers] float32 on the device: each layer's union density in the last step
        (outside a step only)."""
        return self.scratch[:, self._count_at].float() / self._widths

    def begin(self) -> None:
        """Reset the wiring and zero the scratch before a forward pass (warm-up runs it
        several times)."""
        self._sources.clear()
        self._normed.clear()
        self._carry = self.initial_carry
        self.carry_out = None
        self.scratch.zero_()

    def lookahead(self, layer_id: int, h: Tensor,
                  normed: tuple[Tensor, torch.nn.LayerNorm] | None = None) -> None:
        super().lookahead(layer_id, h)
        if normed is not None:
            self._normed[layer_id + 1] = normed

    def select(self, layer: OPTDecoderLayer, h: Tensor, batch: Batch) -> Selection:
        lid = layer.layer_id
        source = self.source(lid, h)
        normed = self._normed.pop(lid, None)  # the previous MLP block's LayerNorm output
        if mlp_reads_own_input(self.selector, lid):
            _every_head(lid, self.selector(lid, source))
            return Selection()  # the neurons come in select_mlp, from the layer's own input
        return self._neurons(layer, source, normed, lambda: self.selector(lid, source))

    def select_mlp(self, layer: OPTDecoderLayer, h: Tensor, batch: Batch, sel: Selection,
                   normed: tuple[Tensor, torch.nn.LayerNorm] | None = None) -> Selection:
        """An own-input layer's neurons from ``h``, the residual entering its MLP block;
        ``normed``: that block's LayerNorm output, which the fused selection reads."""
        lid = layer.layer_id
        if not mlp_reads_own_input(self.selector, lid):
            return sel
        return self._neurons(layer, h, normed, lambda: Selection(
            neurons=self.selector.select_neurons(lid, h)))  # type: ignore[attr-defined]

    def _neurons(self, layer: OPTDecoderLayer, x: Tensor,
                 normed: tuple[Tensor, torch.nn.LayerNorm] | None,
                 masks: Callable[[], Selection]) -> Selection:
        """The layer's neurons predicted from ``x`` [R, 1, C], the size of their union in
        the layer's row of ``scratch``. A selector that compacts its own union on the device
        (the predictors' fused kernel, reading ``normed`` where its LayerNorm folds in)
        skips the masks, counts only the live rows and writes its count there itself; else
        ``masks()``, padding rows masked out."""
        lid = layer.layer_id
        row = self.scratch[self.index[lid]]
        select, mlp = row[: self._mlp_at], row[self._mlp_at:]
        compact = getattr(self.selector, "compact", None)
        sel = None if compact is None else compact(lid, x, self.live_rows, normed,
                                                   scratch=select)
        if sel is not None:
            return replace(sel, mlp_workspace=mlp)
        slot = select[self._count_at: self._count_at + 1]
        sel = _every_head(lid, masks())
        if sel.neurons is None:
            slot.fill_(layer.fc1.out_features)
            return sel
        neurons = sel.neurons & self.live  # a padding row reads nothing
        slot.copy_(neurons.reshape(-1, neurons.shape[-1]).any(0).sum())
        return Selection(neurons=neurons, mlp_workspace=mlp)


def _every_head(lid: int, sel: Selection) -> Selection:
    if sel.heads is not None:
        raise NotCapturable(f"layer {lid} selects heads: lazy K/V recomputation reads "
                            "the device")
    return sel


class _Captured:
    """One graph: static inputs, the captured forward, its outputs."""

    def __init__(self, model: OPTModel, cache: KVCache, selector: Selector | None, rows: int,
                 device: torch.device, dtype: torch.dtype,
                 penalties: SlotPenalties | None = None) -> None:
        self.model, self.cache, self.penalties = model, cache, penalties
        c = model.config.hidden_size
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.hidden = torch.zeros((rows, 1, c), dtype=dtype, device=device)
        self.carry = torch.zeros((rows, 1, c), dtype=dtype, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        # Last stage: whether each row's token counts as a prompt / output token (0 or 1).
        self.weights = torch.zeros((2, rows, 1), dtype=torch.float32, device=device)
        self.live = torch.zeros((rows, 1, 1), dtype=torch.bool, device=device)
        self.live_rows = torch.zeros(1, dtype=torch.int32, device=device)
        self.sparse = None
        if selector is not None:
            carry = None if model.is_first else self.carry
            self.sparse = CapturedSparse(selector, model, carry, self.live, self.live_rows)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None
        self.carry_out: Tensor | None = None
        self.logits: Tensor | None = None  # [R, V] float32, last stage
        self.penalized: Tensor | None = None

    def _forward(self) -> Tensor:
        out = self._layers()
        if self.penalties is not None:
            self.penalties.record(self.slots, self.ids, self.weights[0], self.weights[1])
            self.logits = self.model.logits(out[:, -1]).float()
            self.penalized = self.penalties.apply(self.logits, self.slots)
        return out

    def _layers(self) -> Tensor:
        batch = Batch(self.positions, self.slots, self.cache, self.sparse, fixed_shape=True)
        h = self.model.embed(self.ids, self.positions) if self.model.is_first else self.hidden
        if self.sparse is None:
            return self.model.run_layers(h, batch)
        self.sparse.begin()
        out = self.model.run_layers(h, batch)  # fixed_shape: the sparse MLP stays on device
        self.carry_out = self.sparse.carry_out
        return out

    def capture(self) -> None:
        """Warm up on a side stream (kernel compilation, cuBLAS workspaces, the kernels'
        weight tables), then capture. The inputs must already hold a real step: warm-up
        writes its keys and values, exactly what running that step writes."""
        weights = self.weights.clone()
        self.weights.zero_()  # warm-up must not count this step's tokens: the replay does
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.weights.copy_(weights)
        graph = torch.cuda.CUDAGraph()
        # A selector's own CUDA generators (random baselines) advance inside the graph.
        for generator in getattr(getattr(self.sparse, "selector", None), "generators",
                                 {}).values():
            if generator.device.type == "cuda":
                graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self.out = self._forward()
        self.graph = graph

    def replay(self) -> Tensor:
        assert self.graph is not None and self.out is not None
        self.graph.replay()
        return self.out


class DecodeGraphs:
    def __init__(self, model: OPTModel, cache: KVCache, selector: Selector | None = None,
                 stats: SparseStats | None = None, penalties: SlotPenalties | None = None
                 ) -> None:
        self.model, self.cache, self.selector, self.penalties = model, cache, selector, penalties
        self.stats = stats if stats is not None else SparseStats()
        self.graphs: dict[int, _Captured] = {}
        self._enabled: bool | None = None  # decided at the first step: the model is final
        self.carry_out: Tensor | None = None
        # Last stage: the replayed step's (raw, penalized) logits [n, V].
        self.logits: tuple[Tensor, Tensor] | None = None

    @property
    def enabled(self) -> bool:
        if self._enabled is None:
            params = list(self.model.parameters())
            live = [p for p in params if not p.is_meta]
            # A selector is captured only when it says it never skips a head: one that
            # does would be found out only by running it, and a stateful selector (random
            # draws) must not be run by an attempt that then falls back to eager.
            sparse_ok = self.selector is None or getattr(self.selector, "keeps_every_head",
                                                         False)
            self._enabled = (bool(live) and live[0].device.type == "cuda"
                             and live[0].dtype in DTYPES and len(live) == len(params)
                             and (self.cache.inputs is None or self.selector is not None)
                             and sparse_ok)
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value

    def accepts(self, step: Step) -> bool:
        return (self.enabled and len(step.rows) <= self.cache.slots
                and all(len(r.tokens) == 1 and not r.score for r in step.rows))

    @torch.inference_mode()
    def forward(self, step: Step, hidden: Tensor | None, carry: Tensor | None = None,
                weights: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
        """This span's output hidden [B, 1, C] for a decode step, or None when this step
        cannot be captured (it then runs eagerly; graphs stay off from then on).
        ``weights``: the (prompt, output) counting weights [B, 1] of SlotPenalties.plan."""
        n = len(step.rows)
        rows = min(bucket(n), self.cache.slots)
        param = next(self.model.parameters())
        device, dtype = param.device, param.dtype
        g = self.graphs.get(rows)
        fresh = g is None
        if g is None:
            g = _Captured(self.model, self.cache, self.selector, rows, device, dtype,
                          self.penalties if self.model.is_last else None)
        self.load(g, step, hidden, carry, weights)
        if fresh:
            try:
                g.capture()
            except NotCapturable as exc:
                log.info("decode steps stay eager: %s", exc)
                self.enabled = False
                return None
            except RuntimeError as exc:  # e.g. an op that cannot be captured: run eagerly
                log.warning("CUDA graph capture failed, decode steps stay eager: %s", exc,
                            exc_info=True)
                self.enabled = False
                return None
            self.graphs[rows] = g
        out = g.replay()[:n].clone()
        self.carry_out = None if g.carry_out is None else g.carry_out[:n].clone()
        self.logits = None if g.logits is None else (g.logits[:n].clone(),
                                                     g.penalized[:n].clone())
        if g.sparse is not None:
            self._fold_stats(g.sparse, n)
        return out

    def load(self, g: _Captured, step: Step, hidden: Tensor | None, carry: Tensor | None,
             weights: tuple[Tensor, Tensor] | None) -> None:
        """Copy a step into ``g``'s static inputs; rows past the step's pad the bucket by
        repeating row 0 and are marked not live."""
        n, rows = len(step.rows), g.ids.shape[0]
        order = list(range(n)) + [0] * (rows - n)
        device, dtype = g.hidden.device, g.hidden.dtype
        prompt_w = output_w = [0] * n
        if weights is not None:
            prompt_w, output_w = (w[:, 0].long().tolist() for w in weights)
        # Padding rows count nothing: they repeat row 0, whose token is counted once.
        host = torch.tensor([[step.rows[i].slot, step.rows[i].start, step.rows[i].tokens[0],
                              prompt_w[i] if k < n else 0, output_w[i] if k < n else 0,
                              int(k < n)]
                             for k, i in enumerate(order)], dtype=torch.long)
        host = to_device(host, device)
        g.slots.copy_(host[:, 0])
        g.positions.copy_(host[:, 1:2])
        g.ids.copy_(host[:, 2:3])  # the last stage counts them (a first stage embeds them)
        g.weights.copy_(host[:, 3:5].T.unsqueeze(-1))
        g.live.copy_(host[:, 5, None, None].bool())
        g.live_rows.fill_(n)
        if not self.model.is_first:
            if hidden is None:
                raise ValueError("a stage without the embeddings needs the previous hidden state")
            _fill(g.hidden, hidden.to(device, dtype), n)
        if g.sparse is not None and g.sparse.initial_carry is not None:
            if carry is None:
                raise NotCapturable("no predictor input from the previous stage")
            _fill(g.carry, carry.to(device, dtype), n)

    def _fold_stats(self, sparse: CapturedSparse, tokens: int) -> None:
        """The replay's union densities into the stage's statistics (one small read)."""
        for lid, density in zip(self.model.layer_ids, sparse.union.tolist(), strict=True):
            s = self.stats.layer(lid)
            s.tokens += tokens
            s.mlp_computed += tokens * density
            s.heads_computed += tokens  # captured steps keep every head


def _fill(buffer: Tensor, value: Tensor, n: int) -> None:
    """Rows [0, n) of ``buffer`` [R, 1, C] from ``value`` [n, 1, C]; the rest repeat row 0."""
    buffer[:n].copy_(value[:, :1])
    if n < buffer.shape[0]:
        buffer[n:].copy_(value[:1, :1].expand(buffer.shape[0] - n, -1, -1))
