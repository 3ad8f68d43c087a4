"""Prefill of offloaded layers by streaming: each layer's rows cross the link once per
chunk, into reused GPU buffers, and the chunk runs through ordinary dense/sparse math.

A prefill chunk of many tokens selects most rows, and the decode kernels take one token per
batch row: run token by token, an offloaded layer would read its selected rows once per
prompt token. Here a layer of a multi-token step is instead brought to the device once
(design.md, "Prefill is not decode"), per block (heads for attention, neurons for the MLP):

- the whole block, one copy from pinned memory on a copy stream (the link's full rate, no
  SM time), or
- the union of rows the step's tokens select, gathered into the buffer's first rows, when
  those are fewer than ``UNION_BELOW`` of the block (a gather reads a little slower than a
  copy and cannot be issued before the layer's selection exists).

``RowStream`` owns two slots (double buffering), each one layer's neuron and head records.
Offloaded layers take slots in turn (the k-th offloaded layer of a model slot k % 2), and
while layer k computes, the copy of layer k+1's whole blocks into the other slot is already
running: issued when layer k's block starts, if layer k's own union of that block was wide
enough that a whole copy was the cheaper choice (the next layer of the same chunk selects
alike). The copy stream waits for the event recorded after the slot's previous layer
finished reading it; the compute stream waits for the copy's event. A slot's content is
tagged with its layer and kind, so a whole block that is still there is used again with no
copy (weights never change). On a CPU (tests) the copies run inline.

The math (``streamed_mlp``, ``streamed_attention``) is runtime/sparse.py's gather path over
the buffer's tables instead of the module's parameters. With a whole head block in the
buffer, K/V of every head are written for the chunk and completed over the prefix (compute
only, nothing crosses the link), so decode steps find the prompt's K/V complete; with a
union, only the union's heads, as the resident path does.

What this module does not know: which rows are selected (selectors), where the records come
from (runtime/weight_store.py), or when a step is a prefill (runtime/offload.py decides).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.env import interpreting
from .attention import masked_attention
from .lazy_kv import flag, keep_recomputed
from .weight_store import RecordLayout, head_rows, neuron_rows

# Below this fraction of a block's rows a step gathers its union instead of copying the
# whole block (bytes; the gather's lower rate, about 0.85-0.93 of a copy's on an H100/H200,
# and losing the prefetch overlap make a whole copy the better choice well before 1.0).
UNION_BELOW = 0.5
SLOTS = 2


@dataclass
class _Block:
    """One slot's buffer for one kind of record, and what it holds."""

    buffer: Tensor  # [rows, record_len] on the device
    owner: object | None = None  # the OffloadedLayer whose rows are in it
    whole: bool = False  # every row (in id order), else the first ``rows`` of a union
    rows: int = 0
    ready: object | None = None  # cuda Event after the copy (None: ready now)
    free: object | None = None  # cuda Event after the last read of the previous owner


class RowStream:
    """Double-buffered device copies of offloaded layers' records (see the module text)."""

    def __init__(self, layout: RecordLayout, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        # Zeroed once: rows past a padded union's count are read by the decode kernels
        # (their results masked out), so every row must hold finite values, never garbage.
        self.slots = [{"neurons": _Block(torch.zeros((layout.ffn, layout.neuron_len),
                                                     dtype=dtype, device=self.device)),
                       "heads": _Block(torch.zeros((layout.heads, layout.head_len),
                                                   dtype=dtype, device=self.device))}
                      for _ in range(SLOTS)]
        self.copied_bytes = 0  # bytes brought over, whole or gathered (tests, reports)

    def nbytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size()
                   for slot in self.slots for b in slot.values())

    # --- transfers ----------------------------------------------------------------------

    def _claim(self, block: _Block) -> None:
        """Before overwriting ``block``: the copy stream waits until its last reader is
        done."""
        if self.cuda and block.free is not None:
            self.copy_stream.wait_event(block.free)

    def prefetch_whole(self, owner, slot: int, kind: str, host: Tensor) -> int:
        """Issue the whole-block copy of ``owner``'s ``kind`` records (host [rows, len],
        pinned on a GPU) into ``slot`` unless it is there already. Returns bytes copied."""
        block = self.slots[slot][kind]
        if block.owner is owner and block.whole:
            return 0
        self._claim(block)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                block.buffer.copy_(host, non_blocking=True)
                block.ready = torch.cuda.Event()
                block.ready.record(self.copy_stream)
        else:
            block.buffer.copy_(host)
            block.ready = None
        block.owner, block.whole, block.rows = owner, True, host.shape[0]
        n = host.numel() * host.element_size()
        self.copied_bytes += n
        return n

    def gather(self, owner, slot: int, kind: str, host_view: Tensor, ids: Tensor,
               count: Tensor | None = None) -> int:
        """Rows ``ids`` of ``owner``'s records into the first rows of ``slot``'s buffer
        (``host_view``: the records as the device reads them, a mapped view on a GPU).
        Runs on the current stream: it is issued when the rows are needed. ``count``: [1]
        int32 on the device, the valid ids at the front (a padded union): only those rows
        cross, and the bytes are then not known here (returns 0; the caller counts them on
        the device). Returns bytes."""
        block = self.slots[slot][kind]
        if self.cuda and block.free is not None:
            torch.cuda.current_stream().wait_event(block.free)
        return self._gather_into(block, owner, host_view, ids.to(host_view.device), count)

    def _gather_into(self, block: _Block, owner, host_view: Tensor, ids: Tensor,
                     count: Tensor | None = None) -> int:
        """Rows ``ids`` (the first ``count``) into ``block`` on the current stream; its tags
        say so. Bytes (0 with a count)."""
        n = ids.numel()
        if self.cuda or interpreting():  # 16-byte reads per thread (kernels/gather_rows.py)
            from ..kernels.gather_rows import gather_rows
            gather_rows(host_view, ids, block.buffer, count=count)
        else:  # host memory on a CPU: the padding's rows are copied too (no link to spare)
            torch.index_select(host_view, 0, ids, out=block.buffer[:n])
        block.owner, block.whole, block.rows, block.ready = owner, False, n, None
        if count is not None:
            return 0
        nbytes = n * block.buffer.shape[1] * block.buffer.element_size()
        self.copied_bytes += nbytes
        return nbytes

    def gather_ahead(self, owner, slot: int, kind: str, host_view: Tensor, ids: Tensor,
                     count: Tensor | None = None) -> int:
        """``gather`` issued on the copy stream, so that the rows cross the link while the
        current stream computes (a decode step's rows, requested as soon as the selection
        exists). The copy stream first waits for the work issued so far on the current
        stream (which made ``ids``) and for the slot's last reader; ``acquire`` waits for
        the copy. On a CPU it runs inline. Returns bytes."""
        block = self.slots[slot][kind]
        ids = ids.to(host_view.device)
        if not self.cuda:
            return self._gather_into(block, owner, host_view, ids, count)
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        self._claim(block)
        with torch.cuda.stream(self.copy_stream):
            nbytes = self._gather_into(block, owner, host_view, ids, count)
            block.ready = torch.cuda.Event()
            block.ready.record(self.copy_stream)
        ids.record_stream(self.copy_stream)  # made on the current stream, read on this one
        if count is not None:
            count.record_stream(self.copy_stream)
        return nbytes

    def acquire(self, slot: int, kind: str) -> Tensor:
        """The slot's buffer, once its copy is done (the current stream waits for it)."""
        block = self.slots[slot][kind]
        if self.cuda and block.ready is not None:
            torch.cuda.current_stream().wait_event(block.ready)
        return block.buffer

    def release(self, slot: int, kind: str) -> None:
        """The current stream has issued its last read of the slot's buffer: a later copy
        into it must wait for that."""
        if self.cuda:
            block = self.slots[slot][kind]
            block.free = torch.cuda.Event()
            block.free.record(torch.cuda.current_stream())

    def holds_whole(self, owner, slot: int, kind: str) -> bool:
        block = self.slots[slot][kind]
        return block.owner is owner and block.whole


# --- the math over the buffers' tables ----------------------------------------------------


def streamed_mlp(records: Tensor, hidden: int, x: Tensor, idx: Tensor | None,
                 fc2_bias: Tensor | None) -> Tensor:
    """fc2(relu(fc1(x))) over neurons ``idx`` of ``records`` (None: every row of it, the
    rows being a gathered union already); x [B, T, C]. As runtime/sparse.py's gather."""
    rows = neuron_rows(records, hidden)
    w1, b1, w2t = rows.w1, rows.b1, rows.w2t
    if idx is not None:
        w1, b1, w2t = w1.index_select(0, idx), b1.index_select(0, idx), w2t.index_select(0, idx)
    return F.linear(F.relu(F.linear(x, w1, b1)), w2t.t(), fc2_bias)


def streamed_attention(records: Tensor, layout: RecordLayout, x: Tensor, heads: Tensor,
                       table_idx: Tensor | None, kv_every_head: bool, cache_k: Tensor,
                       cache_v: Tensor, xs: Tensor | None, valid: Tensor | None,
                       slots: Tensor, positions: Tensor, length: int,
                       out_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention of heads ``heads`` (sorted ids) for a chunk x [B, T, C] (post-LN), out_proj
    and its bias included, from head records in ``records``: row ``table_idx[j]`` holds head
    ``heads[j]`` (None: row j). ``kv_every_head``: ``records`` holds every head in id order;
    K/V of all heads are then written for the chunk and completed over the prefix. Stores
    the chunk's inputs and validity as runtime/sparse.py's lazy K/V scheme (``xs``/``valid``
    None: a cache without inputs, for steps that keep every head). Returns
    ([B, T, C], K/V (position, head) pairs recomputed)."""
    b, t, c = x.shape
    d = layout.head_dim
    table = head_rows(records, c, d)  # wqkv [3, N, D, C], bqkv [3, N, D], wo [N, D, C]
    rows = torch.arange(heads.numel(), device=x.device) if table_idx is None else table_idx
    kv_rows = torch.arange(layout.heads, device=x.device) if kv_every_head else rows
    kv_heads = kv_rows if kv_every_head else heads
    # This step's inputs kept, this position stale for every head, then the K/V written
    # (``xs`` None: a cache without inputs, whose steps keep every head: K/V only).
    r2 = slots[:, None].expand_as(positions)
    if xs is not None:
        xs[r2, positions] = x.to(xs.dtype)
        valid[r2, :, positions] = flag(False, valid)
    k, v = _kv(table, kv_rows, x.reshape(b * t, c), d)  # [B*T, h, D]
    r3, p3 = r2[..., None], positions[..., None]
    cache_k[r3, kv_heads, p3] = k.view(b, t, -1, d).to(cache_k.dtype)
    cache_v[r3, kv_heads, p3] = v.view(b, t, -1, d).to(cache_v.dtype)
    recomputed = torch.zeros((), dtype=torch.long, device=x.device)
    if xs is not None:
        valid[r3, kv_heads, p3] = flag(True, valid)
        recomputed = complete_kv(table, kv_rows, kv_heads, cache_k, cache_v, xs, valid, slots,
                                 positions, length)
    wq = table.wqkv[0].index_select(0, rows).reshape(-1, c)
    bq = table.bqkv[0].index_select(0, rows).reshape(-1)
    q = (F.linear(x, wq, bq) * d**-0.5).view(b, t, -1, d).transpose(1, 2)  # [B, h, T, D]
    keys = cache_k[slots[:, None], heads[None, :], :length]  # [B, h, L, D]
    values = cache_v[slots[:, None], heads[None, :], :length]
    visible = torch.arange(length, device=x.device)[None, None, :] <= positions[:, :, None]
    out = masked_attention(q, keys.to(q.dtype), values.to(q.dtype), visible[:, None])
    out = out.transpose(1, 2).reshape(b, t, -1)  # [B, T, h*D]
    wo = table.wo.index_select(0, rows).reshape(-1, c)  # [h*D, C]
    return F.linear(out, wo.t(), out_bias), recomputed


def _kv(table, rows: Tensor | int, x: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """K and V [M, h, D] of heads at ``rows`` of ``table`` (an int k: its first k rows, read
    in place) for inputs x [M, C]."""
    c = x.shape[-1]
    out = []
    for which in (1, 2):
        if isinstance(rows, int):
            w = table.wqkv[which][:rows].reshape(-1, c)
            bias = table.bqkv[which][:rows].reshape(-1)
        else:
            w = table.wqkv[which].index_select(0, rows).reshape(-1, c)
            bias = table.bqkv[which].index_select(0, rows).reshape(-1)
        out.append(F.linear(x, w, bias).view(x.shape[0], -1, d))
    return out[0], out[1]


def complete_kv(table, rows: Tensor | int, heads: Tensor, cache_k: Tensor, cache_v: Tensor,
                xs: Tensor, valid: Tensor, slots: Tensor, positions: Tensor,
                length: int, live: Tensor | None = None) -> Tensor:
    """K/V of ``heads`` (rows ``rows`` of ``table``; an int k: its first k rows in order)
    at every position up to each row's last where they are missing, from the stored
    inputs, in one pass over the prefix (no loop per head, no host synchronisation; the
    heads' rows are on the device, so only compute is spent: every prefix position of every
    given head is computed and kept where it was missing). ``live`` [h] bool: which entries
    of ``heads`` count (a padded union's; the others are left as they are). Returns the
    (position, head) pairs filled, a device scalar."""
    b, h = slots.numel(), heads.numel()
    k, v = _kv(table, rows, xs[slots, :length].reshape(b * length, -1), cache_k.shape[-1])
    return keep_recomputed(cache_k, cache_v, valid, heads, slots, positions,
                           k.view(b, length, h, -1), v.view(b, length, h, -1), live)
