"""One OPT decoder definition for every variant, every backend and every pipeline stage.

Parameter names are Hugging Face's with the leading ``model.`` removed
(``decoder.layers.3.fc1.weight``), so a checkpoint maps onto the module without a table.
A module may hold only a span of layers: the first stage owns the embeddings, the last one
the final norm and the LM head; ``OPTModel(config, layers=range(a, b))`` builds just that.

What this module does not know: where weights come from (``checkpoint``), how requests are
batched (``scheduler``), or which rows are skipped (sparse execution passes a selection
down to the ops, it does not copy this file).

Shapes: B batch rows, T tokens per row, C hidden size, H heads, D head dim, F ffn dim,
S cache slots, L cached positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sparse_backend
from .attention import decode_attention_in_place, gathered_attention, prefix_attention
from .cpu_ops import GreedyHead, fuse_projections, greedy_screen_applies, is_fused, tensor_key
from .lazy_kv import flag
from .opt_config import POSITION_OFFSET, OPTConfig
from .sparse import complete_kv, selected_attention, selected_mlp

if TYPE_CHECKING:
    from .sparse import Selection, SparseContext


class KVCache:
    """Preallocated keys and values for a span of layers.

    ``k[i]``/``v[i]`` hold layer ``layer_ids[i]`` as [S, H, L, D]: one slot per sequence in
    flight, positions along L. A sequence owns its slot from admission to completion; its
    position p lives at index p, so nothing is ever moved or compacted.
    """

    def __init__(self, config: OPTConfig, layer_ids: list[int], slots: int, max_len: int,
                 *, dtype: torch.dtype, device: torch.device | str,
                 keep_inputs: bool = False) -> None:
        if max_len > config.max_position_embeddings:
            raise ValueError(
                f"cache length {max_len} exceeds the model's {config.max_position_embeddings} "
                "positions"
            )
        shape = (len(layer_ids), slots, config.num_attention_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.index = {layer: i for i, layer in enumerate(layer_ids)}
        self.slots = slots
        self.max_len = max_len
        # Sparse attention (runtime/sparse.py) skips heads; with keep_inputs it stores each
        # position's attention input [n, S, L, C] and which heads' K/V are written [n, S, H, L]
        # so that a head selected later gets its missing K/V recomputed exactly.
        self.inputs: Tensor | None = None
        self.kv_valid: Tensor | None = None
        if keep_inputs:
            self.inputs = torch.zeros(shape[:2] + shape[3:4] + (config.hidden_size,),
                                      dtype=dtype, device=device)
            self.kv_valid = torch.zeros(shape[:4], dtype=torch.bool, device=device)

    def layer(self, layer_id: int) -> tuple[Tensor, Tensor]:
        i = self.index[layer_id]
        return self.k[i], self.v[i]

    def layer_inputs(self, layer_id: int) -> tuple[Tensor, Tensor]:
        """Stored attention inputs [S, L, C] and K/V-valid bits [S, H, L] (keep_inputs)."""
        assert self.inputs is not None and self.kv_valid is not None
        i = self.index[layer_id]
        return self.inputs[i], self.kv_valid[i]

    def lazy_inputs(self, layer_id: int) -> tuple[Tensor | None, Tensor | None]:
        """``layer_inputs``, or (None, None) for a cache without them: its steps keep every
        head, so no K/V is ever missing and no step records inputs or validity."""
        return self.layer_inputs(layer_id) if self.inputs is not None else (None, None)

    def store_inputs(self, layer_id: int, batch: Batch, x: Tensor) -> None:
        """A step that writes K/V for every head: keep its inputs, mark all heads valid."""
        xs, valid = self.layer_inputs(layer_id)
        assert batch.slots is not None
        rows = batch.slots[:, None].expand_as(batch.positions)
        xs[rows, batch.positions] = x.to(xs.dtype)
        valid[rows, :, batch.positions] = flag(True, valid)  # a device scalar (lazy_kv.flag)

    def nbytes(self) -> int:
        extra = 0 if self.inputs is None else self.inputs.numel() * self.inputs.element_size()
        return 2 * self.k.numel() * self.k.element_size() + extra


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor ``t`` on ``device`` without waiting for it: a copy from pageable host
    memory into a GPU waits for the stream (everything queued before it, a previous step
    still running included); one from pinned memory does not, and the caching host
    allocator keeps the pinned block until the copy has run."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class Batch:
    """Where the rows of one forward pass sit: positions [B, T] (0-based, as the sequence
    sees them) and, with a cache, the slot [B] of each row. Without a cache the rows must
    be whole windows starting at position 0 (training, scoring)."""

    positions: Tensor
    slots: Tensor | None = None
    cache: KVCache | None = None
    # Set for a sparse forward pass: predictor wiring, selections, statistics.
    sparse: SparseContext | None = None
    # Cached positions this step attends over (max position + 1). The caller knows it on
    # the host; left None it is read from ``positions``, a device sync per layer.
    length: int | None = None
    # Under CUDA-graph capture (runtime/graphs.py): one token per row, and nothing may
    # depend on the data's values on the host, so attention reads the cache in place.
    fixed_shape: bool = False
    _rows: tuple[list[int], list[int]] | None = field(default=None, repr=False)

    def attended_length(self) -> int:
        if self.length is None:
            self.length = int(self.positions.max()) + 1
        return self.length

    def rows_on_host(self) -> tuple[list[int], list[int]]:
        """Each row's slot and attended length (its last position + 1) as host ints, read
        once per step (a host copy; CPU attention reads each row's prefix in place)."""
        if self._rows is None:
            assert self.slots is not None
            self._rows = (self.slots.tolist(), (self.positions.max(1).values + 1).tolist())
        return self._rows


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        c, bias = config.hidden_size, config.enable_bias
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(c, c, bias=bias)
        self.k_proj = nn.Linear(c, c, bias=bias)
        self.v_proj = nn.Linear(c, c, bias=bias)
        self.out_proj = nn.Linear(c, c, bias=bias)
        # Owned for the sparse ops (runtime/sparse_backend.py): who computes the selected
        # rows ("torch" | "triton"; None: "auto" from the weights), the kernels' weight table
        # (key of its source parameters, table), and, for a layer held in host memory
        # (runtime/offload.py), the ops over its records.
        self.sparse_backend: str | None = None
        self.kernel_table: tuple | None = None
        self.offloaded = None
        # q/k/v stored side by side and their product taken at once (project_qkv on a CPU,
        # decode_step everywhere).
        self._fused_qkv: tuple[Tensor, Tensor | None] | None = None
        self._every_head: Tensor | None = None  # arange(H) on the weights' device

    def _split(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, H, T, D]
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, layer_id: int, batch: Batch,
                heads: Tensor | None = None) -> Tensor:
        if heads is not None:  # [B, T, H] bool: only these heads (runtime/sparse.py)
            assert batch.sparse is not None
            return selected_attention(self, x, layer_id, batch, heads, batch.sparse.gather(batch))
        if batch.fixed_shape and batch.cache is not None and batch.cache.inputs is None:
            stacked = self.stacked_qkv()
            if stacked is not None:
                return self.decode_step(x, layer_id, batch, *stacked)
        return self.merge_heads(self.head_outputs(x, layer_id, batch))

    def merge_heads(self, out: Tensor) -> Tensor:
        """Per-head outputs [B, H, T, D] -> out_proj over their concatenation [B, T, C]."""
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, C] -> q (scaled), k, v [B, T, C]. The reference is three products; on a
        CPU, for frozen weights (a model in training keeps its parameter objects: an
        optimizer holds them), resident and not on the Triton backend (whose tables own the
        layout), one product over q/k/v stored side by side (cpu_ops.fuse_projections)."""
        projections = [self.q_proj, self.k_proj, self.v_proj]
        if x.device.type == "cpu" and not self.q_proj.weight.requires_grad \
                and not sparse_backend.is_offloaded(self) \
                and sparse_backend.backend_of(self) != "triton":
            if self._fused_qkv is None or not is_fused(projections, *self._fused_qkv):
                self._fused_qkv = fuse_projections(projections)
            if self._fused_qkv is not None:
                q, k, v = F.linear(x, *self._fused_qkv).split(self.q_proj.out_features, -1)
                return q * self.scaling, k, v
        return self.q_proj(x) * self.scaling, self.k_proj(x), self.v_proj(x)

    def stacked_qkv(self) -> tuple[Tensor, Tensor | None] | None:
        """The q, k, v weights as one [3C, C] (biases [3C] or None), the parameters views
        of it, so one product computes all three: the Triton backend's head table (its
        [3, H, D, C] is that), else ``cpu_ops.fuse_projections``' table. None where the
        three stay apart: a model in training, an offloaded layer, mixed biases."""
        if self.q_proj.weight.requires_grad or sparse_backend.is_offloaded(self):
            return None
        c = self.q_proj.in_features
        if sparse_backend.backend_of(self) == "triton":
            table = sparse_backend.head_table(self)
            bias = table.bqkv.view(3 * c) if self.q_proj.bias is not None else None
            return table.wqkv.view(3 * c, c), bias
        projections = [self.q_proj, self.k_proj, self.v_proj]
        if self._fused_qkv is None or not is_fused(projections, *self._fused_qkv):
            self._fused_qkv = fuse_projections(projections)
        return self._fused_qkv

    def decode_step(self, x: Tensor, layer_id: int, batch: Batch, wqkv: Tensor,
                    bqkv: Tensor | None) -> Tensor:
        """A captured decode step's attention (``Batch.fixed_shape``: one token per row,
        every head, a cache without stored inputs), doing only what it must: one product
        for q, k and v (``stacked_qkv``), the decode kernel writing k and v into the cache
        and scaling q as it loads it. The same function as ``merge_heads(head_outputs)``
        (tests compare them). x [B, 1, C] (post-LN) -> [B, 1, C] after out_proj."""
        from ..kernels.sparse_attention import decode_attention  # imports triton: on use

        assert batch.cache is not None and batch.slots is not None
        b = x.shape[0]
        qkv = F.linear(x[:, 0], wqkv, bqkv).view(b, 3, self.num_heads, self.head_dim)
        cache_k, cache_v = batch.cache.layer(layer_id)  # [S, H, L, D]
        if self._every_head is None or self._every_head.device != x.device:
            self._every_head = torch.arange(self.num_heads, device=x.device)
        out = decode_attention(qkv[:, 0], self._every_head, cache_k, cache_v, batch.slots,
                               batch.positions[:, 0], scale=self.scaling,
                               new_kv=(qkv[:, 1], qkv[:, 2]))  # [B, H, D]
        return self.out_proj(out.view(b, 1, -1))

    def head_outputs(self, x: Tensor, layer_id: int, batch: Batch) -> Tensor:
        """Every head's attention output [B, H, T, D] (before out_proj); with a cache, this
        step's keys/values are written into it first."""
        q, k, v = (self._split(t) for t in self.project_qkv(x))
        if batch.cache is None:
            # Whole windows from position 0: plain causal attention, the training path.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        if batch.cache.inputs is not None:  # a cache shared with sparse steps:
            batch.cache.store_inputs(layer_id, batch, x)  # keep what they recompute from
            if not batch.fixed_shape:  # (graphs run only where no head is ever skipped)
                complete_kv(self, layer_id, batch)  # and fill in heads they skipped
        return cached_attention(q, k, v, layer_id, batch)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, layer_id: int, batch: Batch) -> Tensor:
    """Write this step's keys/values into the cache, then attend over every cached position
    up to each query's own. q, k, v: [B, H, T, D] (q already scaled). Returns [B, H, T, D]."""
    assert batch.cache is not None and batch.slots is not None
    cache_k, cache_v = batch.cache.layer(layer_id)  # [S, H, L, D]
    pos = batch.positions  # [B, T]
    rows = batch.slots[:, None].expand_as(pos)
    # Advanced indices split by a slice put their dims first: the target is [B, T, H, D].
    cache_k[rows, :, pos] = k.transpose(1, 2).to(cache_k.dtype)
    cache_v[rows, :, pos] = v.transpose(1, 2).to(cache_v.dtype)
    if batch.fixed_shape:
        return decode_attention_in_place(q, cache_k, cache_v, batch.slots, pos)
    if q.device.type == "cpu":
        slots, lengths = batch.rows_on_host()
        return prefix_attention(q, cache_k, cache_v, slots, lengths, pos)
    return gathered_attention(q, cache_k, cache_v, batch.slots, pos, batch.attended_length())


class OPTDecoderLayer(nn.Module):
    """Attention and MLP blocks, each with a residual; the norm goes before the block
    (pre-LN) or after the residual add (post-LN, opt-350m). Submodule names are HF's."""

    def __init__(self, config: OPTConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.pre_ln = config.do_layer_norm_before
        affine = config.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        # Owned for the sparse ops (runtime/sparse_backend.py): who computes the selected
        # rows ("torch" | "triton"; None: "auto" from the weights), the kernels' weight table
        # (key of its source parameters, table), and, for a layer held in host memory
        # (runtime/offload.py), the ops over its records.
        self.sparse_backend: str | None = None
        self.kernel_table: tuple | None = None
        self.offloaded = None
        # fc2 transposed, made on first use by a CPU sparse step (fc2_rows): not a parameter
        # or buffer, so checkpoints and dense runs never see it.
        self._fc2_rows: tuple[tuple, Tensor] | None = None

    def attention_block(self, h: Tensor, batch: Batch, heads: Tensor | None = None) -> Tensor:
        return self.attention_and_norm(h, batch, heads, norm=False)[0]

    def attention_and_norm(self, h: Tensor, batch: Batch, heads: Tensor | None = None,
                           norm: bool = True) -> tuple[Tensor, Tensor | None]:
        """The attention block's output and, for a pre-LN layer with ``norm``, that output
        through final_layer_norm (what the MLP block and its predictors read; else None). A
        captured step on the kernels adds the residual and normalizes in one launch
        (kernels/layer_norm.py; its twin is the add and the norm below)."""
        x = self.self_attn_layer_norm(h) if self.pre_ln else h
        out = self.self_attn(x, self.layer_id, batch, heads)
        if not self.pre_ln:
            return self.self_attn_layer_norm(h + out), None
        if not norm:
            return h + out, None
        ln = self.final_layer_norm
        if batch.fixed_shape and sparse_backend.backend_of(self) == "triton":
            from ..kernels.layer_norm import add_layer_norm  # imports triton: on use

            return add_layer_norm(h, out, ln.weight, ln.bias, ln.eps)
        h = h + out
        return h, ln(h)

    def mlp_block(self, h: Tensor, sel: Selection | None = None, gather: bool = False,
                  device_only: bool = False, normed: Tensor | None = None) -> Tensor:
        """``sel``: the layer's neurons (runtime/sparse.py), None or without neurons for the
        dense block; ``normed``: final_layer_norm(h) when the caller computed it already
        (pre-LN)."""
        x = normed if normed is not None else self.final_layer_norm(h) if self.pre_ln else h
        if sel is None or (sel.neurons is None and sel.neuron_count is None):
            h = h + self.fc2(F.relu(self.fc1(x)))
        else:  # masks [B, T, F], or a union compacted on the device (runtime/sparse.py),
            # which the kernel adds to the residual itself
            h = selected_mlp(self, x, sel.neurons, gather, sel.neuron_index,
                             device_only=device_only, count=sel.neuron_count, residual=h,
                             workspace=sel.mlp_workspace)
        return h if self.pre_ln else self.final_layer_norm(h)

    def fc2_rows(self) -> Tensor:
        """fc2.weight transposed and contiguous [F, C]: a neuron's fc2 column as one row,
        which the CPU sparse MLP (runtime/cpu_ops.py) reads whole. Made once, and again if
        fc2 is moved, cast or written to. Costs fc2's size in memory once a CPU sparse
        step has run (none when fc2 is already stored transposed)."""
        w = self.fc2.weight
        key = tensor_key(w)
        if self._fc2_rows is None or self._fc2_rows[0] != key:
            self._fc2_rows = (key, w.detach().t().contiguous())
        return self._fc2_rows[1]

    def forward(self, h: Tensor, batch: Batch) -> Tensor:
        if batch.sparse is None:
            h, x = self.attention_and_norm(h, batch)
            return self.mlp_block(h, normed=x)
        sel = batch.sparse.select(self, h, batch)
        h, x = self.attention_and_norm(h, batch, sel.heads)
        normed = None if x is None else (x, self.final_layer_norm)
        # h enters this MLP block: own-input MLP predictors read it first (an offloaded
        # layer's rows are then requested before the next layer's); it is also the next
        # layer's predictor input (wiring). x, normalized already, may serve either
        # predictor instead of a normalization of its own.
        sel = batch.sparse.select_mlp(self, h, batch, sel, normed)
        batch.sparse.lookahead(self.layer_id, h, normed)
        # A fixed-shape (CUDA-graph captured) step must not read the device from the host.
        return self.mlp_block(h, sel, batch.sparse.gather(batch), device_only=batch.fixed_shape,
                              normed=x)


class OPTModel(nn.Module):
    """The decoder (or a span of it) plus, on the last stage, the LM head."""

    def __init__(self, config: OPTConfig, layers: range | None = None) -> None:
        super().__init__()
        n = config.num_hidden_layers
        layers = range(n) if layers is None else layers
        if layers.step != 1 or not 0 <= layers.start < layers.stop <= n:
            raise ValueError(f"layer span {layers} is not a contiguous part of range(0, {n})")
        self.config = config
        self.layer_ids = list(layers)
        self.is_first = layers.start == 0
        self.is_last = layers.stop == n
        c, e = config.hidden_size, config.word_embed_proj_dim

        decoder = nn.Module()
        if self.is_first:
            decoder.embed_tokens = nn.Embedding(config.vocab_size, e)
            decoder.embed_positions = nn.Embedding(
                config.max_position_embeddings + POSITION_OFFSET, c
            )
            if config.has_projections:
                decoder.project_in = nn.Linear(e, c, bias=False)
        decoder.layers = nn.ModuleDict({str(i): OPTDecoderLayer(config, i) for i in layers})
        if self.is_last:
            if config.has_final_layer_norm:
                decoder.final_layer_norm = nn.LayerNorm(
                    c, elementwise_affine=config.layer_norm_elementwise_affine
                )
            if config.has_projections:
                decoder.project_out = nn.Linear(c, e, bias=False)
        self.decoder = decoder
        self._greedy_head: GreedyHead | None = None  # made on first use (greedy_tokens)
        if self.is_last:
            self.lm_head = nn.Linear(e, config.vocab_size, bias=False)
            if config.tie_word_embeddings and self.is_first:
                self.lm_head.weight = decoder.embed_tokens.weight

    # --- the three stages of a forward pass ------------------------------------------------

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """[B, T] token ids -> [B, T, C] residual stream."""
        d = self.decoder
        x = d.embed_tokens(input_ids)
        if self.config.has_projections:
            x = d.project_in(x)
        return x + d.embed_positions(positions + POSITION_OFFSET)

    def layers(self) -> list[OPTDecoderLayer]:
        return list(self.decoder.layers.values())

    def run_layers(self, h: Tensor, batch: Batch) -> Tensor:
        for layer in self.decoder.layers.values():
            h = layer(h, batch)
        return h

    def logits(self, h: Tensor) -> Tensor:
        """[..., C] residual stream -> [..., vocab] logits."""
        return self.lm_head(self.head_input(h))

    def head_input(self, h: Tensor) -> Tensor:
        """[..., C] residual stream -> [..., E], what the LM head multiplies."""
        d = self.decoder
        if self.config.has_final_layer_norm:
            h = d.final_layer_norm(h)
        if self.config.has_projections:
            h = d.project_out(h)
        return h

    def greedy_tokens(self, h: Tensor) -> Tensor:
        """[M, C] residual stream -> [M] int64: each row's most likely next token, the
        argmax of ``logits(h)`` (the reference). A float32 head on a CPU reads most of
        itself in bfloat16 instead, exactly (cpu_ops.GreedyHead): the head is the biggest
        single read of a small model's decode step (the shipped model: 32 of 116 MB)."""
        x = self.head_input(h)
        weight = self.lm_head.weight
        if not greedy_screen_applies(weight):
            return self.lm_head(x).argmax(-1)
        if self._greedy_head is None or not self._greedy_head.matches(weight):
            self._greedy_head = GreedyHead(weight)
        return self._greedy_head(weight, x)

    def forward(self, x: Tensor, batch: Batch) -> Tensor:
        """Token ids [B, T] on the first stage, else hidden [B, T, C]. Returns logits
        [B, T, vocab] on the last stage, else hidden [B, T, C]."""
        h = self.embed(x, batch.positions) if self.is_first else x
        h = self.run_layers(h, batch)
        return self.logits(h) if self.is_last else h

    # --- construction helpers --------------------------------------------------------------

    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """OPT's initialisation (normal(0, 0.02), zero biases, unit norms), for training and
        for random-weight benchmarks."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.normal_(0.0, std, generator=generator)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def full_positions(batch_size: int, length: int, device: torch.device | str) -> Tensor:
    """Positions 0..length-1 for every row: whole windows, no cache."""
    return torch.arange(length, device=device).expand(batch_size, length)
