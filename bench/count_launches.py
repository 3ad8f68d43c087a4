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

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class _AtenLaunches(TorchDispatchMode):
    """Counts aten calls that would launch a kernel on a GPU (not views, not allocations),
    except while ``paused`` (a Triton kernel's own tensor work in the interpreter)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not func.is_view \
                and func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _count_cpu(fn) -> int:
    """Launches of ``fn()`` on a CPU under Triton's interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    mode = _AtenLaunches()
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        mode.count += 1
        mode.paused = True
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.paused = False

    InterpretedFunction.run = counted
    try:
        with mode:
            fn()
    finally:
        InterpretedFunction.run = run
    return mode.count


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
