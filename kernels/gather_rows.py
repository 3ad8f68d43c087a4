"""Gather whole rows of a table into the front of another: out[i] = src[ids[i]].

The offload path's staged reads: the rows a step selects, read once from mapped pinned host
memory (``host_memory.device_view``) into a device buffer that the sparse kernels then read
at device speed. ``torch.index_select`` does the same with one element per thread; over
PCIe that is many small transactions, so here each program moves one contiguous piece of a
row as 8-byte words (16-byte vector loads per thread), the pattern the in-place kernels read
at near the link's rate. ``gather_rows_reference`` is the plain PyTorch twin.

What this module does not know: which rows are needed (selectors) or where tables live
(runtime/weight_store.py, runtime/row_stream.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .rows import check_ids_on_cpu


@triton.jit
def _gather_rows_kernel(
    src_ptr,  # [N, row_words] int64 words: the source table (mapped host memory on a GPU)
    ids_ptr,  # [K] int32/int64: source row of each output row
    out_ptr,  # [>= K, row_words] int64 words: the destination, rows 0..K-1 written
    count_ptr,  # [1] int32: rows past this count are not read (HAS_COUNT)
    row_words,  # words per row
    stride_src, stride_out,  # row strides in words
    BLOCK: tl.constexpr,  # words per program (one piece of one row)
    HAS_COUNT: tl.constexpr,  # the valid ids are the first count_ptr[0] (a device count)
):
    r = tl.program_id(0)
    if HAS_COUNT:
        if r >= tl.load(count_ptr):
            return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_words
    row = tl.load(ids_ptr + r).to(tl.int64)
    v = tl.load(src_ptr + row * stride_src + offs, mask=mask)
    tl.store(out_ptr + r * stride_out + offs, v, mask=mask)


def _words(t: Tensor) -> Tensor:
    """``t`` [N, L] (rows contiguous, L * element size a multiple of 8) as int64 words."""
    return t.view(torch.int64)


def gather_rows(src: Tensor, ids: Tensor, out: Tensor, *, count: Tensor | None = None,
                block: int = 1024, num_warps: int = 4) -> Tensor:
    """out[i] = src[ids[i]] for i < len(ids); returns out[:len(ids)]. src, out: [*, L] of one
    dtype with contiguous rows whose bytes are a multiple of 8 and 8-byte aligned; ids on
    the device, not range-checked there (a check would synchronise). ``count``: [1] int32
    on the device, the valid ids at the front of ``ids`` (a padded union): only those rows
    are read and written, with no host read of the count."""
    if src.dim() != 2 or out.dim() != 2 or src.shape[1] != out.shape[1]:
        raise ValueError(f"src {tuple(src.shape)} and out {tuple(out.shape)}: expected [*, L] "
                         "with the same L")
    if src.dtype != out.dtype or src.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("src and out: one dtype, contiguous rows")
    row_bytes = src.shape[1] * src.element_size()
    for name, t in (("src", src), ("out", out)):
        if row_bytes % 8 or (t.stride(0) * t.element_size()) % 8 or t.data_ptr() % 8:
            raise ValueError(f"{name}: rows must be whole, aligned 8-byte words")
    k = ids.numel()
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64) or k > out.shape[0]:
        raise ValueError(f"ids: expected at most {out.shape[0]} int32/int64 row ids, got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    if count is not None and (count.numel() != 1 or count.dtype != torch.int32
                              or count.device != ids.device):
        raise ValueError(f"count: expected [1] int32 beside ids, got {count.dtype} "
                         f"{tuple(count.shape)} on {count.device}")
    check_ids_on_cpu(ids, 0, src.shape[0], "ids", count)
    if k:
        words = row_bytes // 8
        s, o = _words(src), _words(out)
        _gather_rows_kernel[(k, triton.cdiv(words, block))](
            s, ids, o, ids if count is None else count, words, s.stride(0), o.stride(0),
            BLOCK=block, HAS_COUNT=count is not None, num_warps=num_warps)
    return out[:k]


def gather_rows_reference(src: Tensor, ids: Tensor, out: Tensor, *,
                          count: Tensor | None = None) -> Tensor:
    """The plain PyTorch twin (it reads ``count`` from the device)."""
    k = ids.numel() if count is None else int(count)
    torch.index_select(src, 0, ids[:k].long(), out=out[:k])
    return out[:ids.numel()]
