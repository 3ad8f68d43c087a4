"""Which code computes the sparse ops' selected rows: plain torch or the Triton kernels.

runtime/sparse.py owns the sparse math and keeps its torch code as the reference. In
gather mode it asks this module whether a kernel applies to the op at hand and, if so,
hands the op over:

- MLP (``mlp_gather``): kernels/sparse_mlp.py over the union of the batch's neurons, for
  up to ``MAX_BATCH`` token rows (decode steps and short prefills); more rows stay on torch,
  whose gathered GEMM reads each row once for all tokens, where the kernel is a GEMV;
- attention (``attention_gather``): kernels/sparse_attention.py's q/k/v projection (k, v
  written into the cache), decode attention and out_proj for the selected heads, for decode
  steps (one token per row) on a cache that keeps attention inputs. The lazy K/V scheme
  stays exact: this step's input is stored and the step's position marked stale for every
  head before the kernel writes the selected heads' K/V, and heads skipped earlier get
  their missing K/V recomputed (lazy_kv.py's ``complete_missing_kv``) before attending.

The backend is chosen per model with ``use_backend`` ([sparsity] backend in dejavu.toml):
"torch", "triton", or "auto" (the default, also for a model never configured): Triton on
CUDA for float16/bfloat16 weights, torch otherwise. The kernels support only those two
dtypes; asking for "triton" elsewhere is a ``BackendError`` naming the fix.

Kernel-ready weights are prepared lazily, once per layer (not per token), and rebuilt only
if the layer's parameters change (moved, reloaded): fc1 rows as they are, fc2 transposed
so that a neuron's column is a contiguous row, q/k/v stacked as [3, H, D, C] and out_proj's
columns per head as [H, D, C]. Copies of that size would add two thirds to a layer's
memory, which a GPU sized for the model does not have; so the layout is adopted in place:
the parameters become views of the kernel tables (same shapes and values, other strides;
dense and torch code read them through strides, and checkpoint.save_model copies each
tensor out contiguously). Only a layer without fc1/q/k/v biases gets small zero biases.

Triton is imported only when the kernels are first used, so that a CPU run never imports
it and tests can set TRITON_INTERPRET=1 first.

Layers held in host records (runtime/offload.py) register here; their sparse ops always
go to their ``OffloadedLayer``, whatever the backend, since their module weights are gone.

What this module does not know: which rows are selected (selectors), or where an offloaded
layer's rows live (runtime/offload.py, runtime/weight_store.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ..kernels.env import interpreting
from . import lazy_kv
from .lazy_kv import complete_missing_kv, fill_missing_kv_batched

if TYPE_CHECKING:
    from .model import Batch, OPTAttention, OPTDecoderLayer

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # = kernels.sparse_mlp.SUPPORTED_DTYPES
MAX_BATCH = 16  # = kernels.sparse_mlp.MAX_BATCH: token rows one kernel launch takes

# Launch shapes: the fastest measured at OPT-13B shapes (bench/results, 2026-11-27: MLP
# the chained kernel, one launch + a memset, on an H100; attention qkv_split_c 256,
# split_h auto, chunk 64, on an H200).
MLP_ARGS: dict[str, Any] = {"chained": True, "block_n": 32, "split_c": 256, "block_n2": 64,
                            "split_c2": 128, "num_warps": 2}
ATTENTION_ARGS: dict[str, Any] = {"qkv_split_c": 256, "chunk": 64}


class BackendError(ValueError):
    """A backend that cannot run this model here; the message names the setting and fix."""


# The state is the layer's own (runtime/model.py): each decoder layer and its attention
# module hold ``sparse_backend`` (the chosen one), ``kernel_table`` (the prepared weights:
# MLP tables on the layer, head tables on its attention module) and ``offloaded``.


def register_offloaded(layer: OPTDecoderLayer, ops: Any) -> None:
    """A layer held in host records (runtime/offload.py): ``ops`` has ``mlp(x, idx)`` and
    ``attention(attn, x, layer_id, batch, idx)``, and its sparse ops always go there,
    whatever the backend: the module's own weights are gone."""
    layer.offloaded = ops
    layer.self_attn.offloaded = ops


def is_offloaded(module: OPTDecoderLayer | OPTAttention) -> bool:
    return module.offloaded is not None


def _layers(model: torch.nn.Module) -> list[OPTDecoderLayer]:
    return [m for m in model.modules() if hasattr(m, "fc1") and hasattr(m, "self_attn")]


def offloaded_ops(module: torch.nn.Module) -> Any:
    """The ops (and host rows) registered for an offloaded layer; KeyError if it is not."""
    if module.offloaded is None:
        raise KeyError(f"{type(module).__name__} is not offloaded")
    return module.offloaded


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto" | "torch" | "triton" -> the backend that runs ("torch" or "triton")."""
    if backend not in BACKENDS:
        raise BackendError(f"[sparsity] backend = {backend!r}: expected one of "
                           f"{', '.join(map(repr, BACKENDS))}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype in KERNEL_DTYPES else "torch"
    if dtype not in KERNEL_DTYPES:
        raise BackendError(f"[sparsity] backend = 'triton': the kernels support float16 and "
                           f"bfloat16, the model is {dtype}; set [model] dtype = \"float16\" "
                           "or use backend = \"auto\" / \"torch\"")
    if device.type != "cuda" and not interpreting():
        raise BackendError(f"[sparsity] backend = 'triton': the model is on {device}; the "
                           "kernels need a CUDA device (or TRITON_INTERPRET=1 in tests); use "
                           "backend = \"auto\" or \"torch\"")
    return "triton"


def use_backend(model: torch.nn.Module, backend: str) -> str:
    """Run ``model``'s sparse ops on ``backend``; returns the resolved one. ``model`` is an
    OPTModel (every layer) or a single OPTDecoderLayer."""
    layers = _layers(model)
    if not layers:
        raise BackendError(f"{type(model).__name__} has no decoder layers to configure")
    resident = [m for m in layers if m.offloaded is None]
    if not resident:  # every layer runs on the kernels' host path anyway
        return "triton"
    w = resident[0].fc1.weight
    chosen = resolve(backend, w.device, w.dtype)
    for layer in layers:
        for module in (layer, layer.self_attn):
            module.sparse_backend = chosen
            if chosen == "torch":
                module.kernel_table = None
    return chosen


def backend_of(module: torch.nn.Module) -> str:
    """A layer's (or attention module's) configured backend, else "auto" resolved from its
    weights."""
    chosen = module.sparse_backend
    if chosen is None:
        w = next(module.parameters())
        chosen = resolve("auto", w.device, w.dtype)
    return chosen


# --- prepared weights -------------------------------------------------------------------------


def _key(params: list[Tensor | None]) -> tuple:
    # A parameter that moved or was reloaded in place changes data_ptr or _version.
    return tuple(None if p is None else (p.data_ptr(), p._version, p.dtype, p.device)
                 for p in params)


def _cached(module: torch.nn.Module, params: list[Tensor | None]) -> Any:
    """``module``'s table if its source parameters are still the ones it was built from."""
    entry = module.kernel_table
    return entry[1] if entry is not None and entry[0] == _key(params) else None


def _copying():
    # The new storage becomes the parameters': it must be ordinary tensors, not inference
    # tensors, even when the first use is inside the engine's inference_mode.
    return torch.inference_mode(False)


def _adopt(param: Tensor, view: Tensor) -> None:
    """Point ``param`` at ``view`` (same shape and values, the kernels' layout): the model and
    the kernels then share one copy of the weights. The old storage is freed."""
    assert view.shape == param.shape and view.dtype == param.dtype
    param.data = view


def mlp_rows(layer: OPTDecoderLayer):
    """The layer's neurons as one kernel table, built on first use. fc2's weight is re-laid
    out in place: it becomes the transposed view of a [F, C] tensor whose rows are its
    columns (values unchanged; dense and torch code read it through strides)."""
    from ..kernels.sparse_mlp import NeuronRows

    fc1, fc2 = layer.fc1, layer.fc2
    params = [fc1.weight, fc1.bias, fc2.weight]
    rows = _cached(layer, params)
    if rows is None:
        with _copying(), torch.no_grad():
            if not fc1.weight.is_contiguous():
                _adopt(fc1.weight, fc1.weight.detach().contiguous())
            w2 = fc2.weight.detach()
            w2t = w2.t() if w2.t().is_contiguous() else w2.t().contiguous()
            _adopt(fc2.weight, w2t.t())
            w1 = fc1.weight.detach()
            b1 = fc1.bias.detach() if fc1.bias is not None else w1.new_zeros(w1.shape[0])
            rows = NeuronRows(w1, w2t, b1)
        layer.kernel_table = (_key(params), rows)
    return rows


def head_table(attn: OPTAttention):
    """The attention module's heads as one kernel table, built on first use. The q, k, v
    weights (and biases) are re-laid out in place as views of one [3, H, D, C] tensor, and
    out_proj's weight as the transposed view of [H, D, C] (a head's columns as D rows)."""
    from ..kernels.sparse_attention import HeadRows

    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    params = list(attn.parameters())
    table = _cached(attn, params)
    if table is None:
        h, d = attn.num_heads, attn.head_dim
        c = attn.q_proj.weight.shape[1]
        with _copying(), torch.no_grad():
            wqkv = torch.stack([p.weight.detach() for p in projs]).view(3, h, d, c)
            bqkv = torch.stack([p.bias.detach() if p.bias is not None
                                else wqkv.new_zeros(c) for p in projs]).view(3, h, d)
            wo = attn.out_proj.weight.detach().t().reshape(h, d, c).contiguous()
            for i, p in enumerate(projs):
                _adopt(p.weight, wqkv[i].view(c, c))
                if p.bias is not None:
                    _adopt(p.bias, bqkv[i].view(c))
            _adopt(attn.out_proj.weight, wo.view(c, c).t())
            table = HeadRows(wqkv, bqkv, wo)
        attn.kernel_table = (_key(params), table)
    return table


def release(model: torch.nn.Module) -> None:
    """Forget the tables of ``model``'s modules (rebuilt on next use; the parameters keep
    the kernel layout, which every other path reads through strides)."""
    for layer in _layers(model):
        layer.kernel_table = layer.self_attn.kernel_table = None


# --- the ops ----------------------------------------------------------------------------------


def mlp_kernel_applies(layer: OPTDecoderLayer, x: Tensor) -> bool:
    """Whether ``mlp_gather`` takes this gather-mode MLP. x: [B, T, C]."""
    if layer.offloaded is not None:
        return True
    return (backend_of(layer) == "triton" and x.dtype in KERNEL_DTYPES
            and 1 <= x.shape[0] * x.shape[1] <= MAX_BATCH)


def mlp_gather(layer: OPTDecoderLayer, x: Tensor, idx: Tensor,
               count: Tensor | None = None, *, residual: Tensor | None = None,
               workspace: Tensor | None = None) -> Tensor:
    """fc2(relu(fc1(x))) over neurons ``idx`` (the batch's union) through the kernel.
    x: [B, T, C] with B*T <= MAX_BATCH. ``count``: [1] int32 on the device, the valid
    entries at the front of ``idx`` (a union compacted on the device; resident layers only).
    Returns [B, T, C], fc2's bias included, plus ``residual`` [B, T, C] if given (added in
    the kernel's epilogue, rounded once). ``workspace``: a zeroed int32 workspace of the
    chained kernel (kernels/mlp_chained.py) for this call alone, so that it launches no
    memset; the kernel leaves it used (the caller zeroes it before any other use)."""
    offloaded = layer.offloaded
    if offloaded is not None:
        if count is not None:
            raise BackendError("an offloaded layer takes its selection as indices, not a count")
        out = offloaded.mlp(x, idx)
        return out if residual is None else residual + out
    from ..kernels.sparse_mlp import sparse_mlp as kernel

    b, t, c = x.shape
    args = dict(MLP_ARGS)
    if workspace is not None and args.get("chained"):
        args.update(workspace=workspace, clean=False)
    res = None if residual is None else residual.reshape(b * t, c).contiguous()
    out = kernel(x.reshape(b * t, c).contiguous(), mlp_rows(layer), idx,
                 bias2=layer.fc2.bias, residual=res, count=count, **args)
    return out.view(b, t, c)


def attention_kernel_applies(attn: OPTAttention, x: Tensor, batch: Batch) -> bool:
    """Whether ``attention_gather`` takes this gather-mode attention: a decode step (one
    token per row, at most MAX_BATCH rows) on a cache that keeps attention inputs (the lazy
    K/V scheme; without stored inputs every head's K/V is computed, which the kernels do not
    do)."""
    if attn.offloaded is not None:
        return True
    cache = batch.cache
    return (backend_of(attn) == "triton" and cache is not None
            and cache.inputs is not None and x.dtype in KERNEL_DTYPES
            and cache.k.dtype == x.dtype and x.shape[1] == 1
            and 1 <= x.shape[0] <= MAX_BATCH)


def pads_resident(layer: OPTDecoderLayer, kind: str, shape: torch.Size, batch: Batch) -> bool:
    """Whether a resident layer's step of hidden shape [B, T, C] takes this kind's union
    ("heads" | "neurons") padded, its size left on the device (runtime/sparse.py's
    ``padded_union``), instead of read by the host: an eager decode step (one token per
    row, at most MAX_BATCH rows) whose op runs on the kernels. A host read there would wait
    for everything queued before it, offloaded layers' transfers included. A captured step
    compacts its unions on the device its own way (runtime/graphs.py)."""
    if batch.fixed_shape or shape[1] != 1 or not 1 <= shape[0] <= MAX_BATCH:
        return False
    if kind == "neurons":  # the one-kernel variant reads no count
        counts = bool(MLP_ARGS.get("chained") or MLP_ARGS.get("split_c"))
        return counts and backend_of(layer) == "triton" and \
            layer.fc1.weight.dtype in KERNEL_DTYPES
    # Heads: the padded step completes missing K/V over the whole prefix of every head it
    # runs, so only up to lazy_kv's bound for that one pass; past it the step reads its
    # union and completes the missing pairs alone (complete_missing_kv).
    attn, cache = layer.self_attn, batch.cache
    dtype = attn.q_proj.weight.dtype
    return (backend_of(attn) == "triton" and cache is not None and cache.inputs is not None
            and dtype in KERNEL_DTYPES and cache.k.dtype == dtype
            and shape[0] * batch.attended_length() <= lazy_kv.BATCHED_KV_POSITIONS)


def padding_live(idx: Tensor, count: Tensor) -> Tensor:
    """[n] bool: which entries of a padded union ``idx`` are selected (the first ``count``,
    a device value: no host read)."""
    return iota(idx.numel(), idx.device) < count


_IOTAS: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}


def iota(n: int, device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """``torch.arange(n)`` on ``device``, made once per size and dtype and kept (a decode
    step asks for the same few every layer: one launch each saved). Read only: never write
    into it."""
    key = (n, torch.device(device), dtype)
    got = _IOTAS.get(key)
    if got is None:
        got = _IOTAS[key] = torch.arange(n, dtype=dtype, device=device)
    return got


def zero_padding(out: Tensor, live: Tensor) -> Tensor:
    """Per-head attention outputs [B, n, D] with the padding heads' zeroed (``live`` [n]),
    so that they add nothing to out_proj (where, not a product: NaN-safe)."""
    return torch.where(live[None, :, None], out, torch.zeros((), dtype=out.dtype,
                                                             device=out.device))


def attention_gather(attn: OPTAttention, x: Tensor, layer_id: int, batch: Batch,
                     idx: Tensor, count: Tensor | None = None) -> Tensor:
    """Attention of heads ``idx`` (sorted, the batch's union) for a decode step, through the
    kernels, out_proj (with its bias) included. x: [B, 1, C] (post-LN). Returns [B, 1, C].
    ``count`` ([1] int32 on the device): ``idx`` is a padded union (``pads_resident``), every
    head with the selected ones first. The kernels then run every head: each head's K/V at
    this position is written and exact, the selected heads' missing ones are completed in
    one pass, and the others' outputs are zeroed before out_proj; nothing is read by the
    host."""
    offloaded = attn.offloaded
    if offloaded is not None:
        return offloaded.attention(attn, x, layer_id, batch, idx, count)
    from ..kernels.sparse_attention import decode_attention, out_projection, qkv_projection

    cache, slots, pos = batch.cache, batch.slots, batch.positions
    assert cache is not None and slots is not None
    lid = layer_id
    cache_k, cache_v = cache.layer(lid)  # [S, H, L, D]
    xs, valid = cache.layer_inputs(lid)  # [S, L, C], [S, H, L]
    rows = slots[:, None].expand_as(pos)  # [B, 1]
    # As sparse._gathered_cached_attention: keep this step's input, mark the position stale
    # for every head, then write (and mark) the selected heads' K/V.
    xs[rows, pos] = x.to(xs.dtype)
    valid[rows, :, pos] = lazy_kv.flag(False, valid)
    heads = idx.to(torch.int32)
    p = pos[:, 0].contiguous()
    x2 = x[:, 0].contiguous()  # [B, C]
    table = head_table(attn)
    q = qkv_projection(x2, table, heads, heads, cache_k, cache_v, slots, p,
                       split_c=ATTENTION_ARGS["qkv_split_c"])  # [B, h, D], k/v into the cache
    valid[slots[:, None], idx[None, :], p[:, None]] = lazy_kv.flag(True, valid)
    if count is None:
        filled = complete_missing_kv(attn, cache_k, cache_v, xs, valid, idx, slots, pos,
                                     batch.attended_length())
    else:
        live = padding_live(idx, count)
        filled = fill_missing_kv_batched(attn, cache_k, cache_v, xs, valid, idx, slots, pos,
                                         batch.attended_length(), live=live)
    if batch.sparse is not None:
        batch.sparse.stats.layer(lid).add_kv(filled)
    out = decode_attention(q, heads, cache_k, cache_v, slots, p,
                           chunk=ATTENTION_ARGS["chunk"])  # [B, h, D]
    if count is not None:
        out = zero_padding(out, live)
    return out_projection(out, table, heads, bias=attn.out_proj.bias)[:, None, :]
