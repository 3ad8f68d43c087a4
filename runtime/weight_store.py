"""Where a worker's layer weights live: pinned host records, GPU hot-row caches, a budget.

Layout (design.md, "Where the weights live"): per layer, one record per MLP neuron
    [fc1 row (C) | fc2 column (C) | fc1 bias (1) | pad]            -> [F, neuron_len]
and one record per attention head
    [q rows (D*C) | k rows | v rows | out_proj columns as D rows of C | bq | bk | bv | pad]
                                                                    -> [H, head_len]
so that any neuron or head is one contiguous read. Records are padded to 16 elements so
every row (and every part of it) stays 16-byte aligned for vector loads.

Placement: given measured firing frequencies (fraction of tokens on which each neuron or
head is selected) and a GPU budget, keep the rows that save the most host traffic per GPU
byte. A row of frequency f and size s saves f*s host bytes per token for s bytes of GPU
memory, so the best static cache is simply the highest-frequency rows over all layers
(the same order for any batch, since 1-(1-f)^B grows with f). A layer whose every row is
kept is dense-resident. Optionally a fraction of the budget becomes dynamic neuron slots per
layer, filled with the cold rows recent tokens used (LRU; ``ResidentLayer.admit``); heads
can have dynamic slots too (``admit_heads``; runtime/offload.py uses them when it has no
frequencies).

Cold rows are read either in place (mapped pinned memory, zero-copy) or staged (gathered
on the CPU into a pinned buffer, copied on a copy stream); ``measure_cold_paths`` times
both on the machine and ``ResidentLayer`` uses whichever the caller picks.

What this module does not know: which rows a token selects (predictors) and how layers are
split between workers (the layer planner).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.sparse_attention import HeadRows, sparse_attention
from ..kernels.sparse_mlp import NeuronRows, sparse_mlp
from .opt_config import OPTConfig

ALIGN = 16  # elements; 32 bytes in fp16, so rows and their parts stay 16-byte aligned
GIB = 1 << 30


class PlacementError(ValueError):
    """A budget or statistics that cannot produce a placement; the message says which."""


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# --- record layout ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordLayout:
    hidden: int  # C
    ffn: int  # F
    heads: int  # H

    @classmethod
    def of(cls, config: OPTConfig) -> RecordLayout:
        return cls(config.hidden_size, config.ffn_dim, config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def neuron_len(self) -> int:
        return _round_up(2 * self.hidden + 1, ALIGN)

    @property
    def head_len(self) -> int:
        return _round_up(4 * self.head_dim * self.hidden + 3 * self.head_dim, ALIGN)

    def layer_bytes(self, element_size: int) -> int:
        return (self.ffn * self.neuron_len + self.heads * self.head_len) * element_size


def pack_neurons(fc1_w: Tensor, fc1_b: Tensor | None, fc2_w: Tensor, out: Tensor) -> Tensor:
    """Write neuron records into ``out`` [F, neuron_len] from HF weights fc1 [F, C], fc2 [C, F]."""
    f, c = fc1_w.shape
    out[:, :c] = fc1_w
    out[:, c:2 * c] = fc2_w.T
    out[:, 2 * c] = fc1_b if fc1_b is not None else 0
    out[:, 2 * c + 1:] = 0
    return out


def neuron_rows(records: Tensor, hidden: int) -> NeuronRows:
    """Kernel views of neuron records (any number of rows, any device)."""
    c = hidden
    return NeuronRows(records[:, :c], records[:, c:2 * c], records[:, 2 * c])


def unpack_neurons(records: Tensor, hidden: int) -> tuple[Tensor, Tensor, Tensor]:
    """(fc1 [F, C], fc1 bias [F], fc2 [C, F]) back from records: the layout's inverse."""
    rows = neuron_rows(records, hidden)
    return rows.w1.clone(), rows.b1.clone(), rows.w2t.T.contiguous()


def pack_heads(q: tuple[Tensor, Tensor | None], k: tuple[Tensor, Tensor | None],
               v: tuple[Tensor, Tensor | None], out_proj_w: Tensor, out: Tensor) -> Tensor:
    """Write head records into ``out`` [H, head_len]: q, k, v = (weight [C, C], bias [C])."""
    h = out.shape[0]
    c = out_proj_w.shape[0]
    d = c // h
    blk = d * c
    for i, (w, _) in enumerate((q, k, v)):
        out[:, i * blk:(i + 1) * blk] = w.reshape(h, blk)
    out[:, 3 * blk:4 * blk] = out_proj_w.T.reshape(h, blk)
    for i, (_, b) in enumerate((q, k, v)):
        out[:, 4 * blk + i * d:4 * blk + (i + 1) * d] = b.reshape(h, d) if b is not None else 0
    out[:, 4 * blk + 3 * d:] = 0
    return out


def head_rows(records: Tensor, hidden: int, head_dim: int) -> HeadRows:
    """Kernel views of head records [N, head_len]: wqkv [3, N, D, C], bqkv [3, N, D],
    wo [N, D, C]."""
    n, c, d = records.shape[0], hidden, head_dim
    blk = d * c
    wqkv = records[:, :3 * blk].unflatten(1, (3, d, c)).transpose(0, 1)
    bqkv = records[:, 4 * blk:4 * blk + 3 * d].unflatten(1, (3, d)).transpose(0, 1)
    wo = records[:, 3 * blk:4 * blk].unflatten(1, (d, c))
    assert wqkv.shape == (3, n, d, c)
    return HeadRows(wqkv, bqkv, wo)


def unpack_heads(records: Tensor, hidden: int, head_dim: int) -> dict[str, Tensor]:
    """HF-layout q/k/v/out_proj weights and q/k/v biases back from head records."""
    rows = head_rows(records, hidden, head_dim)
    c = hidden
    out = {}
    for i, name in enumerate(("q", "k", "v")):
        out[f"{name}_w"] = rows.wqkv[i].reshape(-1, c).clone()
        out[f"{name}_b"] = rows.bqkv[i].reshape(-1).clone()
    out["o_w"] = rows.wo.reshape(-1, c).T.contiguous()
    return out


# --- host store -------------------------------------------------------------------------------


@dataclass
class HostLayer:
    """One layer in host memory: records plus the small per-layer tensors (norms, the
    biases that are not per-row), which always go to the GPU."""

    layer_id: int
    neurons: Tensor  # [F, neuron_len]
    heads: Tensor  # [H, head_len]
    small: dict[str, Tensor] = field(default_factory=dict)
    pre_ln: bool = True  # OPT's norm placement (False only for opt-350m)


def host_layer_from_module(layer: torch.nn.Module, layout: RecordLayout, *, dtype: torch.dtype,
                           pin: bool) -> HostLayer:
    """Pack one runtime/model.py OPTDecoderLayer into (optionally pinned) host records."""
    def new(rows: int, length: int) -> Tensor:
        return torch.empty((rows, length), dtype=dtype, pin_memory=pin)

    a = layer.self_attn
    with torch.no_grad():
        neurons = pack_neurons(layer.fc1.weight, layer.fc1.bias, layer.fc2.weight,
                               new(layout.ffn, layout.neuron_len))
        heads = pack_heads((a.q_proj.weight, a.q_proj.bias), (a.k_proj.weight, a.k_proj.bias),
                           (a.v_proj.weight, a.v_proj.bias), a.out_proj.weight,
                           new(layout.heads, layout.head_len))
        small = {}
        for name, t in (("out_proj_b", a.out_proj.bias), ("fc2_b", layer.fc2.bias),
                        ("ln1_w", layer.self_attn_layer_norm.weight),
                        ("ln1_b", layer.self_attn_layer_norm.bias),
                        ("ln2_w", layer.final_layer_norm.weight),
                        ("ln2_b", layer.final_layer_norm.bias)):
            if t is not None:
                small[name] = t.detach().to(dtype).clone()
    return HostLayer(layer.layer_id, neurons, heads, small, pre_ln=layer.pre_ln)


# --- placement --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerFrequencies:
    """Measured fraction of tokens on which each neuron / head is selected (values in [0, 1])."""

    neurons: Tensor  # [F]
    heads: Tensor  # [H]


@dataclass
class LayerPlacement:
    layer_id: int
    hot_neurons: Tensor  # int64 ids kept on the GPU, most frequent first
    hot_heads: Tensor
    dense_resident: bool
    dynamic_neurons: int = 0  # GPU slots for recently used cold neurons (ResidentLayer.admit)
    dynamic_heads: int = 0  # the same for heads (ResidentLayer.admit_heads)


@dataclass
class Placement:
    layout: RecordLayout
    element_size: int
    layers: list[LayerPlacement]
    freqs: list[LayerFrequencies]
    reserved_bytes: int  # KV cache, activations, embeddings... (outside the row caches)
    budget_bytes: int

    def cache_bytes(self) -> int:
        lay, e = self.layout, self.element_size
        return sum(((p.hot_neurons.numel() + p.dynamic_neurons) * lay.neuron_len
                    + (p.hot_heads.numel() + p.dynamic_heads) * lay.head_len) * e
                   for p in self.layers)

    def gpu_bytes(self) -> int:
        return self.cache_bytes() + self.reserved_bytes

    def bytes_per_step(self, batch: int = 1) -> dict[str, float]:
        """Expected bytes read per decode step for a batch of ``batch`` tokens whose
        selections are independent draws with the measured frequencies (a row is read once
        per step if any token selects it: probability 1 - (1 - f)^B)."""
        lay, e = self.layout, self.element_size
        host = resident = 0.0
        for p, fr in zip(self.layers, self.freqs, strict=True):
            for freq, hot, size in ((fr.neurons, p.hot_neurons, lay.neuron_len),
                                    (fr.heads, p.hot_heads, lay.head_len)):
                union = 1.0 - (1.0 - freq.double()) ** batch
                hot_mass = float(union[hot].sum()) if hot.numel() else 0.0
                resident += hot_mass * size * e
                host += (float(union.sum()) - hot_mass) * size * e
        return {"host_bytes": host, "resident_bytes": resident}

    def report(self, batch: int = 1) -> dict[str, float | int]:
        moved = self.bytes_per_step(batch)
        return {
            "budget_bytes": self.budget_bytes,
            "gpu_bytes": self.gpu_bytes(),
            "row_cache_bytes": self.cache_bytes(),
            "reserved_bytes": self.reserved_bytes,
            "dense_resident_layers": sum(p.dense_resident for p in self.layers),
            "dynamic_neuron_slots": sum(p.dynamic_neurons for p in self.layers),
            "dynamic_head_slots": sum(p.dynamic_heads for p in self.layers),
            "layers": len(self.layers),
            "batch": batch,
            "host_bytes_per_step": moved["host_bytes"],
            "resident_bytes_per_step": moved["resident_bytes"],
        }


def gib(x: float) -> int:
    """Bytes in ``x`` GiB (the unit of the gpu_memory_gib budget)."""
    return int(x * GIB)


def plan_placement(layout: RecordLayout, freqs: list[LayerFrequencies], layer_ids: list[int], *,
                   budget_bytes: int, reserved_bytes: int, element_size: int,
                   dynamic_fraction: float = 0.0) -> Placement:
    """Greedy static cache: the most frequently selected rows over all layers, by frequency
    (host bytes saved per GPU byte), until the budget left after ``reserved_bytes`` is
    spent. Ties go to the earlier layer and lower id (deterministic).

    ``dynamic_fraction`` of that budget is kept back for dynamic neuron slots (rows that
    recent tokens used, see ResidentLayer.admit), shared evenly by the layers that are not
    dense-resident. The bytes-moved estimate counts only the static part (conservative)."""
    if not 0.0 <= dynamic_fraction < 1.0:
        raise PlacementError(f"dynamic_fraction={dynamic_fraction}: expected [0, 1)")
    if len(freqs) != len(layer_ids):
        raise PlacementError(f"{len(freqs)} frequency sets for {len(layer_ids)} layers")
    if reserved_bytes > budget_bytes:
        raise PlacementError(
            f"gpu_memory_gib: the budget ({budget_bytes / GIB:.2f} GiB) is smaller than what "
            f"must stay on the GPU anyway ({reserved_bytes / GIB:.2f} GiB: KV cache, "
            "embeddings, activations); raise gpu_memory_gib or lower the cache length")
    for i, fr in enumerate(freqs):
        if fr.neurons.shape != (layout.ffn,) or fr.heads.shape != (layout.heads,):
            raise PlacementError(f"layer {layer_ids[i]}: frequencies of shapes "
                                 f"{tuple(fr.neurons.shape)}, {tuple(fr.heads.shape)}; expected "
                                 f"({layout.ffn},), ({layout.heads},)")
        for t in (fr.neurons, fr.heads):
            if t.numel() and not (float(t.min()) >= 0.0 and float(t.max()) <= 1.0):
                raise PlacementError(f"layer {layer_ids[i]}: frequencies must lie in [0, 1]")
    # One candidate list: (frequency, layer index, kind, id, bytes).
    freq_all, layer_all, kind_all, id_all = [], [], [], []
    for i, fr in enumerate(freqs):
        for kind, t in ((0, fr.neurons), (1, fr.heads)):
            freq_all.append(t.double().cpu())
            layer_all.append(torch.full((t.numel(),), i, dtype=torch.int64))
            kind_all.append(torch.full((t.numel(),), kind, dtype=torch.int64))
            id_all.append(torch.arange(t.numel()))
    freq = torch.cat(freq_all)
    lay_i, kind, ids = torch.cat(layer_all), torch.cat(kind_all), torch.cat(id_all)
    size = torch.where(kind == 0, layout.neuron_len, layout.head_len) * element_size
    # Stable sort by descending frequency keeps (layer, kind, id) order among ties.
    order = torch.sort(-freq, stable=True).indices
    spent = torch.cumsum(size[order], 0)
    row_budget = budget_bytes - reserved_bytes
    dynamic_bytes = int(dynamic_fraction * row_budget)
    keep = order[spent <= row_budget - dynamic_bytes]
    layers = []
    for i, layer_id in enumerate(layer_ids):
        mine = keep[lay_i[keep] == i]
        hot_n = ids[mine[kind[mine] == 0]]
        hot_h = ids[mine[kind[mine] == 1]]
        dense = hot_n.numel() == layout.ffn and hot_h.numel() == layout.heads
        layers.append(LayerPlacement(layer_id, hot_n, hot_h, dense))
    sparse_layers = [p for p in layers if not p.dense_resident]
    for p in sparse_layers:
        share = dynamic_bytes // len(sparse_layers) // (layout.neuron_len * element_size)
        p.dynamic_neurons = min(share, layout.ffn - p.hot_neurons.numel())
    return Placement(layout, element_size, layers, freqs, reserved_bytes, budget_bytes)


def uniform_placement(layout: RecordLayout, element_size: int,
                      densities: dict[int, tuple[float, float]], *, gpu_bytes: int,
                      budget_bytes: int,
                      placements: dict[int, LayerPlacement] | None = None) -> Placement:
    """The placement of layers held in host records (what runtime/offload.py's
    ``fit_budget`` builds), for ``Placement.report``: layer id -> (MLP, head) density, each
    row taken to be selected on that fraction of tokens (1.0 when running dense), with the
    row caches of ``placements`` (default: none). ``gpu_bytes``: everything the worker keeps
    on its GPU besides those caches."""
    none = torch.empty(0, dtype=torch.long)
    layers, freqs = [], []
    for layer_id, (mlp, heads) in sorted(densities.items()):
        layers.append((placements or {}).get(layer_id, LayerPlacement(layer_id, none, none,
                                                                      False)))
        freqs.append(LayerFrequencies(torch.full((layout.ffn,), float(mlp)),
                                      torch.full((layout.heads,), float(heads))))
    return Placement(layout, element_size, layers, freqs, gpu_bytes, budget_bytes)


# --- GPU side ---------------------------------------------------------------------------------


class ResidentLayer:
    """One layer as the kernels see it: a GPU cache of hot records, the host records
    (mapped for in-place reads on a GPU), and location maps id -> kernel loc
    (>= 0: cache row, < 0: host row -loc-1)."""

    def __init__(self, host: HostLayer, placement: LayerPlacement, layout: RecordLayout,
                 device: torch.device | str) -> None:
        self.layout = layout
        self.layer_id = host.layer_id
        self.host = host
        self.small = {k: v.to(device) for k, v in host.small.items()}
        n_hot = placement.hot_neurons.numel()
        # Static hot rows first, then the dynamic slots (filled by admit).
        self.cache_neurons = torch.empty((n_hot + placement.dynamic_neurons, layout.neuron_len),
                                         dtype=host.neurons.dtype, device=device)
        self.cache_neurons[:n_hot] = host.neurons[placement.hot_neurons].to(device)
        self.n_hot = n_hot
        self.dynamic: OrderedDict[int, int] = OrderedDict()  # neuron id -> slot, LRU first
        self.free_slots = list(range(n_hot, n_hot + placement.dynamic_neurons))
        n_hot_heads = placement.hot_heads.numel()
        self.cache_heads = torch.empty((n_hot_heads + placement.dynamic_heads, layout.head_len),
                                       dtype=host.heads.dtype, device=device)
        self.cache_heads[:n_hot_heads] = host.heads[placement.hot_heads].to(device)
        self.n_hot_heads = n_hot_heads
        self.dynamic_heads: OrderedDict[int, int] = OrderedDict()
        self.free_head_slots = list(range(n_hot_heads, n_hot_heads + placement.dynamic_heads))
        self.neuron_loc = _loc_map(layout.ffn, placement.hot_neurons).to(device)
        self.head_loc = _loc_map(layout.heads, placement.hot_heads).to(device)
        on_gpu = torch.device(device).type == "cuda"
        if on_gpu and host.neurons.is_pinned():
            from ..kernels.host_memory import device_view
            host_neurons, host_heads = device_view(host.neurons), device_view(host.heads)
        elif on_gpu:
            raise PlacementError("host records must be pinned to be read from a GPU")
        else:  # CPU (tests, interpreter): the "host table" is the same memory
            host_neurons, host_heads = host.neurons, host.heads
        # What admission copies from: on a GPU the mapped view, so that the copy is a gather
        # on the GPU over PCIe, not a CPU gather into pageable memory and a slow copy.
        self.host_neurons, self.host_heads = host_neurons, host_heads
        c, d = layout.hidden, layout.head_dim
        self.neuron_tables = (neuron_rows(self.cache_neurons, c), neuron_rows(host_neurons, c))
        self.head_tables = (head_rows(self.cache_heads, c, d), head_rows(host_heads, c, d))

    def neuron_locs(self, neurons: Tensor) -> Tensor:
        return self.neuron_loc[neurons.long()]

    def admit(self, neurons: Tensor) -> int:
        """Dynamic part: after a step, copy the cold neurons it used into the dynamic slots
        (evicting the least recently used), so that following tokens, which tend to reuse
        them, read them from GPU memory. Returns how many rows were copied. Reads the
        selection on the host (a synchronisation): call it off the critical path."""
        return _admit(neurons, self.neuron_loc, self.cache_neurons, self.host_neurons,
                      self.n_hot, self.dynamic, self.free_slots)

    def admit_heads(self, heads: Tensor) -> int:
        """``admit`` for heads (their dynamic slots, ``LayerPlacement.dynamic_heads``)."""
        return _admit(heads, self.head_loc, self.cache_heads, self.host_heads,
                      self.n_hot_heads, self.dynamic_heads, self.free_head_slots)

    def head_locs(self, heads: Tensor) -> Tensor:
        return self.head_loc[heads.long()]

    # The layer's two blocks, with runtime/model.py's math (norms, residuals), computing
    # only the selected rows wherever they live. h: [B, C] (one token per row), model dtype.

    def attention_block(self, h: Tensor, heads: Tensor, cache_k: Tensor, cache_v: Tensor,
                        slots: Tensor, positions: Tensor, **kernel_args) -> Tensor:
        """h + attention over the selected heads (keys/values written for those only)."""
        sm, c = self.small, self.layout.hidden
        a = F.layer_norm(h, (c,), sm.get("ln1_w"), sm.get("ln1_b")) if self.host.pre_ln else h
        out = sparse_attention(a, self.head_tables[0], heads, self.head_locs(heads), cache_k,
                               cache_v, slots, positions, host=self.head_tables[1],
                               bias=sm.get("out_proj_b"), residual=h, **kernel_args)
        return out if self.host.pre_ln else F.layer_norm(out, (c,), sm.get("ln1_w"),
                                                         sm.get("ln1_b"))

    def mlp_block(self, h: Tensor, neurons: Tensor, **kernel_args) -> Tensor:
        """h + fc2(relu(fc1(norm(h)))) over the selected neurons."""
        sm, c = self.small, self.layout.hidden
        a = F.layer_norm(h, (c,), sm.get("ln2_w"), sm.get("ln2_b")) if self.host.pre_ln else h
        out = sparse_mlp(a, self.neuron_tables[0], self.neuron_locs(neurons),
                         host=self.neuron_tables[1], bias2=sm.get("fc2_b"), residual=h,
                         **kernel_args)
        return out if self.host.pre_ln else F.layer_norm(out, (c,), sm.get("ln2_w"),
                                                         sm.get("ln2_b"))


def _admit(ids: Tensor, loc_map: Tensor, cache: Tensor, host: Tensor, n_hot: int,
           lru: OrderedDict[int, int], free: list[int]) -> int:
    """Copy the rows ``ids`` that are neither hot nor already cached into the dynamic slots
    of ``cache`` (rows from ``n_hot`` on), evicting the least recently used, and point
    ``loc_map`` at them (in place: the kernels' tables stay valid). ``host``: the records as
    the cache's device reads them (a mapped view on a GPU). Returns rows copied."""
    if cache.shape[0] == n_hot:
        return 0
    loc = loc_map.cpu()
    fresh = []
    for n in torch.unique(ids.detach().long().cpu()).tolist():
        if n in lru:
            lru.move_to_end(n)
        elif int(loc[n]) < 0:
            fresh.append(n)
    fresh = fresh[: cache.shape[0] - n_hot]  # at most every slot
    slots = []
    for n in fresh:
        if free:
            slot = free.pop()
        else:
            old, slot = lru.popitem(last=False)
            loc[old] = -old - 1
        lru[n] = slot
        loc[n] = slot
        slots.append(slot)
    if fresh:
        cache[torch.tensor(slots, device=cache.device)] = \
            host[torch.tensor(fresh, device=host.device)].to(cache.device)
        loc_map.copy_(loc)
    return len(fresh)


def _loc_map(n: int, hot: Tensor) -> Tensor:
    loc = -(torch.arange(n, dtype=torch.int32) + 1)
    loc[hot] = torch.arange(hot.numel(), dtype=torch.int32)
    return loc


class StagedRows:
    """The staged cold path: gather cold neuron records on the CPU into a pinned buffer,
    copy them to a GPU buffer on a copy stream; the kernel then reads them as its second
    table. Measured against in-place reads by ``measure_cold_paths``."""

    def __init__(self, capacity: int, record_len: int, dtype: torch.dtype, device: str) -> None:
        self.pinned = torch.empty((capacity, record_len), dtype=dtype, pin_memory=True)
        self.gpu = torch.empty((capacity, record_len), dtype=dtype, device=device)
        self.stream = torch.cuda.Stream(device=device)

    def stage(self, host_records: Tensor, cold_ids: Tensor) -> torch.cuda.Event:
        """Copy records ``cold_ids`` (CPU int64) into gpu[:n]; returns the copy's event."""
        n = cold_ids.numel()
        torch.index_select(host_records, 0, cold_ids, out=self.pinned[:n])
        with torch.cuda.stream(self.stream):
            self.gpu[:n].copy_(self.pinned[:n], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done
