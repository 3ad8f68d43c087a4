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
  their missing K/V recomputed (sparse.py's ``_fill_missing_kv``) before attending.

The backend is chosen per model with ``use_backend`` ([sparsity] backend in dejavu.toml):
"torch", "triton", or "auto" (the default, also for a model never configured): Triton on
CUDA for float16/bfloat16 weights, torch otherwise. The kernels support only those two
dtypes; asking for "triton" elsewhere is a ``BackendError`` naming the fix.

Kernel-ready weights are prepared lazily, once per layer (not per token), and rebuilt only
if the layer's parameters change (moved, reloaded): fc1 rows as they are, fc2 transposed
so that a neuron's column is a contiguous row, q/k/v stacked as [3, H, D, C] and out_proj's
columns per head as [H, D, C]. They are copies: the Triton backend costs one extra fc2 and
one extra set of attention weights per layer in memory (``prepared_bytes``).

Triton is imported only when the kernels are first used, so that a CPU run never imports
it and tests can set TRITON_INTERPRET=1 first.

What this module does not know: which rows are selected (selectors), where weights live
beyond the module's own parameters (runtime/weight_store.py does offloading).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import Batch, OPTAttention, OPTDecoderLayer

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # = kernels.sparse_mlp.SUPPORTED_DTYPES
MAX_BATCH = 16  # = kernels.sparse_mlp.MAX_BATCH: token rows one kernel launch takes

# Launch shapes: the fastest measured on an H200 at OPT-13B shapes (bench/results,
# 2026-11-27: MLP block_n 32 / split_c 256 at batch 1 and 8; attention qkv_split_c 256,
# split_h auto, chunk 64).
MLP_ARGS: dict[str, Any] = {"block_n": 32, "split_c": 256, "num_warps": 4}
ATTENTION_ARGS: dict[str, Any] = {"qkv_split_c": 256, "chunk": 64}


class BackendError(ValueError):
    """A backend that cannot run this model here; the message names the setting and fix."""


# Per decoder layer and per attention module: the chosen backend ("torch" | "triton"), and
# the prepared weights (MLP tables on the layer, head tables on its attention module).
_CHOICE: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_PREPARED: weakref.WeakKeyDictionary[torch.nn.Module, _Prepared] = weakref.WeakKeyDictionary()


def _interpreting() -> bool:
    # Triton's CPU interpreter (tests): the kernels then run on CPU tensors.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    if device.type != "cuda" and not _interpreting():
        raise BackendError(f"[sparsity] backend = 'triton': the model is on {device}; the "
                           "kernels need a CUDA device (or TRITON_INTERPRET=1 in tests); use "
                           "backend = \"auto\" or \"torch\"")
    return "triton"


def use_backend(model: torch.nn.Module, backend: str) -> str:
    """Run ``model``'s sparse ops on ``backend``; returns the resolved one. ``model`` is an
    OPTModel (every layer) or a single OPTDecoderLayer."""
    layers = [m for m in model.modules() if hasattr(m, "fc1") and hasattr(m, "self_attn")]
    if not layers:
        raise BackendError(f"{type(model).__name__} has no decoder layers to configure")
    w = layers[0].fc1.weight
    chosen = resolve(backend, w.device, w.dtype)
    for layer in layers:
        for module in (layer, layer.self_attn):
            _CHOICE[module] = chosen
            if chosen == "torch":
                _PREPARED.pop(module, None)
    return chosen


def backend_of(module: torch.nn.Module) -> str:
    """A layer's (or attention module's) configured backend, else "auto" resolved from its
    weights."""
    chosen = _CHOICE.get(module)
    if chosen is None:
        w = next(module.parameters())
        chosen = resolve("auto", w.device, w.dtype)
    return chosen


# --- prepared weights -------------------------------------------------------------------------


@dataclass
class _Prepared:
    key: tuple  # identity of the parameters the copies came from
    mlp: Any = None  # kernels.sparse_mlp.NeuronRows
    heads: Any = None  # kernels.sparse_attention.HeadRows

    def nbytes(self) -> int:
        out = 0
        if self.mlp is not None:  # w1 is the parameter itself; w2t and a zero bias are new
            out += self.mlp.w2t.numel() * self.mlp.w2t.element_size()
        if self.heads is not None:
            out += sum(t.numel() * t.element_size() for t in self.heads)
        return out


def _prepared(module: torch.nn.Module, params: list[Tensor | None]) -> _Prepared:
    """``module``'s prepared weights, dropped when one of ``params`` (their sources) moved
    or was reloaded in place (a new data_ptr or _version)."""
    key = tuple(None if p is None else (p.data_ptr(), p._version, p.dtype, p.device)
                for p in params)
    prep = _PREPARED.get(module)
    if prep is None or prep.key != key:
        prep = _PREPARED[module] = _Prepared(key)
    return prep


def _copying():
    # Prepared weights outlive the forward pass that builds them: make them ordinary
    # tensors even inside the engine's inference_mode.
    return torch.inference_mode(False)


def mlp_rows(layer: OPTDecoderLayer):
    """The layer's neurons as one kernel table (built on first use, then cached)."""
    from ..kernels.sparse_mlp import NeuronRows

    fc1, fc2 = layer.fc1, layer.fc2
    prep = _prepared(layer, [fc1.weight, fc1.bias, fc2.weight])
    if prep.mlp is None:
        with _copying(), torch.no_grad():
            w1 = fc1.weight.detach().contiguous()
            b1 = fc1.bias.detach() if fc1.bias is not None else w1.new_zeros(w1.shape[0])
            prep.mlp = NeuronRows(w1, fc2.weight.detach().t().contiguous(), b1)
    return prep.mlp


def head_table(attn: OPTAttention):
    """The attention module's heads as one kernel table (built on first use, then cached)."""
    from ..kernels.sparse_attention import split_head_rows

    prep = _prepared(attn, list(attn.parameters()))
    if prep.heads is None:
        c = attn.q_proj.weight.shape[1]
        with _copying(), torch.no_grad():
            def bias(lin: torch.nn.Linear) -> Tensor:
                w = lin.weight.detach()
                return lin.bias.detach() if lin.bias is not None else w.new_zeros(c)
            prep.heads = split_head_rows(
                attn.q_proj.weight.detach(), bias(attn.q_proj),
                attn.k_proj.weight.detach(), bias(attn.k_proj),
                attn.v_proj.weight.detach(), bias(attn.v_proj),
                attn.out_proj.weight.detach(), attn.num_heads)
    return prep.heads


def prepared_bytes(model: torch.nn.Module) -> int:
    """Memory held by the prepared kernel weights of ``model``'s layers."""
    return sum(p.nbytes() for m, p in list(_PREPARED.items()) if _is_part(m, model))


def _is_part(module: torch.nn.Module, model: torch.nn.Module) -> bool:
    return any(m is module for m in model.modules())


def release(model: torch.nn.Module) -> None:
    """Drop the prepared weights of ``model``'s layers (they are rebuilt on next use)."""
    for m in list(_PREPARED.keys()):
        if _is_part(m, model):
            del _PREPARED[m]


# --- the ops ----------------------------------------------------------------------------------


def mlp_kernel_applies(layer: OPTDecoderLayer, x: Tensor) -> bool:
    """Whether ``mlp_gather`` takes this gather-mode MLP. x: [B, T, C]."""
    return (backend_of(layer) == "triton" and x.dtype in KERNEL_DTYPES
            and 1 <= x.shape[0] * x.shape[1] <= MAX_BATCH)


def mlp_gather(layer: OPTDecoderLayer, x: Tensor, idx: Tensor) -> Tensor:
    """fc2(relu(fc1(x))) over neurons ``idx`` (the batch's union) through the kernel.
    x: [B, T, C] with B*T <= MAX_BATCH. Returns [B, T, C], fc2's bias included."""
    from ..kernels.sparse_mlp import sparse_mlp as kernel

    b, t, c = x.shape
    out = kernel(x.reshape(b * t, c).contiguous(), mlp_rows(layer), idx,
                 bias2=layer.fc2.bias, **MLP_ARGS)
    return out.view(b, t, c)


def attention_kernel_applies(attn: OPTAttention, x: Tensor, batch: Batch) -> bool:
    """Whether ``attention_gather`` takes this gather-mode attention: a decode step (one
    token per row, at most MAX_BATCH rows) on a cache that keeps attention inputs (the lazy
    K/V scheme; without stored inputs every head's K/V is computed, which the kernels do not
    do)."""
    cache = batch.cache
    return (backend_of(attn) == "triton" and cache is not None
            and cache.inputs is not None and x.dtype in KERNEL_DTYPES
            and cache.k.dtype == x.dtype and x.shape[1] == 1
            and 1 <= x.shape[0] <= MAX_BATCH)


def attention_gather(attn: OPTAttention, x: Tensor, layer_id: int, batch: Batch,
                     idx: Tensor) -> Tensor:
    """Attention of heads ``idx`` (sorted, the batch's union) for a decode step, through the
    kernels, out_proj (with its bias) included. x: [B, 1, C] (post-LN). Returns [B, 1, C]."""
    from ..kernels.sparse_attention import decode_attention, out_projection, qkv_projection
    from .sparse import _fill_missing_kv

    cache, slots, pos = batch.cache, batch.slots, batch.positions
    assert cache is not None and slots is not None
    lid = layer_id
    cache_k, cache_v = cache.layer(lid)  # [S, H, L, D]
    xs, valid = cache.layer_inputs(lid)  # [S, L, C], [S, H, L]
    rows = slots[:, None].expand_as(pos)  # [B, 1]
    # As sparse._gathered_cached_attention: keep this step's input, mark the position stale
    # for every head, then write (and mark) the selected heads' K/V.
    xs[rows, pos] = x.to(xs.dtype)
    valid[rows, :, pos] = False
    heads = idx.to(torch.int32)
    p = pos[:, 0].contiguous()
    x2 = x[:, 0].contiguous()  # [B, C]
    table = head_table(attn)
    q = qkv_projection(x2, table, heads, heads, cache_k, cache_v, slots, p,
                       split_c=ATTENTION_ARGS["qkv_split_c"])  # [B, h, D], k/v into the cache
    valid[slots[:, None], idx[None, :], p[:, None]] = True
    recomputed = _fill_missing_kv(attn, cache_k, cache_v, xs, valid, idx, slots, pos)
    if batch.sparse is not None:
        batch.sparse.stats.layer(lid).kv_recomputed += recomputed
    out = decode_attention(q, heads, cache_k, cache_v, slots, p,
                           chunk=ATTENTION_ARGS["chunk"])  # [B, h, D]
    return out_projection(out, table, heads, bias=attn.out_proj.bias)[:, None, :]
