"""Collect what predictor training needs from a model run over calibration text.

Per layer and token it keeps, compactly and in preallocated buffers whose size is known
before the run (so memory is bounded by ``--tokens``):

- the predictor inputs, exactly the tensors the runtime feeds that layer's predictors (the
  run goes through ``SparseContext`` with a recording selector, so training and inference
  share one wiring), as float16 [N, C]: the lookahead source (``sparse.predictor_source``)
  and the residual entering the layer's own MLP block (``SparseContext.select_mlp``);
- the MLP labels, "fc1 pre-activation > 0" (the neuron fires), as bit masks [N, F/8];
- each head's output norm ||o_h W_out[:, h]|| (its contribution to the residual), float16
  [N, H]; head labels are the top heads by this norm.

No dense activation (fc1 output, attention output) is kept or written anywhere.

What this module does not know: how predictors are trained on these (train_predictors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..runtime.model import Batch, OPTModel, full_positions
from ..runtime.sparse import Selection, SparseContext
from .textdata import iter_documents as iter_texts  # noqa: F401 (re-exported)


class CalibrationDataError(ValueError):
    """Calibration text that cannot be read or is too short."""


def calibration_windows(texts: Iterator[str], encode, *, window: int, tokens: int,
                        per_doc: int) -> tuple[Tensor, Tensor]:
    """Windows [W, window] of token ids (each starts a sequence at position 0) and the
    document index [W] of each, at most ``per_doc`` tokens from one document (taken from
    its middle, past front matter) and ``tokens`` in all."""
    rows, docs = [], []
    total = 0
    for doc, text in enumerate(texts):
        if total >= tokens:
            break
        chars = per_doc * 6  # generous: BPE tokens average ~4 characters of English
        start = max(0, len(text) // 2 - chars // 2)
        ids = encode(text[start:start + chars])[: max(window, per_doc)]
        for i in range(0, len(ids) - window + 1, window):
            rows.append(torch.tensor(ids[i:i + window]))
            docs.append(doc)
            total += window
            if total >= tokens:
                break
    if not rows:
        raise CalibrationDataError(f"no document has {window} tokens: use shorter windows")
    return torch.stack(rows), torch.tensor(docs)


@dataclass
class Collected:
    """Per layer: inputs [N, C] float16 (the lookahead source), neuron bits [N, ceil(F/8)]
    uint8, head norms [N, H] float16 and the residual entering the layer's MLP block
    [N, C] float16 (``mlp_inputs``, the "mlp_in" MLP source)."""

    inputs: dict[int, Tensor]
    neuron_bits: dict[int, Tensor]
    head_norms: dict[int, Tensor]
    ffn_dim: int
    tokens: int
    mlp_inputs: dict[int, Tensor] = field(default_factory=dict)

    def mlp_source(self, layer: int, source: str) -> Tensor:
        """The MLP predictor's input table of one layer for an ``OperatingPoint.mlp_source``."""
        return self.mlp_inputs[layer] if source == "mlp_in" else self.inputs[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for table in
                   (self.inputs, self.neuron_bits, self.head_norms, self.mlp_inputs)
                   for t in table.values())


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """[N, F] bool -> [N, ceil(F/8)] uint8, first entry in the high bit."""
    n, f = mask.shape
    pad = (-f) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(n, pad)], 1)
    w = _BIT_WEIGHTS.to(mask.device)
    return (mask.view(n, -1, 8).to(torch.uint8) * w).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, f: int) -> Tensor:
    """Inverse of pack_bits: [N, ceil(F/8)] uint8 -> [N, F] bool."""
    w = _BIT_WEIGHTS.to(bits.device)
    return ((bits[..., None] & w) != 0).reshape(bits.shape[0], -1)[:, :f]


def planned_bytes(model: OPTModel, tokens: int) -> int:
    c = model.config
    per_token = c.hidden_size * 4 + (c.ffn_dim + 7) // 8 + c.num_attention_heads * 2
    return tokens * per_token * len(model.layer_ids)


@torch.no_grad()
def collect(model: OPTModel, windows: Tensor, *, batch_size: int = 8,
            progress=None) -> Collected:
    """Run the whole model over ``windows`` [W, T] and record, per layer and token, the
    predictor inputs and the labels."""
    if not (model.is_first and model.is_last):
        raise ValueError("collection needs the whole model, not a layer span")
    c = model.config
    device = next(model.parameters()).device
    n_tokens = windows.numel()
    layers = model.layer_ids
    out = Collected(
        inputs={i: torch.empty(n_tokens, c.hidden_size, dtype=torch.float16) for i in layers},
        neuron_bits={i: torch.empty(n_tokens, (c.ffn_dim + 7) // 8, dtype=torch.uint8)
                     for i in layers},
        head_norms={i: torch.empty(n_tokens, c.num_attention_heads, dtype=torch.float16)
                    for i in layers},
        ffn_dim=c.ffn_dim, tokens=n_tokens,
        mlp_inputs={i: torch.empty(n_tokens, c.hidden_size, dtype=torch.float16)
                    for i in layers})
    cursor = [0, 0]  # [start, end) of the current batch's tokens
    record = _Recorder(out, cursor)

    hooks = []
    for layer in model.layers():
        i = layer.layer_id
        hooks += label_hooks(
            layer, lambda b, i=i: out.neuron_bits[i].__setitem__(slice(*cursor), b.cpu()),
            lambda n, i=i: out.head_norms[i].__setitem__(slice(*cursor), n.cpu()))
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start:start + batch_size].to(device)
            cursor[:] = [start * windows.shape[1], (start + ids.shape[0]) * windows.shape[1]]
            ctx = SparseContext(record, mode="mask")
            batch = Batch(full_positions(*ids.shape, device), sparse=ctx)
            model.run_layers(model.embed(ids, batch.positions), batch)  # no LM head needed
            if progress is not None:
                progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    finally:
        for h in hooks:
            h.remove()
    return out


class _Recorder:
    """A selector that keeps every block dense and writes both predictor inputs of each
    layer to ``out`` at rows ``cursor`` = [start, end)."""

    def __init__(self, out: Collected, cursor: list[int]) -> None:
        self.out, self.cursor = out, cursor

    def _write(self, table: dict[int, Tensor], layer_id: int, x: Tensor) -> None:
        table[layer_id][slice(*self.cursor)] = x.reshape(-1, x.shape[-1]).to(
            "cpu", torch.float16)

    def __call__(self, layer_id: int, source: Tensor) -> Selection:
        self._write(self.out.inputs, layer_id, source)
        return Selection()  # dense: collection runs the exact model

    def mlp_reads_own_input(self, layer_id: int) -> bool:
        return True  # so that the context hands over the MLP block's input too

    def select_neurons(self, layer_id: int, mlp_in: Tensor) -> None:
        self._write(self.out.mlp_inputs, layer_id, mlp_in)


def label_hooks(layer, on_bits, on_norms) -> list:
    """Hooks on one decoder layer that hand each forward pass's labels to the callbacks:
    ``on_bits([N, ceil(F/8)] uint8)`` (fc1 pre-activation > 0, packed) and
    ``on_norms([N, H] float16)`` (each head's contribution norm). Remove them when done."""
    attn = layer.self_attn
    c, h, d = attn.out_proj.weight.shape[0], attn.num_heads, attn.head_dim
    f = layer.fc1.weight.shape[0]
    # Gram matrices of out_proj's per-head column blocks: ||o_h W_h^T||^2 = o_h G_h o_h.
    w = attn.out_proj.weight.float().view(c, h, d)
    gram = torch.einsum("chd,che->hde", w, w)
    return [
        layer.fc1.register_forward_hook(
            lambda mod, inp, pre: on_bits(pack_bits((pre > 0).reshape(-1, f)))),
        attn.out_proj.register_forward_pre_hook(
            lambda mod, args: on_norms(_head_norms(args[0], gram))),
    ]


def _head_norms(o: Tensor, gram: Tensor) -> Tensor:
    """o [B, T, H*D] head outputs before out_proj -> [B*T, H] norms of their contributions."""
    h, d, _ = gram.shape
    o = o.reshape(-1, h, d).float()
    sq = torch.einsum("nhd,hde,nhe->nh", o, gram, o)
    return sq.clamp_min(0).sqrt().to(torch.float16)
