"""Pinned host tensors that GPU kernels read in place (zero-copy through unified addressing).

A pinned (page-locked) host buffer allocated by the CUDA runtime is mapped into the GPU's
address space; with unified virtual addressing its device address equals its host address.
Wrapping that address in an object with ``__cuda_array_interface__`` (version 3) makes
``torch.as_tensor(obj, device="cuda")`` return a CUDA tensor *aliasing host memory*: a
Triton kernel given it reads across PCIe, row by row, only what it touches.

What this module does not know: which rows are read (the kernels decide) or whether
reading in place beats staging copies (the weight store measures both).
"""

from __future__ import annotations

import torch
from torch import Tensor

# __cuda_array_interface__ has no bfloat16 type string; every 2-byte type travels as int16
# and is viewed back, which is exact (a reinterpretation, not a conversion).
_TYPESTR = {1: "|i1", 2: "<i2", 4: "<i4", 8: "<i8"}
_CARRIER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _MappedHostArray:
    """Holds the pinned tensor alive and describes it as a CUDA array."""

    def __init__(self, host: Tensor) -> None:
        size = host.element_size()
        self._host = host  # keep the pinned storage alive as long as a view exists
        self.__cuda_array_interface__ = {
            "version": 3,
            "shape": tuple(host.shape),
            "typestr": _TYPESTR[size],
            "strides": tuple(s * size for s in host.stride()),
            "data": (host.data_ptr(), False),
        }


def device_view(host: Tensor) -> Tensor:
    """A CUDA tensor aliasing the pinned host tensor ``host`` (same shape, strides, dtype).

    Writes through either alias are visible to the other (after synchronisation). The
    returned tensor keeps ``host`` alive. Raises ValueError for a tensor that is not pinned
    CPU memory, since mapping pageable memory would read garbage or fault.
    """
    if host.device.type != "cpu":
        raise ValueError(f"device_view needs a CPU tensor, got one on {host.device}")
    if not host.is_pinned():
        raise ValueError("device_view needs pinned memory: allocate with pin_memory=True")
    if host.element_size() not in _TYPESTR:
        raise ValueError(f"device_view: unsupported element size {host.element_size()}")
    if not torch.cuda.is_available():
        raise RuntimeError("device_view needs CUDA")
    carrier = torch.as_tensor(_MappedHostArray(host), device="cuda")
    view = carrier.view(host.dtype)
    if view.data_ptr() != host.data_ptr():
        raise RuntimeError("pinned memory is not mapped at its host address (no UVA?)")
    return view
