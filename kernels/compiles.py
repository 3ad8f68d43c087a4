"""Which Triton kernels compile while a block runs: each new specialization is a compile.

Triton compiles a kernel once per specialization of its arguments: dtypes, constexprs, and
for an integer argument whether it is 1 or a multiple of 16 (unless the kernel lists it in
``do_not_specialize``). A kernel taking a position or a length therefore compiles again
when a generation's position first reaches a multiple of 16 - hundreds of milliseconds
inside a decode step or a prefill. ``Compiles`` records the kernels compiled while it is
entered (through Triton's ``jit_cache_hook``, called before each compile), so that tests
can require none after warm-up and benchmarks can say whether a timed span held any.

Under the interpreter (``TRITON_INTERPRET=1``) nothing compiles and nothing is recorded.
"""

from __future__ import annotations


def _hooks():
    """(get, set) of Triton's pre-compile hook, wherever this Triton keeps it; None without
    Triton (not installed off Linux), where nothing compiles."""
    try:
        from triton import knobs

        if hasattr(knobs.runtime, "jit_cache_hook"):
            return (lambda: knobs.runtime.jit_cache_hook,
                    lambda hook: setattr(knobs.runtime, "jit_cache_hook", hook))
    except ImportError:
        pass
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    return (lambda: JITFunction.cache_hook,
            lambda hook: setattr(JITFunction, "cache_hook", hook))


class Compiles:
    """``with Compiles() as c: ...`` then ``c.names``: the kernels compiled inside, one entry
    per compile. A hook already installed keeps being called (its answer is kept: a true
    answer tells Triton to skip the compile)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._get, self._set = _hooks() or (lambda: None, lambda hook: None)
        self._before = None

    def __enter__(self) -> Compiles:
        self._before = before = self._get()

        def hook(*args, **kwargs):
            # fn.name is the kernel's qualified name; the function's own name is its last part.
            name = getattr(kwargs.get("fn"), "name", None) or str(kwargs.get("repr", "?"))
            self.names.append(name.rsplit(".", 1)[-1])
            return before(*args, **kwargs) if before is not None else None

        self._set(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._set(self._before)

    def __len__(self) -> int:
        return len(self.names)
