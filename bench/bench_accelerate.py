"""Hugging Face accelerate's CPU offload on an OPT-shaped model, for `dejavu-run bench`.

The device map is the one accelerate picks for the *whole* model (infer_auto_device_map,
max_memory = the GPU budget, no_split_module_classes = OPTDecoderLayer, computed on the
meta device, no memory used). Building and filling the whole model in host memory takes
too long for a short lease, so a model of a few layers of the same shape is built with a
device map of the same kind (embeddings, norm, head and some layers on the GPU, the other
layers offloaded to the CPU), every decoder layer is timed with CUDA events from forward
hooks (which enclose accelerate's own weight-moving hooks), and the whole model's step is
extrapolated: layers on the GPU x their time + offloaded layers x theirs + the rest.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..runtime.weight_store import GIB
from .bench_common import Shape


def accelerate_case(s: Shape, device: str, *, budget_gib: float, gpu_layers: int = 1,
                    cpu_layers: int = 3, batches=(1, 8), steps: int = 3) -> dict[str, Any]:
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import OPTConfig as HFConfig
    from transformers import OPTForCausalLM

    def config(layers: int) -> HFConfig:
        return HFConfig(hidden_size=s.hidden, ffn_dim=s.ffn, num_attention_heads=s.heads,
                        num_hidden_layers=layers, vocab_size=s.vocab,
                        word_embed_proj_dim=s.hidden, max_position_embeddings=2048,
                        torch_dtype="float16")

    with init_empty_weights():
        meta = OPTForCausalLM(config(s.layers)).to(torch.float16)
    full_map = infer_auto_device_map(
        meta, max_memory={0: int(budget_gib * GIB), "cpu": 4096 * GIB},
        no_split_module_classes=["OPTDecoderLayer"], dtype=torch.float16)
    layer_dev = [full_map.get(f"model.decoder.layers.{i}", _parent(full_map, i))
                 for i in range(s.layers)]
    n_gpu_full = sum(1 for d in layer_dev if d not in ("cpu", "disk"))
    del meta

    n = gpu_layers + cpu_layers
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = OPTForCausalLM(config(n)).to(torch.float16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # random, not zero; generated on the GPU
            p.copy_(torch.empty(p.shape, device=device, dtype=p.dtype).normal_(0, 0.02))
    build_s = time.perf_counter() - t0
    dmap: dict[str, Any] = {"model.decoder.embed_tokens": 0, "model.decoder.embed_positions": 0,
                            "model.decoder.final_layer_norm": 0, "lm_head": 0}
    for i in range(n):
        dmap[f"model.decoder.layers.{i}"] = 0 if i < gpu_layers else "cpu"
    model = dispatch_model(model.eval(), device_map=dmap, main_device=0)

    times: dict[int, list[float]] = {i: [] for i in range(n)}
    events: dict[int, Any] = {}

    def pre(i):
        def hook(_m, _a):
            events[i] = torch.cuda.Event(enable_timing=True)
            events[i].record()
        return hook

    def post(i):
        def hook(_m, _a, _o):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            events[i] = (events[i], end)
        return hook

    for i, layer in enumerate(model.model.decoder.layers):
        layer.register_forward_pre_hook(pre(i))
        layer.register_forward_hook(post(i))
    out: dict[str, Any] = {"shape": s.name, "model_layers": s.layers,
                           "gpu_layers_full_model": n_gpu_full,
                           "measured_layers": {"gpu": gpu_layers, "cpu": cpu_layers},
                           "host_build_s": round(build_s, 1), "runs": []}
    with torch.no_grad():
        for batch in batches:
            ids = torch.randint(3, s.vocab, (batch, 16), device=device)
            o = model(input_ids=ids, use_cache=True)
            pkv, tok = o.past_key_values, ids[:, -1:]
            step_times = []
            for i in times:
                times[i] = []
            for _ in range(steps):
                torch.cuda.synchronize()
                t = time.perf_counter()
                o = model(input_ids=tok, past_key_values=pkv, use_cache=True)
                torch.cuda.synchronize()
                step_times.append(time.perf_counter() - t)
                pkv = o.past_key_values
                for i, (a, b) in events.items():
                    times[i].append(a.elapsed_time(b) / 1e3)
            t_gpu = statistics.median(x for i in range(gpu_layers) for x in times[i])
            t_cpu = statistics.median(x for i in range(gpu_layers, n) for x in times[i])
            t_step = statistics.median(step_times)
            rest = max(0.0, t_step - sum(statistics.median(times[i]) for i in times))
            full = n_gpu_full * t_gpu + (s.layers - n_gpu_full) * t_cpu + rest
            out["runs"].append({
                "batch": batch, "gpu_layer_ms": round(t_gpu * 1e3, 3),
                "offloaded_layer_ms": round(t_cpu * 1e3, 3), "rest_ms": round(rest * 1e3, 3),
                "measured_step_ms": round(t_step * 1e3, 2),
                "full_model_step_ms_extrapolated": round(full * 1e3, 1),
                "tokens_per_s_extrapolated": round(batch / full, 4)})
    del model
    torch.cuda.empty_cache()
    return out


def _parent(dmap: dict[str, Any], i: int) -> Any:
    """Device of layer i when the map names a parent module instead of the layer."""
    name = f"model.decoder.layers.{i}"
    best = None
    for key, dev in dmap.items():
        if name.startswith(key + ".") or key == "" or name == key:
            if best is None or len(key) > len(best[0]):
                best = (key, dev)
    return best[1] if best else "cpu"
