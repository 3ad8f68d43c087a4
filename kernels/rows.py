"""Where a selected row lives, for every kernel that reads rows: the resident table on the
device, or (a negative location) the host table of an offloaded layer, read in place.

Locations: ``loc >= 0`` is row ``loc`` of the resident table, ``loc < 0`` row ``-loc - 1``
of the host table (runtime/weight_store.py builds them).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rows_of(locs_ptr, offs_n, n_mask, dev_ptr, host_ptr, stride, HAS_HOST: tl.constexpr):
    """Row pointers [BLOCK_N] of the selected neurons in the resident or the host table."""
    loc = tl.load(locs_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    if HAS_HOST:
        on_host = loc < 0
        row = tl.where(on_host, -loc - 1, loc)
        return tl.where(on_host, host_ptr + row * stride, dev_ptr + row * stride)
    return dev_ptr + loc * stride
