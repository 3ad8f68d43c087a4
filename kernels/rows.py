"""Where a selected row lives, for every kernel that reads rows: the resident table on the
device, or (a negative location) the host table of an offloaded layer, read in place.

Locations: ``loc >= 0`` is row ``loc`` of the resident table, ``loc < 0`` row ``-loc - 1``
of the host table (runtime/weight_store.py builds them).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def rows_of(locs_ptr, offs_n, n_mask, dev_ptr, host_ptr, stride, HAS_HOST: tl.constexpr):
    """Row pointers [BLOCK_N] of the selected neurons in the resident or the host table."""
    loc = tl.load(locs_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    if HAS_HOST:
        on_host = loc < 0
        row = tl.where(on_host, -loc - 1, loc)
        return tl.where(on_host, host_ptr + row * stride, dev_ptr + row * stride)
    return dev_ptr + loc * stride


def check_ids_on_cpu(ids: Tensor, lo: int, hi: int, what: str,
                     count: Tensor | None = None) -> None:
    """Raise unless every entry of ``ids`` (its first ``count``, a device count, if given)
    lies in [lo, hi), where that is cheap: on a CPU. On a GPU the check would read the
    device from the host (a synchronisation per launch), so device ids are not checked; a
    counter of a step's synchronisations leaves this function's reads out."""
    if ids.device.type != "cpu":
        return
    if count is not None:
        ids = ids[: int(count.max())]
    if ids.numel() and (int(ids.min()) < lo or int(ids.max()) >= hi):
        raise ValueError(f"{what} out of range [{lo}, {hi})")
