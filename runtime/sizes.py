"""Bytes of an OPT model's parts, from its config alone: weights per layer, embeddings, LM
head, KV cache, activations, and what a worker with a GPU budget reserves before any layer.
The layer planner (scheduler/planner.py) plans with them and runtime/offload.py fits a model
to its budget with the same figures, so that the plan and the worker agree.

What this module does not know: devices or tensors; a size is a number of bytes.
"""

from __future__ import annotations

from .opt_config import POSITION_OFFSET, OPTConfig
from .weight_store import GIB


def size(n: float) -> str:
    """Bytes in the largest unit that keeps them >= 1 (GiB, MiB or KiB)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n / 1024:.1f} KiB"


def layer_bytes(config: OPTConfig, dtype_bytes: int) -> int:
    c, f = config.hidden_size, config.ffn_dim
    weights = 4 * c * c + 2 * c * f
    biases = 4 * c + f + c if config.enable_bias else 0
    norms = 4 * c if config.layer_norm_elementwise_affine else 0
    return (weights + biases + norms) * dtype_bytes


def stream_buffer_bytes(config: OPTConfig, dtype_bytes: int) -> int:
    """GPU bytes of the double buffer that prefill chunks stream offloaded layers through
    (runtime/row_stream.py: two layers in host-record layout, rows padded to 16 elements),
    kept by any worker that offloads a layer."""
    c, d = config.hidden_size, config.hidden_size // config.num_attention_heads
    neuron = -(-(2 * c + 1) // 16) * 16
    head = -(-(4 * d * c + 3 * d) // 16) * 16
    return 2 * (config.ffn_dim * neuron + config.num_attention_heads * head) * dtype_bytes


def kv_bytes_per_layer(config: OPTConfig, slots: int, max_len: int, dtype_bytes: int) -> int:
    return 2 * slots * max_len * config.hidden_size * dtype_bytes


def embed_bytes(config: OPTConfig, dtype_bytes: int) -> int:
    e, c = config.word_embed_proj_dim, config.hidden_size
    n = config.vocab_size * e + (config.max_position_embeddings + POSITION_OFFSET) * c
    if config.has_projections:
        n += e * c
    return n * dtype_bytes


def head_bytes(config: OPTConfig, dtype_bytes: int) -> int:
    e, c = config.word_embed_proj_dim, config.hidden_size
    n = 2 * c if config.has_final_layer_norm else 0
    if config.has_projections:
        n += e * c
    # A tied head shares the embedding's memory only when one worker holds both.
    return n * dtype_bytes + config.vocab_size * e * dtype_bytes


def activation_bytes(config: OPTConfig, slots: int, max_len: int, dtype_bytes: int,
                     chunk: int = 512) -> int:
    """A margin for a step's transient tensors: a prefill chunk of every slot through the
    widest intermediate (fc1's output next to a few hidden-size tensors) and its attention
    scores. An estimate, not a bound."""
    tokens = slots * min(chunk, max_len)
    return (tokens * (config.ffn_dim + 4 * config.hidden_size)
            + tokens * config.num_attention_heads * max_len) * dtype_bytes


def offload_reserved_bytes(config: OPTConfig, num_layers: int, slots: int, max_len: int,
                           dtype_bytes: int, *, kv_inputs: bool = True) -> int:
    """What a worker with a GPU budget keeps on the GPU before any layer: the KV cache of
    its ``num_layers`` layers, with the attention inputs and K/V-valid bits of lazy K/V
    when steps may skip heads (``kv_inputs``; runtime/build.py ``steps_skip_heads``), and
    ``activation_bytes``."""
    c, h = config.hidden_size, config.num_attention_heads
    per_layer = kv_bytes_per_layer(config, slots, max_len, dtype_bytes)
    if kv_inputs:
        per_layer += slots * max_len * c * dtype_bytes + slots * h * max_len  # inputs; bits
    return num_layers * per_layer + activation_bytes(config, slots, max_len, dtype_bytes)
