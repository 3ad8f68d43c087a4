"""Layers that do not fit the GPU budget: held in (pinned) host records and run through the
kernels' host-row path, inside the one model.

``plan_offload`` picks the layers that exceed a ``gpu_memory_gib`` budget (as many layers as
fit stay whole on the GPU, spread over the depth between the offloaded ones, the rest go to
the host). ``offload_layers`` packs each of them into
runtime/weight_store.py's records (one contiguous record per neuron and per head), keeps
them behind a ``ResidentLayer`` (an optional cache of hot rows on the GPU, every other row
read in place from mapped pinned memory), drops the module's big weights (they become
meta tensors: any path that still read them would fail loudly, not silently compute) and
registers the layer with runtime/sparse_backend.py, so that the model's sparse ops take
its rows from there. Norms and the out_proj/fc2 biases stay on the module.

Every token of an offloaded layer is sparse: ``OffloadSelector`` turns "dense" (no mask)
into "every row" for those layers, since their dense weights are gone. Decode steps (one
token per batch row, at most ``MAX_BATCH`` rows) run the kernels, which read the selected
rows in place. Multi-token steps (prefill chunks) bring each offloaded layer to the device
once per chunk instead, through a double buffer whose next copy overlaps this layer's
compute (runtime/row_stream.py), and run ordinary torch math over it; a budget keeps room
for that buffer (``plan_streaming``) or, too small for it, prefills token by token.

K/V stay exact as in runtime/sparse.py: each step stores its attention input and marks
its position stale for every head; the selected heads' K/V are written by the projection
kernel (a streamed prefill writes every head's), and a selected head missing at earlier
positions is recomputed from the stored inputs by the same kernel over the host rows.

A worker or the in-process engine with a ``gpu_memory_gib`` budget loads its span on the
CPU, calls ``fit_budget``, wraps its selector with ``offload_selector`` (a dense run gets
one that keeps resident layers dense) and logs ``budget_report``: the expected GPU bytes and
host bytes read per token. ``host_bytes_read`` counts what the offloaded layers actually
read from host records (whole records: a head's K/V recompute counts its record too).

The budget left after the whole layers (``cache_placements``) becomes row caches on the GPU
for the offloaded layers, less a safety margin (``CACHE_MARGIN``): without frequencies,
dynamic slots shared evenly (neurons and heads in the proportion of their bytes), filled
after each step with the rows it read from the host (a second host read of those rows,
counted by ``host_bytes_read``), least recently used evicted; with a
``LayerFrequencies`` per offloaded layer, weight_store.plan_placement's static hot rows plus
``DYNAMIC_FRACTION`` of dynamic neuron slots. The report's host bytes per token count the
static rows only (the dynamic ones depend on the text): an upper bound.

What this module does not know: which rows are selected (selectors) or how frequencies are
measured (train-predictors writes them; ``fit_gib`` reads them through
runtime/placement_stats.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..kernels.sparse_attention import decode_attention, out_projection, qkv_projection
from ..kernels.sparse_mlp import MAX_BATCH, sparse_mlp
from . import lazy_kv, row_stream, sparse_backend
from .model import Batch, OPTAttention, OPTModel
from .placement_stats import find_frequencies, read_frequencies
from .row_stream import RowStream
from .sizes import offload_reserved_bytes, stream_buffer_bytes
from .sizes import size as human_size
from .sparse import Selection, mlp_reads_own_input, union_index
from .weight_store import (
    LayerFrequencies,
    LayerPlacement,
    PlacementError,
    RecordLayout,
    ResidentLayer,
    gib,
    head_rows,
    host_layer_from_module,
    neuron_rows,
    plan_placement,
    uniform_placement,
)

log = logging.getLogger("dejavu.offload")

# The weights that move to the host records (norms and out_proj/fc2 biases stay).
BIG = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
       "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
       "self_attn.out_proj.weight", "fc1.weight", "fc1.bias", "fc2.weight")


# Part of the budget left after whole layers that row caches leave unused: allocator
# rounding, the location maps, what the estimates miss.
CACHE_MARGIN = 1 / 16
# With frequencies: the part of the caches that follows recent tokens instead of holding
# the measured hot rows (design.md: hot rows "plus a dynamic part").
DYNAMIC_FRACTION = 0.25



def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def plan_offload(model: OPTModel, budget_bytes: int, reserved_bytes: int = 0) -> list[int]:
    """Layer ids to hold on the host: the model's other weights and ``reserved_bytes`` (KV
    cache, activations) come first, then as many whole layers as fit, counted in order and
    then spread evenly over the depth (``spread_resident``): a decode step's host time on a
    resident layer then passes while the link still carries the offloaded layer before it,
    where resident layers first left the link idle at the start of every step."""
    layers = model.layers()
    layer_params = {id(p) for layer in layers for p in layer.parameters()}
    left = budget_bytes - reserved_bytes - _nbytes(
        p for p in model.parameters() if id(p) not in layer_params)
    if left < 0:
        raise PlacementError(
            f"gpu_memory_gib: {human_size(budget_bytes)} does not hold the embeddings / LM "
            f"head and the reserve for KV cache and activations (together "
            f"{human_size(budget_bytes - left)}); raise it")
    sizes = [_nbytes(layer.parameters()) for layer in layers]
    kept = 0
    while kept < len(layers) and sizes[kept] <= left:
        left -= sizes[kept]
        kept += 1
    if kept in (0, len(layers)):
        return [layer.layer_id for layer in layers[kept:]]
    resident = spread_resident(len(layers), kept)
    if sum(sizes[i] for i in resident) != sum(sizes[:kept]):  # unequal layers: keep the first
        resident = list(range(kept))
    kept_at = set(resident)
    return [layer.layer_id for i, layer in enumerate(layers) if i not in kept_at]


def spread_resident(n: int, kept: int) -> list[int]:
    """Positions (of ``n`` layers) of the ``kept`` resident ones, one in the middle (the
    lower middle, inside it) of each of ``kept`` equal stretches: 40 layers, 11 kept -> 1,
    4, 8, 12, ..., 37."""
    return [max(-(-i * n // kept), ((2 * i + 1) * n - kept) // (2 * kept))
            for i in range(kept)]


def plan_streaming(model: OPTModel, budget_bytes: int,
                   reserved_bytes: int = 0) -> tuple[list[int], bool]:
    """``plan_offload`` for a model whose prefill streams offloaded layers: once anything
    is offloaded the budget also holds the double buffer (``stream_bytes``), which may push
    more layers out. Returns (offloaded layer ids, whether the buffer fits): a budget that
    cannot hold it even with every layer offloaded runs prefill token by token instead
    (correct, slow; fit_budget logs it). scheduler/planner.py's ``offloaded_layers``
    computes the same count."""
    out = plan_offload(model, budget_bytes, reserved_bytes)
    if not out:
        return out, False
    try:
        return plan_offload(model, budget_bytes, reserved_bytes + stream_bytes(model)), True
    except PlacementError:
        return out, False


def stream_bytes(model: OPTModel) -> int:
    """Device bytes of the double buffer that multi-token steps stream offloaded layers
    through (row_stream.RowStream: two layers' records)."""
    return stream_buffer_bytes(model.config, next(model.parameters()).element_size())


class OffloadedLayer:
    """One layer's rows in host records (+ hot rows on the GPU), and the sparse ops over
    them, called by runtime/sparse_backend.py."""

    def __init__(self, rows: ResidentLayer, fc2_bias: Tensor | None,
                 out_proj_bias: Tensor | None, stream: RowStream | None = None,
                 slot: int = 0) -> None:
        self.rows = rows
        self.fc2_bias = fc2_bias
        self.out_proj_bias = out_proj_bias
        # Multi-token steps: the shared double buffer, this layer's slot in it, and the
        # next offloaded layer of the model (whose copy this layer's blocks start).
        self.stream = stream
        self.slot = slot
        self.next: OffloadedLayer | None = None
        # Decode MLP: gather the selected neurons to the device before the kernel (True, the
        # default: on an H100 a gather reads mapped host rows at 47.6 of the link's 55.2
        # GB/s, the kernels reading them in place at 25-34) or let the kernel read them in
        # place from mapped host memory (False; bench_e2e measures both).
        self.stage_neurons = True
        # Rows ``prefetch`` requested ahead: kind -> (the selection's mask, its union ids,
        # their device count when the union is padded).
        self._ahead: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
        # Host bytes read. With no GPU row cache every selected row is a host row and the
        # count needs no look at the locations (no device synchronisation per op).
        e = rows.host.neurons.element_size()
        self.neuron_bytes = rows.layout.neuron_len * e
        self.head_bytes = rows.layout.head_len * e
        self.all_host = rows.cache_neurons.shape[0] == 0 and rows.cache_heads.shape[0] == 0
        self.read = 0
        self._read_on_device: Tensor | None = None
        self._recomputed: Tensor | None = None  # K/V pairs staged decode completed
        # How many gathers ``prefetch`` started that their step then read, and how many it
        # could not (another selection came, or the slot was taken meanwhile).
        self.prefetch_used = 0
        self.prefetch_wasted = 0

    def _count(self, locs: Tensor, record_bytes: int) -> None:
        if self.all_host:
            self.read += locs.numel() * record_bytes
        else:
            n = (locs < 0).sum() * record_bytes
            self._read_on_device = n if self._read_on_device is None else \
                self._read_on_device + n

    def _count_on_device(self, count: Tensor, record_bytes: int) -> None:
        """Bytes of ``count`` ([1] int32 on the device) records, added on the device (one
        launch)."""
        if self._read_on_device is None:
            self._read_on_device = torch.zeros((), dtype=torch.int64, device=count.device)
        self._read_on_device.add_(count[0], alpha=record_bytes)

    def pads(self, kind: str, shape: torch.Size) -> bool:
        """Whether a step of hidden shape [B, T, C] takes this kind's ("heads" |
        "neurons") union padded, with its count on the device (runtime/sparse.py's
        ``padded_union``): decode steps whose rows are gathered to the device."""
        return shape[1] == 1 and shape[0] <= MAX_BATCH and self._staged_decode(kind)

    def host_bytes_read(self) -> int:
        extra = 0 if self._read_on_device is None else int(self._read_on_device)
        return self.read + extra

    def streams(self, x: Tensor) -> bool:
        """Whether a step of x [B, T, C] brings this layer to the device once (prefill
        chunks) instead of reading its rows per token through the decode kernels."""
        return self.stream is not None and (x.shape[1] > 1 or x.shape[0] > MAX_BATCH)

    def _bring(self, kind: str, ids: Tensor) -> tuple[Tensor, bool]:
        """This layer's ``kind`` ("neurons" | "heads") records for rows ``ids`` on the
        device: (buffer, whole). Whole: every row in id order; else the union's rows in
        the order of ``ids``. Starts the next offloaded layer's whole copy when this one's
        union was wide enough that a whole copy is the cheaper choice."""
        st = self.stream
        host = self.rows.host.neurons if kind == "neurons" else self.rows.host.heads
        wide = ids.numel() >= row_stream.UNION_BELOW * host.shape[0]
        whole = st.holds_whole(self, self.slot, kind) or wide
        if whole:
            self.read += st.prefetch_whole(self, self.slot, kind, host)
        else:
            view = self.rows.host_neurons if kind == "neurons" else self.rows.host_heads
            self.read += st.gather(self, self.slot, kind, view, ids)
        nxt = self.next
        if wide and nxt is not None and nxt.slot != self.slot:
            nhost = nxt.rows.host.neurons if kind == "neurons" else nxt.rows.host.heads
            nxt.read += st.prefetch_whole(nxt, nxt.slot, kind, nhost)
        return st.acquire(self.slot, kind), whole

    def _streamed_mlp(self, x: Tensor, idx: Tensor) -> Tensor:
        records, whole = self._bring("neurons", idx)
        if not whole:  # the union's rows, gathered to the front
            records, idx = records[:idx.numel()], None
        elif idx.numel() == records.shape[0]:  # the union is every row
            idx = None
        out = row_stream.streamed_mlp(records, self.rows.layout.hidden, x, idx, self.fc2_bias)
        self.stream.release(self.slot, "neurons")
        return out

    def _streamed_attention(self, x: Tensor, layer_id: int, batch: Batch,
                            idx: Tensor) -> Tensor:
        cache = batch.cache
        cache_k, cache_v = cache.layer(layer_id)
        xs, valid = cache.lazy_inputs(layer_id)
        records, whole = self._bring("heads", idx)
        out, recomputed = row_stream.streamed_attention(
            records, self.rows.layout, x, idx, idx if whole else None, whole, cache_k, cache_v,
            xs, valid, batch.slots, batch.positions, batch.attended_length(),
            self.out_proj_bias)
        self.stream.release(self.slot, "heads")
        if batch.sparse is not None:  # kept on the device: reading it would wait for the layer
            batch.sparse.stats.layer(layer_id).add_kv(recomputed.reshape(1))
        return out

    def _staged_decode(self, kind: str) -> bool:
        """Whether decode steps gather this kind's selected rows to the device (a stream
        buffer and no GPU row cache of that kind, whose rows a gather would not use)."""
        if self.stream is None:
            return False
        if kind == "heads":
            return self.rows.cache_heads.shape[0] == 0
        return self.stage_neurons and self.rows.cache_neurons.shape[0] == 0

    def prefetch(self, selection: Selection) -> None:
        """Start reading the rows of a decode step's ``selection`` (masks [B, 1, n]; the
        batch's union of heads and of neurons) into this layer's slot of the stream buffer
        on the copy stream, so that they cross the link while the GPU runs the work issued
        before. The layer's next decode ops over this selection (the same mask and index
        tensors: ``head_index``/``neuron_index``, else the union found here) read them from
        there; any other selection is gathered when it is needed. When every head is
        selected, the next offloaded layer's whole head block is copied right behind (a
        whole block serves any selection of that layer). Multi-token selections, and kinds
        with GPU row caches, are left to the ops. A kind the selection lacks (None) is not
        read: a layer whose neurons are predicted from its own MLP input asks for its heads
        first and its neurons once they are known (``SparseContext.select_mlp``)."""
        heads, neurons = selection.heads, selection.neurons
        shown = heads if heads is not None else neurons
        if shown is None or shown.shape[1] != 1 or shown.shape[0] > MAX_BATCH:
            return
        st = self.stream
        if heads is not None and self._staged_decode("heads"):
            hidx = selection.head_index if selection.head_index is not None \
                else union_index(heads)
            hcount = selection.head_count
            # (Asked already when a selection sent ahead is then accounted: same tensors.)
            if not self._requested("heads", hidx):
                if not st.holds_whole(self, self.slot, "heads"):
                    self._gather_ahead("heads", self.rows.host_heads, hidx, hcount)
                self._remember("heads", heads, hidx, hcount)
                nxt = self.next
                # Every head selected, as far as the host knows without reading the device
                # (a padded union always has every id: its count is on the device).
                if hcount is None and hidx.numel() == self.rows.layout.heads and \
                        nxt is not None and nxt.slot != self.slot and \
                        nxt._staged_decode("heads"):
                    nxt.read += st.prefetch_whole(nxt, nxt.slot, "heads",
                                                  nxt.rows.host.heads)
        if neurons is not None and self._staged_decode("neurons"):
            nidx = selection.neuron_index if selection.neuron_index is not None \
                else union_index(neurons)
            ncount = selection.neuron_count
            if not self._requested("neurons", nidx):
                if not st.holds_whole(self, self.slot, "neurons"):
                    self._gather_ahead("neurons", self.rows.host_neurons, nidx, ncount)
                self._remember("neurons", neurons, nidx, ncount)

    def _gather_ahead(self, kind: str, view: Tensor, idx: Tensor,
                      count: Tensor | None) -> None:
        self._add_read(kind, count,
                       self.stream.gather_ahead(self, self.slot, kind, view, idx, count))

    def _gather(self, kind: str, view: Tensor, idx: Tensor, count: Tensor | None) -> None:
        """``_gather_ahead`` on the current stream, when the op needs the rows now."""
        self._add_read(kind, count, self.stream.gather(self, self.slot, kind, view, idx, count))

    def _add_read(self, kind: str, count: Tensor | None, read: int) -> None:
        """Count a gather's host bytes: ``read`` as the host knows it, or, for a padded
        union, its device ``count`` of records (no host read)."""
        if count is None:
            self.read += read
        else:
            self._count_on_device(count, self.head_bytes if kind == "heads"
                                  else self.neuron_bytes)

    def known_union(self, heads: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """The union ``prefetch`` found for this head mask (the same tensor), if any, as
        (ids, device count or None): the attention op then needs no second read of the
        device."""
        got = self._ahead.get("heads")
        return (got[1], got[2]) if got is not None and got[0] is heads else None

    def _requested(self, kind: str, idx: Tensor) -> bool:
        got = self._ahead.get(kind)
        return got is not None and got[1] is idx

    def _remember(self, kind: str, mask: Tensor, idx: Tensor,
                  count: Tensor | None = None) -> None:
        if self._ahead.get(kind) is not None:
            self.prefetch_wasted += 1  # requested, never read: its step did not come
        self._ahead[kind] = (mask, idx, count)

    def _take(self, kind: str, idx: Tensor) -> bool:
        """Whether ``prefetch`` already brought rows ``idx`` (the same tensor) of ``kind``
        into this layer's slot and the slot still holds them (host-side tags, no device
        read); forgets the request either way and counts it used or wasted."""
        got = self._ahead.pop(kind, None)
        if got is None:
            return False
        if self.stream.holds_whole(self, self.slot, kind):
            self.prefetch_used += 1
            return True
        block = self.stream.slots[self.slot][kind]
        ok = got[1] is idx and block.owner is self and not block.whole and \
            block.rows == idx.numel()
        if ok:
            self.prefetch_used += 1
        else:
            self.prefetch_wasted += 1
        return ok

    def _staged_attention(self, x: Tensor, layer_id: int, batch: Batch, idx: Tensor,
                          count: Tensor | None = None) -> Tensor:
        """A decode step's attention (x [B, 1, C], B <= MAX_BATCH) with the selected heads'
        records on the device first: gathered into the stream buffer once (or the whole
        block, if a prefill left it there), so that the projection kernels and the K/V of
        heads skipped earlier (completed for every selected head at once, row_stream's
        ``complete_kv``) read them from device memory, never twice over the link. Nothing
        here reads the device from the host: the recomputed count stays on the device
        (``kv_recomputed``). ``count``: ``idx`` is a padded union (every head, the selected
        ones first; runtime/sparse.py's ``padded_union``): the kernels run over every entry,
        padding included, and its entries are masked out (not marked valid, not completed,
        their attention zeroed before out_proj): no host read of the union's size."""
        cache, slots, pos = batch.cache, batch.slots, batch.positions
        cache_k, cache_v = cache.layer(layer_id)
        xs, valid = cache.lazy_inputs(layer_id)  # None: every head, every step (no lazy K/V)
        st, layout = self.stream, self.rows.layout
        ahead = self._take("heads", idx)
        if st.holds_whole(self, self.slot, "heads"):
            rows = table_rows = idx
        else:
            if not ahead:
                self._gather("heads", self.rows.host_heads, idx, count)
            rows = sparse_backend.iota(idx.numel(), idx.device, torch.int32)
            table_rows = idx.numel()  # the buffer's first rows, in order: no index_select
        records = st.acquire(self.slot, "heads")
        table = head_rows(records, layout.hidden, layout.head_dim)
        heads, locs = idx.to(torch.int32), rows.to(torch.int32)
        p, x2 = pos[:, 0].contiguous(), x[:, 0].contiguous()
        r2 = slots[:, None]
        # Device values, not Python bools: a host value would be a copy into the step.
        live = None if count is None else sparse_backend.padding_live(idx, count)
        if xs is not None:
            xs[r2, pos] = x.to(xs.dtype)
            no = lazy_kv.flag(False, valid)
            valid[r2, :, pos] = no  # this position's other heads are now stale
        q = qkv_projection(x2, table, heads, locs, cache_k, cache_v, slots, p,
                           split_c=sparse_backend.ATTENTION_ARGS["qkv_split_c"])
        if xs is not None:
            valid[r2, idx[None, :], pos] = ~no if live is None else live
            n = row_stream.complete_kv(table, table_rows, idx, cache_k, cache_v, xs, valid,
                                       slots, pos, batch.attended_length(), live=live)
            self._recomputed = n if self._recomputed is None else self._recomputed + n
        a = decode_attention(q, heads, cache_k, cache_v, slots, p,
                             chunk=sparse_backend.ATTENTION_ARGS["chunk"])
        if live is not None:
            a = sparse_backend.zero_padding(a, live)
        out = out_projection(a, table, locs, bias=self.out_proj_bias)
        st.release(self.slot, "heads")
        return out[:, None, :]

    def kv_recomputed(self) -> int:
        """(position, head) K/V pairs staged decode steps completed (read from the device
        here, outside the steps)."""
        return 0 if self._recomputed is None else int(self._recomputed)

    def mlp(self, x: Tensor, idx: Tensor, count: Tensor | None = None) -> Tensor:
        """fc2(relu(fc1(x))) over neurons ``idx``; x [B, T, C], any number of rows.
        ``count``: [1] int32 on the device, the valid entries at the front of ``idx`` (a
        decode step's padded union, ``pads``)."""
        if self.streams(x):
            return self._streamed_mlp(x, idx)
        b, t, c = x.shape
        flat = x.reshape(b * t, c).contiguous()
        if self._staged_decode("neurons"):
            return self._staged_mlp(flat, idx, count).view(b, t, c)
        if count is not None:
            raise sparse_backend.BackendError(
                f"layer {self.rows.layer_id}: a padded union needs staged decode")
        resident, host = self.rows.neuron_tables
        locs = self.rows.neuron_locs(idx)
        out = [sparse_mlp(flat[i:i + MAX_BATCH], resident, locs, host=host,
                          bias2=self.fc2_bias, **sparse_backend.MLP_ARGS)
               for i in range(0, b * t, MAX_BATCH)]
        for _ in out:  # each launch reads the selected rows once
            self._count(locs, self.neuron_bytes)
        # Dynamic slots (if any) now hold this step's host rows; the copy reads them from
        # the host once more, which the count says.
        self.read += self.rows.admit(idx) * self.neuron_bytes
        return torch.cat(out).view(b, t, c)

    def _staged_mlp(self, flat: Tensor, idx: Tensor, count: Tensor | None = None) -> Tensor:
        """The decode MLP with the selected neurons' records gathered to the device first
        (one read of each over the link, by a copy kernel), then the sparse kernel over
        device memory (the default cold path; ``stage_neurons`` False reads them in place).
        Rows ``prefetch`` requested are not read again. ``count``: the kernel reads it on
        the device (entries of ``idx`` past it are padding)."""
        st = self.stream
        ahead = self._take("neurons", idx)
        if st.holds_whole(self, self.slot, "neurons"):  # a prefill left every row there
            records, locs = st.acquire(self.slot, "neurons"), idx.to(torch.int32)
        else:
            if not ahead:
                self._gather("neurons", self.rows.host_neurons, idx, count)
            records = st.acquire(self.slot, "neurons")[:idx.numel()]
            locs = sparse_backend.iota(idx.numel(), flat.device, torch.int32)
        table = neuron_rows(records, self.rows.layout.hidden)
        out = [sparse_mlp(flat[i:i + MAX_BATCH], table, locs, bias2=self.fc2_bias,
                          count=count, **sparse_backend.MLP_ARGS)
               for i in range(0, flat.shape[0], MAX_BATCH)]
        st.release(self.slot, "neurons")
        return torch.cat(out)

    def attention(self, attn: OPTAttention, x: Tensor, layer_id: int, batch: Batch,
                  idx: Tensor, count: Tensor | None = None) -> Tensor:
        """Attention of heads ``idx`` (the batch's union; ``count``: padded, as in ``mlp``),
        out_proj and its bias included; x [B, T, C] post-LN, one token at a time. Returns
        [B, T, C]."""
        cache, slots, pos = batch.cache, batch.slots, batch.positions
        if cache is None or slots is None:
            raise sparse_backend.BackendError(
                f"layer {layer_id} is offloaded: its attention needs a KV cache")
        if self.streams(x):
            return self._streamed_attention(x, layer_id, batch, idx)
        if self._staged_decode("heads"):
            return self._staged_attention(x, layer_id, batch, idx, count)
        if count is not None:
            raise sparse_backend.BackendError(
                f"layer {layer_id}: a padded union needs staged decode")
        # The reference decode path (no stream buffer, or GPU head caches, whose rows the
        # gather would not use): the kernels read host rows in place, per token, and heads
        # skipped earlier are completed one head at a time.
        cache_k, cache_v = cache.layer(layer_id)
        xs, valid = cache.lazy_inputs(layer_id)
        heads = idx.to(torch.int32)
        locs = self.rows.head_locs(idx)
        resident, host = self.rows.head_tables
        recomputed = 0
        out = torch.empty_like(x)
        for lo in range(0, x.shape[0], MAX_BATCH):
            rows = slice(lo, lo + MAX_BATCH)
            s = slots[rows]
            for t in range(x.shape[1]):
                p = pos[rows, t].contiguous()
                xt = x[rows, t].contiguous()
                if xs is not None:
                    xs[s, p] = xt.to(xs.dtype)
                    valid[s, :, p] = lazy_kv.flag(False, valid)  # other heads now stale
                q = qkv_projection(xt, resident, heads, locs, cache_k, cache_v, s, p, host=host,
                                   split_c=sparse_backend.ATTENTION_ARGS["qkv_split_c"])
                if xs is not None:
                    valid[s[:, None], idx[None, :], p[:, None]] = lazy_kv.flag(True, valid)
                    recomputed += self._fill_missing(cache_k, cache_v, xs, valid, idx, locs,
                                                     s, p)
                a = decode_attention(q, heads, cache_k, cache_v, s, p,
                                     chunk=sparse_backend.ATTENTION_ARGS["chunk"])
                out[rows, t] = out_projection(a, resident, locs, host=host,
                                              bias=self.out_proj_bias)
                self._count(locs, self.head_bytes)
        if batch.sparse is not None:
            batch.sparse.stats.layer(layer_id).kv_recomputed += recomputed
        # After the op, whose locations had to stay valid throughout; counted as in mlp.
        self.read += self.rows.admit_heads(idx) * self.head_bytes
        return out

    def _fill_missing(self, cache_k: Tensor, cache_v: Tensor, xs: Tensor, valid: Tensor,
                      idx: Tensor, locs: Tensor, slots: Tensor, pos: Tensor) -> int:
        """K/V of the selected heads at every position up to ``pos`` where they were
        skipped, recomputed from the stored inputs by the projection kernel (over the same
        host rows). Returns how many (position, head) pairs it computed."""
        length = int(pos.max()) + 1
        need = torch.arange(length, device=pos.device)[None, None, :] <= pos[:, None, None]
        missing = need & ~valid[slots[:, None], idx[None, :], :length]  # [B, h, L]
        if not bool(missing.any()):
            return 0
        bi, hi, pi = missing.nonzero(as_tuple=True)
        resident, host = self.rows.head_tables
        for j in hi.unique().tolist():
            sel = hi == j
            s_all, p_all = slots[bi[sel]], pi[sel]
            head, loc = idx[j:j + 1].to(torch.int32), locs[j:j + 1]
            for lo in range(0, s_all.numel(), MAX_BATCH):
                s, p = s_all[lo:lo + MAX_BATCH], p_all[lo:lo + MAX_BATCH]
                qkv_projection(xs[s, p].contiguous(), resident, head, loc, cache_k, cache_v,
                               s, p, host=host)  # writes K/V; the query is not needed
                self._count(loc, self.head_bytes)
            valid[s_all, int(idx[j]), p_all] = lazy_kv.flag(True, valid)
        return int(bi.numel())


def offload_layers(model: OPTModel, layer_ids: list[int], *, device: torch.device | str,
                   pin: bool | None = None,
                   placements: dict[int, LayerPlacement] | None = None,
                   stream: bool = True) -> None:
    """Move layers ``layer_ids`` of ``model`` to host records (pinned when ``pin``, default:
    on a CUDA device) with the hot rows of ``placements`` (default: none) cached on
    ``device``, and route their sparse ops there. ``stream``: multi-token steps bring each
    layer to the device once through a double buffer (row_stream.py; ``stream_bytes`` of
    device memory), else they read rows token by token."""
    device = torch.device(device)
    pin = device.type == "cuda" if pin is None else pin
    dtype = next(model.parameters()).dtype
    if dtype not in sparse_backend.KERNEL_DTYPES:
        raise sparse_backend.BackendError(
            f"offloaded layers run on the kernels, which support float16 and bfloat16; the "
            f"model is {dtype}")
    layout = RecordLayout.of(model.config)
    by_id = {layer.layer_id: layer for layer in model.layers()}
    for lid in layer_ids:
        if lid not in by_id:
            raise ValueError(f"layer {lid} is not in this model's span {model.layer_ids}")
    # One double buffer for the model's multi-token steps (row_stream.py).
    buffer = RowStream(layout, dtype, device) if layer_ids and stream else None
    previous: OffloadedLayer | None = None
    for k, lid in enumerate(sorted(layer_ids)):
        layer = by_id[lid]
        host = host_layer_from_module(layer, layout, dtype=dtype, pin=pin)
        none = torch.empty(0, dtype=torch.long)
        place = (placements or {}).get(lid, LayerPlacement(lid, none, none, False))
        rows = ResidentLayer(host, place, layout, device)
        bias = layer.fc2.bias, layer.self_attn.out_proj.bias
        ops = OffloadedLayer(rows, *bias, stream=buffer, slot=k % row_stream.SLOTS)
        if previous is not None:
            previous.next = ops
        previous = ops
        sparse_backend.register_offloaded(layer, ops)
        for name in BIG:
            module_name, _, pname = name.rpartition(".")
            module = layer.get_submodule(module_name)
            p = getattr(module, pname)
            if p is not None:
                setattr(module, pname, torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))


def _stays(name: str) -> bool:
    return name not in BIG


def spare_bytes(model: OPTModel, layer_ids: list[int], budget_bytes: int,
                reserved_bytes: int) -> int:
    """Bytes of the budget that are left once ``layer_ids`` are offloaded: the budget less
    ``reserved_bytes``, every weight that stays on the GPU and, per offloaded layer, the
    small tensors its rows keep on the GPU (norms and biases, once more in the
    ResidentLayer) and its two location maps. May be negative."""
    off = set(layer_ids)
    used = 0
    for layer in model.layers():
        for name, p in layer.named_parameters():
            if layer.layer_id not in off:
                used += _nbytes([p])
            elif _stays(name):
                used += 2 * _nbytes([p])
        if layer.layer_id in off:
            used += 4 * (model.config.ffn_dim + model.config.num_attention_heads)
    layer_params = {id(p) for layer in model.layers() for p in layer.parameters()}
    used += _nbytes(p for p in model.parameters() if id(p) not in layer_params)
    return budget_bytes - reserved_bytes - used


def cache_placements(layout: RecordLayout, element_size: int, layer_ids: list[int],
                     cache_bytes: int,
                     freqs: dict[int, LayerFrequencies] | None = None,
                     dynamic: bool = True) -> dict[int, LayerPlacement]:
    """Row caches for offloaded layers ``layer_ids`` within ``cache_bytes`` (the spare
    budget, ``CACHE_MARGIN`` already kept back by the caller). With ``freqs`` (one per layer):
    ``plan_placement``'s hot rows plus ``DYNAMIC_FRACTION`` of dynamic neuron slots (none
    when not ``dynamic``: static hot rows only). Without:
    an even share per layer, as dynamic slots for neurons and heads in the proportion of
    their bytes in the layer (a share that holds every neuron gives the rest to heads)."""
    none = torch.empty(0, dtype=torch.long)
    if not layer_ids or cache_bytes <= 0:
        return {}
    if freqs is not None:
        missing = [lid for lid in layer_ids if lid not in freqs]
        if missing:
            raise PlacementError(f"frequencies for offloaded layers {missing} are missing")
        plan = plan_placement(layout, [freqs[lid] for lid in layer_ids], layer_ids,
                              budget_bytes=cache_bytes, reserved_bytes=0,
                              element_size=element_size,
                              dynamic_fraction=DYNAMIC_FRACTION if dynamic else 0.0)
        return {p.layer_id: p for p in plan.layers}
    nb, hb = layout.neuron_len * element_size, layout.head_len * element_size
    share = cache_bytes // len(layer_ids)
    heads = min(layout.heads, share * layout.heads * hb // layout.layer_bytes(element_size) // hb)
    neurons = min(layout.ffn, (share - heads * hb) // nb)
    heads = min(layout.heads, (share - neurons * nb) // hb)  # what a full neuron cache leaves
    return {lid: LayerPlacement(lid, none, none, False, dynamic_neurons=neurons,
                                dynamic_heads=heads) for lid in layer_ids}


def fit_budget(model: OPTModel, budget_bytes: int, *, device: torch.device | str,
               reserved_bytes: int = 0, freqs: dict[int, LayerFrequencies] | None = None,
               caches: bool = True, dynamic: bool = True) -> list[int]:
    """Hold ``model`` within ``budget_bytes`` of ``device`` memory: offload the layers that
    do not fit (``plan_offload``), give what the budget has left to their row caches
    (``cache_placements``; ``caches=False``: none), then move the rest of the model to
    ``device``. Load the model on the CPU first, so that offloaded layers never occupy the
    GPU. Returns the offloaded layer ids (run the engine with an ``OffloadSelector`` over
    them)."""
    layers, stream = plan_streaming(model, budget_bytes, reserved_bytes)
    if layers and not stream:
        log.warning("gpu_memory_gib: %s leaves no room for the %s buffer that prefill streams "
                    "offloaded layers through: prefill reads their rows token by token",
                    human_size(budget_bytes), human_size(stream_bytes(model)))
    placements = {}
    if caches and layers:
        reserved = reserved_bytes + (stream_bytes(model) if stream else 0)
        spare = spare_bytes(model, layers, budget_bytes, reserved)
        e = next(model.parameters()).element_size()
        placements = cache_placements(RecordLayout.of(model.config), e, layers,
                                      spare - int(spare * CACHE_MARGIN), freqs, dynamic)
    offload_layers(model, layers, device=device, placements=placements, stream=stream)
    move_resident(model, device)
    return layers


def fit_gib(model: OPTModel, gpu_memory_gib: float, *, device: torch.device | str, slots: int,
            max_len: int, caches: bool = False,
            model_dir: str | Path | None = None,
            kv_inputs: bool = True) -> tuple[list[int], int]:
    """``fit_budget`` for a worker or engine of ``slots`` sequences of ``max_len`` positions
    with a ``gpu_memory_gib`` budget, reserving the layer planner's figures (KV cache, with
    attention inputs when steps may skip heads: ``kv_inputs``; activation margin), so that
    what it offloads is what the plan said.
    ``model_dir``: where the checkpoint's firing statistics may be
    (placement_stats.find_frequencies); with them, the budget left after whole layers holds
    the offloaded layers' most frequently firing neurons (static hot rows). ``caches``:
    (also) dynamic LRU row caches ([pipeline] offload_cache; off by default: LRU admission
    reads a missed row twice, so it gains only where selections repeat often enough).
    Returns (offloaded layer ids, reserved bytes)."""
    e = next(model.parameters()).element_size()
    reserved = offload_reserved_bytes(model.config, len(model.layer_ids), slots, max_len, e,
                                      kv_inputs=kv_inputs)
    freqs = None
    path = find_frequencies(model_dir)
    if path is not None:  # read while the weights are all here (their hashes are checked)
        # Heads stay out of the static rows: decode gathers a step's heads to the device
        # once (their records are large and few), and a layer with hot heads would fall
        # back to the in-place path.
        freqs = {lid: LayerFrequencies(f.neurons, torch.zeros_like(f.heads))
                 for lid, f in read_frequencies(path, model).items()}
        log.info("placing hot rows of offloaded layers from %s", path)
    return fit_budget(model, gib(gpu_memory_gib), device=device, reserved_bytes=reserved,
                      freqs=freqs, caches=caches or freqs is not None,
                      dynamic=caches), reserved


def move_resident(model: OPTModel, device: torch.device | str) -> None:
    """``model.to(device)`` for everything but the offloaded weights (meta tensors, which
    cannot move)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if not t.is_meta:
                t.data = t.data.to(device)


class OffloadSelector:
    """Wraps a selector so that offloaded layers always get masks (every row where the
    inner selector keeps a block dense): their dense weights are on the host."""

    def __init__(self, inner: Callable[[int, Tensor], Selection], offloaded: list[int],
                 config) -> None:
        self.inner = inner
        self.offloaded = frozenset(offloaded)
        self.ffn, self.heads = config.ffn_dim, config.num_attention_heads

    def mlp_reads_own_input(self, layer_id: int) -> bool:
        return mlp_reads_own_input(self.inner, layer_id)

    @property
    def keeps_every_head(self) -> bool:
        """The inner selector's word (runtime/sparse.py's ``needs_kv_inputs``): offloaded
        layers get every head it keeps, so a cache for it needs no attention inputs, and
        the offloaded ops then skip the lazy K/V bookkeeping."""
        return bool(getattr(self.inner, "keeps_every_head", False))

    def select_neurons(self, layer_id: int, mlp_in: Tensor) -> Tensor | None:
        neurons = self.inner.select_neurons(layer_id, mlp_in)  # type: ignore[attr-defined]
        if neurons is None and layer_id in self.offloaded:
            return torch.ones(*mlp_in.shape[:2], self.ffn, dtype=torch.bool,
                              device=mlp_in.device)
        return neurons

    def __call__(self, layer_id: int, source: Tensor) -> Selection:
        sel = self.inner(layer_id, source)
        if layer_id in self.offloaded:
            b, t = source.shape[:2]
            full = dict(dtype=torch.bool, device=source.device)
            # An own-input layer's neurons come from select_neurons, after attention. A
            # block kept whole comes with its union known on the host (every id): no read
            # of the device finds it, and the next layer's whole block can follow it.
            if sel.neurons is None and not self.mlp_reads_own_input(layer_id):
                sel = replace(sel, neurons=torch.ones(b, t, self.ffn, **full),
                              neuron_index=torch.arange(self.ffn, device=source.device))
            if sel.heads is None:
                sel = replace(sel, heads=torch.ones(b, t, self.heads, **full),
                              head_index=torch.arange(self.heads, device=source.device))
        return sel


def _dense(layer_id: int, source: Tensor) -> Selection:
    return Selection()


def offload_selector(inner: Callable[[int, Tensor], Selection] | None, offloaded: list[int],
                     config) -> Callable[[int, Tensor], Selection] | None:
    """The selector to run with after ``fit_budget``: ``inner`` wrapped so that offloaded
    layers always get masks. A dense run (``inner`` None) gets a selector that keeps every
    resident layer dense, so offloaded layers compute every row; with nothing offloaded it
    stays as it was (None: the plain dense path)."""
    if not offloaded:
        return inner
    return OffloadSelector(inner if inner is not None else _dense, offloaded, config)


def host_bytes_read(model: OPTModel) -> int:
    """Bytes the model's offloaded layers have read from host records so far."""
    return sum(ops.host_bytes_read() for layer in model.layers()
               if (ops := layer.offloaded) is not None)


def prefetch_counts(model: OPTModel) -> tuple[int, int]:
    """(used, wasted): row gathers the model's offloaded layers started ahead of their
    step (``OffloadedLayer.prefetch``) that the step read, and that it could not."""
    ops = [layer.offloaded for layer in model.layers() if layer.offloaded is not None]
    return sum(o.prefetch_used for o in ops), sum(o.prefetch_wasted for o in ops)


def kv_recomputed(model: OPTModel) -> dict[int, int]:
    """Per offloaded layer: K/V (position, head) pairs its staged decode steps completed,
    which they count on the device (the steps' statistics hold the other paths')."""
    return {layer.layer_id: ops.kv_recomputed() for layer in model.layers()
            if (ops := layer.offloaded) is not None}


def expected_density(selector, layer_id: int, config) -> tuple[float, float]:
    """(MLP, head) fraction a selector computes per token at a layer, as far as it says:
    PredictorSelector its operating point (``ks``), RandomSelector its k; else dense."""
    inner = getattr(selector, "inner", selector)
    if inner is None or layer_id in getattr(inner, "dense_layers", ()) or \
            layer_id in getattr(getattr(inner, "config", None), "dense_layers", ()):
        return 1.0, 1.0
    if hasattr(inner, "ks"):
        mlp_k, head_k = inner.ks(layer_id)
    elif hasattr(inner, "mlp_k"):
        mlp_k, head_k = inner.mlp_k, inner.head_k
    else:
        return 1.0, 1.0
    return mlp_k / config.ffn_dim, head_k / config.num_attention_heads


def budget_report(model: OPTModel, offloaded: list[int], selector, *, budget_bytes: int,
                  reserved_bytes: int) -> dict[str, float | int]:
    """What a budgeted model expects before running (weight_store's ``Placement.report`` at
    batch 1): GPU bytes (resident weights + ``reserved_bytes`` + the offloaded layers' row
    caches, small tensors and location maps), host record bytes and host bytes read per
    token at the selector's densities (static hot rows counted, dynamic slots not: an upper
    bound)."""
    config = model.config
    e = next(p for p in model.parameters() if not p.is_meta).element_size()
    layout = RecordLayout.of(config)
    gpu = _nbytes(p for p in model.parameters() if not p.is_meta) + reserved_bytes
    placements = {}
    streams = set()
    for layer in model.layers():
        if (ops := layer.offloaded) is not None:
            if ops.stream is not None and id(ops.stream) not in streams:
                streams.add(id(ops.stream))
                gpu += ops.stream.nbytes()
            r = ops.rows
            gpu += _nbytes(r.small.values()) + _nbytes([r.neuron_loc, r.head_loc])
            placements[layer.layer_id] = LayerPlacement(
                layer.layer_id, _hot(r.neuron_loc, r.n_hot), _hot(r.head_loc, r.n_hot_heads),
                False, dynamic_neurons=r.cache_neurons.shape[0] - r.n_hot,
                dynamic_heads=r.cache_heads.shape[0] - r.n_hot_heads)
    densities = {lid: expected_density(selector, lid, config) for lid in offloaded}
    report = uniform_placement(layout, e, densities, gpu_bytes=gpu, budget_bytes=budget_bytes,
                               placements=placements).report(1)
    report["offloaded_layers"] = len(offloaded)
    report["resident_layers"] = len(model.layers()) - len(offloaded)
    report["host_record_bytes"] = len(offloaded) * layout.layer_bytes(e)
    return report


def _hot(loc_map: Tensor, n_hot: int) -> Tensor:
    """Ids of the static hot rows: those whose location is one of the first ``n_hot``
    cache rows."""
    loc = loc_map.cpu().long()
    return torch.nonzero((loc >= 0) & (loc < n_hot)).flatten()


def describe_report(report: dict[str, float | int]) -> str:
    mib = 2**20
    return (f"{report['resident_layers']} layer(s) resident, {report['offloaded_layers']} "
            f"offloaded ({report['host_record_bytes'] / mib:.1f} MiB in host memory); "
            f"expected GPU memory {report['gpu_bytes'] / mib:.1f} MiB (row caches "
            f"{report['row_cache_bytes'] / mib:.1f} MiB: {report['dynamic_neuron_slots']} "
            f"dynamic neuron slots, {report['dynamic_head_slots']} dynamic head slots) of a "
            f"{report['budget_bytes'] / mib:.1f} MiB budget; "
            f"expected host bytes read per token (batch 1): "
            f"{report['host_bytes_per_step'] / mib:.3f} MiB (an upper bound: rows the dynamic "
            f"slots hold are not subtracted)")
