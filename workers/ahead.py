"""Selections sent ahead across a pipeline boundary (lookahead between workers).

With ``[sparsity] lookahead`` a worker that is not the last holds the predictor of the next
stage's first layer; while its own last layer runs, as soon as the residual entering that
layer's MLP block exists (the predictors' source for the next layer), it selects the next
layer's rows and sends them as a ``wire.SelectionAhead`` before its activations. The next
worker reads that message first: if its first layer is offloaded it starts gathering those
rows from host memory at once (``OffloadedLayer.prefetch``), and when the activations of
that very step arrive, the step runs with that selection instead of selecting again.
Only what is known that early travels: the heads, and the neurons of a layer whose MLP
predictor reads that same residual ("lookahead"); a layer whose MLP predictor reads its own
MLP input ("mlp_in") gets its heads only (the message's neurons stay None, which the
receiver does not read as "dense" for such a layer), and selects its neurons after its
attention block.

``Outbox`` is the sending half, ``Inbox`` the receiving half. A selection is used only for
the step, rows and width it was made for; anything else (a step retried row by row, rows
that failed in between, an older epoch) is counted wasted and the step selects from the
carried residual as without lookahead. Same tokens either way.

What this module does not know: sockets (the worker sends and receives the frames) or how
a selection is computed (runtime/sparse.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from ..runtime import wire
from ..runtime.model import to_device
from ..runtime.sparse import Selection, mlp_reads_own_input
from ..runtime.stage import Stage
from ..runtime.step import Step

# Selections waiting for their activations; older ones are dropped (wasted). More than the
# micro-batches that can be in flight between two workers.
MAX_WAITING = 64


def union_ids(mask: Tensor | None) -> list[int] | None:
    """[B, T, n] bool -> the sorted ids any token selected (None stays None: dense)."""
    if mask is None:
        return None
    return mask.reshape(-1, mask.shape[-1]).any(0).nonzero().squeeze(1).tolist()


class Outbox:
    """Turns the stage's selection of the next stage's first layer into a message for the
    step being run (``begin``), or nothing when the selection is not the step's whole batch
    (a retry of single rows)."""

    def __init__(self, send: Callable[[wire.SelectionAhead], None], token: str) -> None:
        self.send = send
        self.token = token
        self.step: tuple[int, Step] | None = None
        self.sent = 0

    def begin(self, epoch: int, step: Step) -> None:
        self.step = (epoch, step)

    def __call__(self, layer: int, sel: Selection) -> None:
        if self.step is None:
            return
        epoch, step = self.step
        mask = sel.neurons if sel.neurons is not None else sel.heads
        if mask is not None and tuple(mask.shape[:2]) != (len(step.rows), step.width):
            return  # a sub-batch (rows retried one by one): the next stage selects itself
        self.send(wire.SelectionAhead(epoch, step.step_id, layer,
                                      [r.request_id for r in step.rows], step.width,
                                      self.token, union_ids(sel.heads),
                                      union_ids(sel.neurons)))
        self.sent += 1


class Inbox:
    """Selections from the previous stage, by step, until their activations come."""

    def __init__(self, stage: Stage, prefetch: bool) -> None:
        self.stage = stage
        self.prefetch = prefetch
        config = stage.model.config
        self.heads, self.ffn = config.num_attention_heads, config.ffn_dim
        self.first = stage.model.layers()[0]
        self.waiting: OrderedDict[int, tuple[wire.SelectionAhead, Selection]] = OrderedDict()
        self.used = 0
        self.wasted = 0

    def receive(self, msg: wire.SelectionAhead) -> None:
        if msg.layer != self.first.layer_id:
            self.wasted += 1  # made for another span (a restarted, re-planned cluster)
            return
        sel = self._selection(msg)
        if self.waiting.pop(msg.step_id, None) is not None:
            self.wasted += 1
        self.waiting[msg.step_id] = (msg, sel)
        while len(self.waiting) > MAX_WAITING:
            self.waiting.popitem(last=False)
            self.wasted += 1
        ops = self.first.offloaded
        if self.prefetch and ops is not None:
            ops.prefetch(sel)

    def take(self, epoch: int, step: Step) -> dict[int, Selection] | None:
        """The selection sent ahead for exactly this step, if one came."""
        entry = self.waiting.pop(step.step_id, None)
        if entry is None:
            return None
        msg, sel = entry
        if msg.epoch != epoch or msg.width != step.width or \
                msg.rows != [r.request_id for r in step.rows]:
            self.wasted += 1
            return None
        self.used += 1
        return {msg.layer: sel}

    def _selection(self, msg: wire.SelectionAhead) -> Selection:
        """Masks [B, T, n] holding the union for every token (in gather mode only the union
        counts, so this computes what the sender's per-token masks would); a dense block
        of an offloaded layer selects every row, as OffloadSelector does. A first layer
        whose neurons are predicted from its own MLP input gets heads only: its neurons
        are not known ahead (the step's ``select_mlp`` makes them), so none are read from
        the message, nor their rows prefetched."""
        offloaded = self.first.offloaded is not None
        own_mlp = mlp_reads_own_input(self.stage.selector, self.first.layer_id)
        device = self.stage.device
        shape = (len(msg.rows), msg.width)

        def mask(ids: list[int] | None, n: int) -> tuple[Tensor | None, Tensor | None]:
            if ids is None and not offloaded:
                return None, None
            index = torch.arange(n) if ids is None else torch.tensor(ids, dtype=torch.long)
            m = torch.zeros(*shape, n, dtype=torch.bool)
            m[..., index] = True
            return to_device(m, device), to_device(index, device)

        heads, head_index = mask(msg.heads, self.heads)
        neurons, neuron_index = (None, None) if own_mlp else mask(msg.neurons, self.ffn)
        return Selection(heads=heads, neurons=neurons, neuron_index=neuron_index,
                         head_index=head_index)
