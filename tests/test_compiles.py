"""kernels/compiles.py: the hook it puts in Triton's place records each compile, hands the
call on to a hook installed before it, and is taken out again on leaving."""

import sys
from types import SimpleNamespace

import pytest
import torch

from dejavu.kernels import compiles
from dejavu.kernels.compiles import Compiles


def test_records_each_compile_and_keeps_the_hook_before_it():
    get, set_ = compiles._hooks()
    saved, seen = get(), []

    def earlier(**kwargs):
        seen.append(kwargs["fn"].name)
        return None  # compile

    set_(earlier)
    try:
        with Compiles() as c:
            hook = get()
            assert hook is not earlier
            assert hook(key=1, repr="r", fn=SimpleNamespace(name="f.<locals>._a_kernel")) is None
            hook(key=2, repr="r", fn=SimpleNamespace(name="_b_kernel"))
        assert c.names == ["_a_kernel", "_b_kernel"] and len(c) == 2
        assert seen == ["f.<locals>._a_kernel", "_b_kernel"]  # handed on as it came
        assert get() is earlier  # taken out on leaving
    finally:
        set_(saved)


def test_an_earlier_hooks_skip_answer_is_kept():
    get, set_ = compiles._hooks()
    saved = get()
    set_(lambda **kwargs: True)  # "skip this compile"
    try:
        with Compiles() as c:
            assert get()(key=1, repr="r", fn=SimpleNamespace(name="k")) is True
        assert c.names == ["k"]
    finally:
        set_(saved)


def test_without_triton_there_is_no_hook_and_nothing_to_record(monkeypatch):
    # Triton is installed on Linux only: elsewhere the imports fail, and a bench that wraps
    # its timed spans must still run.
    for name in ("triton", "triton.knobs", "triton.runtime", "triton.runtime.jit"):
        monkeypatch.setitem(sys.modules, name, None)
    assert compiles._hooks() is None
    with Compiles() as c:
        pass
    assert c.names == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: nothing compiles under "
                    "the interpreter")
def test_gpu_a_new_integer_residue_compiles_and_is_recorded():
    """Triton calls the hook: a kernel taking an integer compiles again when that integer
    first is a multiple of 16, and not for another value of the same class."""
    import triton
    import triton.language as tl

    @triton.jit
    def _fill(out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, n + offs * 0, mask=offs < n)

    out = torch.zeros(64, dtype=torch.int32, device="cuda")
    _fill[(1,)](out, 3, BLOCK=64)
    with Compiles() as c:
        _fill[(1,)](out, 5, BLOCK=64)  # same class as 3: no compile
        _fill[(1,)](out, 32, BLOCK=64)  # a multiple of 16: a new specialization
    torch.cuda.synchronize()
    assert c.names == ["_fill"]
    assert int(out[31]) == 32
