"""Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``, how tests and CI run the
kernels): the kernels then take CPU tensors. Imports nothing heavy, so runtime modules can ask
before deciding to import triton."""

from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
