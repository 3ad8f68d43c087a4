"""Layers that do not fit the GPU budget: held in (pinned) host records and run through the
kernels' host-row path, inside the one model.

``plan_offload`` picks the layers that exceed a ``gpu_memory_gib`` budget (the first layers
stay whole on the GPU, the rest go to the host). ``offload_layers`` packs each of them into
runtime/weight_store.py's records (one contiguous record per neuron and per head), keeps
them behind a ``ResidentLayer`` (an optional cache of hot rows on the GPU, every other row
read in place from mapped pinned memory), drops the module's big weights (they become
meta tensors: any path that still read them would fail loudly, not silently compute) and
registers the layer with runtime/sparse_backend.py, so that the model's sparse ops take
its rows from there. Norms and the out_proj/fc2 biases stay on the module.

Every token of an offloaded layer is sparse: ``OffloadSelector`` turns "dense" (no mask)
into "every row" for those layers, since their dense weights are gone. The kernels take one
token per batch row; a prefill runs them token by token (exact, since each token attends
to the positions written before it), reading the selected rows once per token: correct,
not fast. Streaming a whole layer up once per prefill would be the faster prefill; not
done here.

K/V stay exact as in runtime/sparse.py: each step stores its attention input and marks
its position stale for every head; the selected heads' K/V are written by the projection
kernel, and a selected head missing at earlier positions is recomputed from the stored
inputs by the same kernel over the host rows.

What this module does not know: which rows are selected (selectors) or how hot rows are
chosen (weight_store.plan_placement, from measured frequencies).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..kernels.sparse_attention import decode_attention, out_projection, qkv_projection
from ..kernels.sparse_mlp import MAX_BATCH, sparse_mlp
from . import sparse_backend
from .model import Batch, OPTAttention, OPTModel
from .sparse import Selection
from .weight_store import (
    LayerPlacement,
    PlacementError,
    RecordLayout,
    ResidentLayer,
    host_layer_from_module,
)

# The weights that move to the host records (norms and out_proj/fc2 biases stay).
BIG = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
       "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
       "self_attn.out_proj.weight", "fc1.weight", "fc1.bias", "fc2.weight")


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def plan_offload(model: OPTModel, budget_bytes: int, reserved_bytes: int = 0) -> list[int]:
    """Layer ids to hold on the host: the model's other weights and ``reserved_bytes`` (KV
    cache, activations) come first, then whole layers in order while they fit."""
    layers = model.layers()
    layer_params = {id(p) for layer in layers for p in layer.parameters()}
    left = budget_bytes - reserved_bytes - _nbytes(
        p for p in model.parameters() if id(p) not in layer_params)
    if left < 0:
        raise PlacementError(
            f"gpu_memory_gib: {budget_bytes / 2**30:.3f} GiB does not hold the embeddings, "
            f"LM head and reserved memory ({(budget_bytes - left) / 2**30:.3f} GiB); raise it")
    out = []
    for layer in layers:
        size = _nbytes(layer.parameters())
        if not out and size <= left:
            left -= size
        else:
            out.append(layer.layer_id)
    return out


class OffloadedLayer:
    """One layer's rows in host records (+ hot rows on the GPU), and the sparse ops over
    them, called by runtime/sparse_backend.py."""

    def __init__(self, rows: ResidentLayer, fc2_bias: Tensor | None,
                 out_proj_bias: Tensor | None) -> None:
        self.rows = rows
        self.fc2_bias = fc2_bias
        self.out_proj_bias = out_proj_bias

    def mlp(self, x: Tensor, idx: Tensor) -> Tensor:
        """fc2(relu(fc1(x))) over neurons ``idx``; x [B, T, C], any number of rows."""
        b, t, c = x.shape
        flat = x.reshape(b * t, c).contiguous()
        resident, host = self.rows.neuron_tables
        locs = self.rows.neuron_locs(idx)
        out = [sparse_mlp(flat[i:i + MAX_BATCH], resident, locs, host=host,
                          bias2=self.fc2_bias, **sparse_backend.MLP_ARGS)
               for i in range(0, b * t, MAX_BATCH)]
        return torch.cat(out).view(b, t, c)

    def attention(self, attn: OPTAttention, x: Tensor, layer_id: int, batch: Batch,
                  idx: Tensor) -> Tensor:
        """Attention of heads ``idx`` (the batch's union), out_proj and its bias included;
        x [B, T, C] post-LN, one token at a time. Returns [B, T, C]."""
        cache, slots, pos = batch.cache, batch.slots, batch.positions
        if cache is None or cache.inputs is None or slots is None:
            raise sparse_backend.BackendError(
                f"layer {layer_id} is offloaded: its attention needs a KV cache that keeps "
                "attention inputs (KVCache(keep_inputs=True)), to complete skipped heads")
        cache_k, cache_v = cache.layer(layer_id)
        xs, valid = cache.layer_inputs(layer_id)
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
                xs[s, p] = xt.to(xs.dtype)
                valid[s, :, p] = False  # this position's other heads are now stale
                q = qkv_projection(xt, resident, heads, locs, cache_k, cache_v, s, p, host=host,
                                   split_c=sparse_backend.ATTENTION_ARGS["qkv_split_c"])
                valid[s[:, None], idx[None, :], p[:, None]] = True
                recomputed += self._fill_missing(cache_k, cache_v, xs, valid, idx, locs, s, p)
                a = decode_attention(q, heads, cache_k, cache_v, s, p,
                                     chunk=sparse_backend.ATTENTION_ARGS["chunk"])
                out[rows, t] = out_projection(a, resident, locs, host=host,
                                              bias=self.out_proj_bias)
        if batch.sparse is not None:
            batch.sparse.stats.layer(layer_id).kv_recomputed += recomputed
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
            valid[s_all, int(idx[j]), p_all] = True
        return int(bi.numel())


def offload_layers(model: OPTModel, layer_ids: list[int], *, device: torch.device | str,
                   pin: bool | None = None,
                   placements: dict[int, LayerPlacement] | None = None) -> None:
    """Move layers ``layer_ids`` of ``model`` to host records (pinned when ``pin``, default:
    on a CUDA device) with the hot rows of ``placements`` (default: none) cached on
    ``device``, and route their sparse ops there."""
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
        layer = by_id[lid]
        host = host_layer_from_module(layer, layout, dtype=dtype, pin=pin)
        none = torch.empty(0, dtype=torch.long)
        place = (placements or {}).get(lid, LayerPlacement(lid, none, none, False))
        rows = ResidentLayer(host, place, layout, device)
        bias = layer.fc2.bias, layer.self_attn.out_proj.bias
        sparse_backend.register_offloaded(layer, OffloadedLayer(rows, *bias))
        for name in BIG:
            module_name, _, pname = name.rpartition(".")
            module = layer.get_submodule(module_name)
            p = getattr(module, pname)
            if p is not None:
                setattr(module, pname, torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))


def fit_budget(model: OPTModel, budget_bytes: int, *, device: torch.device | str,
               reserved_bytes: int = 0) -> list[int]:
    """Hold ``model`` within ``budget_bytes`` of ``device`` memory: offload the layers that
    do not fit (``plan_offload``), then move the rest of the model to ``device``. Load the
    model on the CPU first, so that offloaded layers never occupy the GPU. Returns the
    offloaded layer ids (run the engine with an ``OffloadSelector`` over them)."""
    layers = plan_offload(model, budget_bytes, reserved_bytes)
    offload_layers(model, layers, device=device)
    move_resident(model, device)
    return layers


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

    def __call__(self, layer_id: int, source: Tensor) -> Selection:
        sel = self.inner(layer_id, source)
        if layer_id in self.offloaded:
            b, t = source.shape[:2]
            full = dict(dtype=torch.bool, device=source.device)
            if sel.neurons is None:
                sel = Selection(heads=sel.heads, neurons=torch.ones(b, t, self.ffn, **full))
            if sel.heads is None:
                sel = Selection(heads=torch.ones(b, t, self.heads, **full), neurons=sel.neurons)
        return sel
