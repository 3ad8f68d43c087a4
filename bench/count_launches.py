"""Kernel launches in one captured decode step, per layer: what runtime/graphs.py records.

    python -m dejavu.bench.count_launches --layers 2,4 --batch 1,8
    TRITON_INTERPRET=1 python -m dejavu.bench.count_launches   # on a CPU

A small random-weight model (hidden 256, 8 heads, fp16, the Triton backend) runs the
forward a graph captures (``_Captured._forward``: layers, logits, penalties) once, eagerly,
for three selections: dense, ``random`` 10% of neurons (a baseline's own draw, top-k,
scatter and union per layer) and ``predictors`` at 10% (threshold, the fused selection
kernel). Counting at two layer counts separates the per-layer launches from the step's
own (embeddings, head, penalties): per layer = difference / layers added.

How a launch is counted: on CUDA, the profiler's device events (kernels and memsets, what
a graph's nodes are); on a CPU, every aten call that is not a view or an allocation (each
one kernel on a GPU, an estimate: a few launch two) plus each Triton kernel (its own
tensor work in the interpreter not counted). Sizes do not change the counts.

What this does not measure: time (bench/profile_step.py does) or the eager step.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..kernels.rows import check_ids_on_cpu
from ..runtime.graphs import DecodeGraphs, _Captured
from ..runtime.model import OPTModel
from ..runtime.opt_config import OPTConfig
from ..runtime.penalties import SlotPenalties
from ..runtime.sampling import SamplingParams
from ..runtime.selection import RandomSelector
from ..runtime.sparse_backend import use_backend
from ..runtime.stage import allocate_cache
from ..runtime.step import Row, Step
from .profile_step import predictor_selector

SELECTIONS = ("dense", "random", "predictors")
# Aten calls that launch nothing: allocations and metadata.
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "lift_fresh", "detach", "alias", "_local_scalar_dense", "set_", "resize_"}


# Aten calls that make the host wait for the device on a GPU: their result's size or value
# is read back (nonzero and what is built on it, item/int/bool of a tensor).
SYNC_OPS = {"nonzero", "_local_scalar_dense", "item", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive", "unique", "equal", "is_nonzero", "allclose"}


def _is_sync(func, args, kwargs) -> bool:
    """Whether one aten call would synchronise with the device: a sync op, a
    repeat_interleave without its output size, indexing with a boolean mask (a nonzero
    inside the kernel, not seen by a dispatch mode), or a blocking copy from the host
    (``_host_copy``)."""
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":
        return (kwargs or {}).get("output_size") is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else (kwargs or {}).get("indices", ())
        if any(t is not None and getattr(t, "dtype", None) == torch.bool for t in indices):
            return True
    return _host_copy(name, args, kwargs)


def _host_copy(name: str, args, kwargs) -> bool:
    """Whether one aten call copies host memory into a GPU and waits for the stream: a
    blocking copy to CUDA, or an index_put into a CUDA tensor of host values (a Python bool
    written with ``t[i] = True`` arrives as a host scalar, which index_put copies over).
    Seen on a GPU only: on a CPU every tensor is a host one."""
    kwargs = kwargs or {}
    if name == "_to_copy":
        target = kwargs.get("device")
        return (args[0].device.type == "cpu" and target is not None
                and torch.device(target).type == "cuda" and not kwargs.get("non_blocking"))
    if name == "copy_":
        return (args[0].is_cuda and args[1].device.type == "cpu"
                and not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)))
    if name in ("index_put", "index_put_", "_index_put_impl_"):
        values = args[2] if len(args) > 2 else kwargs.get("values")
        return args[0].is_cuda and values is not None and values.device.type == "cpu"
    return False


# Work a GPU never does: the kernels' range checks of index tensors run on a CPU only.
_CPU_ONLY = {check_ids_on_cpu.__code__}


def _cpu_only() -> bool:
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        if frame.f_code in _CPU_ONLY:
            return True
        frame = frame.f_back
    return False


class _AtenLaunches(TorchDispatchMode):
    """Counts aten calls that would launch a kernel on a GPU (not views, not allocations),
    except while ``paused`` (a Triton kernel's own tensor work in the interpreter), and the
    calls that would synchronise the host with the device (``syncs``, by op in
    ``sync_ops``; ``Tensor.tolist`` is counted by ``counting``, it dispatches nothing on a
    CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.syncs = 0
        self.sync_ops: dict[str, int] = {}
        self.ops: dict[str, int] = {}  # launches by aten op
        self.paused = False

    def sync(self, name: str) -> None:
        self.syncs += 1
        self.sync_ops[name] = self.sync_ops.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not _cpu_only():
            name = func.overloadpacket.__name__
            if not func.is_view and name not in _NO_LAUNCH:
                self.count += 1
                self.ops[name] = self.ops.get(name, 0) + 1
            if _is_sync(func, args, kwargs):
                self.sync(name)
        return func(*args, **(kwargs or {}))


def counting(fn) -> _AtenLaunches:
    """Run ``fn()`` under Triton's interpreter (a CPU) or on CUDA with every aten call
    and Triton launch counted (see ``_AtenLaunches``); returns the counter."""
    mode = _AtenLaunches()
    patched = []
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - triton without its interpreter
        InterpretedFunction = None
    if InterpretedFunction is not None:
        run = InterpretedFunction.run

        def counted(self, *args, **kwargs):
            mode.count += 1
            mode.paused = True
            try:
                return run(self, *args, **kwargs)
            finally:
                mode.paused = False
        InterpretedFunction.run = counted
        patched.append((InterpretedFunction, "run", run))
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        if not mode.paused:
            mode.sync("tolist")
        return tolist(self)
    torch.Tensor.tolist = counted_tolist
    patched.append((torch.Tensor, "tolist", tolist))
    try:
        with mode:
            fn()
    finally:
        for owner, name, real in patched:
            setattr(owner, name, real)
    return mode


def _count_cpu(fn) -> int:
    """Launches of ``fn()`` on a CPU under Triton's interpreter."""
    return counting(fn).count


def _count_cuda(fn) -> int:
    """Device events (kernels, memsets, copies) of ``fn()`` on CUDA, from the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def build(layers: int, device: torch.device) -> OPTModel:
    config = OPTConfig(hidden_size=256, num_attention_heads=8, ffn_dim=1024,
                       num_hidden_layers=layers, vocab_size=512, max_position_embeddings=128,
                       word_embed_proj_dim=256)
    model = OPTModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.to(device, torch.float16).eval().requires_grad_(False)
    use_backend(model, "triton")
    return model


def selector(model: OPTModel, select: str, device: torch.device):
    c = model.config
    if select == "dense":
        return None
    if select == "random":
        return RandomSelector(c.ffn_dim, c.num_attention_heads, 0.1, 1.0)
    return predictor_selector(model, 0.1, device)


def count_step(layers: int, batch: int, select: str, device: torch.device) -> int:
    """Launches of one captured-step forward (after one warm-up, as capture does)."""
    model = build(layers, device)
    cache = allocate_cache(model, batch, 64)
    sel = selector(model, select, device)
    penalties = SlotPenalties(batch, model.config.vocab_size, device)
    graphs = DecodeGraphs(model, cache, sel, penalties=penalties)
    g = _Captured(model, cache, sel, batch, device, torch.float16, penalties)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    rows = [Row(f"r{i}", i, [5 + i], 3 + i, True, params) for i in range(batch)]
    graphs.load(g, Step(1, rows), None, None, None)
    with torch.inference_mode():
        g._forward()  # warm-up: tables, compilation (capture warms up the same way)
        counter = _count_cuda if device.type == "cuda" else _count_cpu
        return counter(g._forward)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="2,4", help="two layer counts, comma-separated")
    ap.add_argument("--batch", default="1", help="bucket sizes, comma-separated")
    ap.add_argument("--select", default=",".join(SELECTIONS))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    low, high = (int(n) for n in args.layers.split(","))
    out = []
    for batch in (int(b) for b in args.batch.split(",")):
        for select in args.select.split(","):
            a, b = count_step(low, batch, select, device), count_step(high, batch, select, device)
            per_layer = (b - a) / (high - low)
            row = {"device": device.type, "batch": batch, "select": select,
                   f"launches_{low}_layers": a, f"launches_{high}_layers": b,
                   "per_layer": per_layer, "per_step": a - low * per_layer}
            out.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
