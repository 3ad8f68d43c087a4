"""Lookahead (runtime/sparse.py ``Lookahead``): an offloaded layer's selection is made one
layer early, from the residual entering the layer before's MLP block (the predictors'
wiring), and its rows start crossing (``OffloadedLayer.prefetch``) while that MLP block
computes. The prefetch must be exact: the same tokens and logits as the same selections
applied without it, every prefetched gather used, each selected row read once.

Without a GPU the kernels run in Triton's interpreter over CPU "host" records.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_row_stream import CFG4, offloaded_model, prefill  # noqa: E402
from test_sparse_backend import DEVICE  # noqa: E402

from dejavu.runtime.model import Batch  # noqa: E402
from dejavu.runtime.offload import OffloadSelector, host_bytes_read, prefetch_counts  # noqa: E402
from dejavu.runtime.selection import RandomSelector  # noqa: E402
from dejavu.runtime.sparse import Lookahead, SparseContext, SparseStats  # noqa: E402

OFFLOADED = [1, 2, 3]  # consecutive: both stream slots, a prefetch while the layer before
# is itself offloaded


class Log:
    """A selector that logs each call (layer id, its source) into a shared event list."""

    def __init__(self, inner, events):
        self.inner, self.events = inner, events

    def __call__(self, lid, source):
        self.events.append(("select", lid, source.clone()))
        return self.inner(lid, source)


def forget_whole_blocks(model):
    """As if other layers had used the stream buffer since the prefill: decode steps must
    gather their rows (else the prefill's whole blocks serve them and nothing is fetched)."""
    stream = model.layers()[OFFLOADED[0]].offloaded.stream
    for slot in stream.slots:
        for block in slot.values():
            block.owner = None


def decode(model, cache, start, steps, *, lookahead, events=None, batch=2):
    """Greedy decode steps after a prefill; returns the logits of every step."""
    device = cache.k.device
    events = [] if events is None else events
    sel = Log(OffloadSelector(RandomSelector(CFG4.ffn_dim, CFG4.num_attention_heads, 0.3, 0.5,
                                             seed=9), OFFLOADED, CFG4), events)
    layers = {lid: model.layers()[lid] for lid in OFFLOADED}
    tok = torch.tensor([[7]] * batch, device=device)
    slots = torch.arange(batch, device=device)
    out = []
    with torch.inference_mode():
        for i in range(steps):
            forget_whole_blocks(model)
            pos = torch.full((batch, 1), start + i, device=device)
            ahead = Lookahead(layers=dict(layers)) if lookahead else None
            ctx = SparseContext(sel, stats=SparseStats(), dense_above=1.01, ahead=ahead)
            logits = model(tok, Batch(pos, slots, cache, ctx, length=start + i + 1))
            out.append(logits[:, -1].float())
            tok = logits[:, -1].argmax(-1)[:, None]
    return torch.stack(out)


@pytest.mark.parametrize("neurons_staged", [False, True])
def test_prefetched_decode_equals_the_same_selections_without_prefetch(neurons_staged):
    outs, reads, counts = [], [], []
    for lookahead in (False, True):
        model = offloaded_model(torch.float16, OFFLOADED, CFG4)
        for lid in OFFLOADED:
            model.layers()[lid].offloaded.stage_neurons = neurons_staged
        _, cache = prefill(model, CFG4, 5, batch=2)
        before = host_bytes_read(model)
        outs.append(decode(model, cache, 5, 3, lookahead=lookahead))
        reads.append(host_bytes_read(model) - before)
        counts.append(prefetch_counts(model))
    assert torch.equal(outs[0], outs[1])  # the same rows, the same math: bit for bit
    assert reads[0] == reads[1]  # each selected row crossed once, prefetched or not
    kinds = 2 if neurons_staged else 1  # heads always staged; neurons when asked
    # Every offloaded layer's rows are requested as soon as its selection exists: at the
    # layer's own start without lookahead, one layer early with it (layer 1's layer before is
    # resident, so it is selected early too): 3 layers x 3 steps x kinds, all used, none
    # wasted, either way. Which of the two ran early is the next test's business.
    assert counts[0] == counts[1] == (len(OFFLOADED) * 3 * kinds, 0)


def test_the_next_layer_is_selected_from_the_mlp_input_before_the_mlp_runs():
    """With lookahead on, layer l+1's selector runs before layer l's MLP block starts
    (``mlp_block`` called), on exactly the residual that enters that MLP block; off, after
    it. (The block's LayerNorm may run earlier: the layer shares its output with the
    lookahead's predictor.)"""
    for lookahead in (True, False):
        model = offloaded_model(torch.float16, OFFLOADED, CFG4)
        _, cache = prefill(model, CFG4, 5, batch=2)
        events = []
        for lid in (1, 2):
            layer = model.layers()[lid]

            def recorded(h, *args, _block=layer.mlp_block, lid=lid, events=events, **kw):
                events.append(("mlp", lid, h.clone()))
                return _block(h, *args, **kw)

            layer.mlp_block = recorded
        decode(model, cache, 5, 1, lookahead=lookahead, events=events)
        order = [(kind, lid) for kind, lid, _ in events]
        for lid in (1, 2):
            select_next = order.index(("select", lid + 1))
            mlp = order.index(("mlp", lid))
            assert (select_next < mlp) == lookahead, (lookahead, order)
            source = events[select_next][2]
            assert torch.equal(source, events[mlp][2])  # the MLP block's input, either way


def test_a_prefetch_whose_slot_was_taken_is_counted_wasted_and_gathered_again():
    model = offloaded_model(torch.float16, OFFLOADED, CFG4)
    _, cache = prefill(model, CFG4, 5, batch=1)
    forget_whole_blocks(model)
    ops = model.layers()[2].offloaded
    sel = OffloadSelector(RandomSelector(CFG4.ffn_dim, CFG4.num_attention_heads, 0.3, 0.5,
                                         seed=4), OFFLOADED, CFG4)
    x = torch.randn(1, 1, CFG4.hidden_size, dtype=torch.float16, device=DEVICE)
    with torch.inference_mode():
        chosen = sel(2, x)
        ctx = SparseContext(sel, dense_above=1.01)
        pos = torch.full((1, 1), 5, device=DEVICE)
        batch = Batch(pos, torch.zeros(1, dtype=torch.long, device=DEVICE), cache, ctx,
                      length=6)
        chosen = ctx._account(model.layers()[2], chosen, x.shape, batch)
        ops.prefetch(chosen)
        stream = ops.stream.slots[ops.slot]["heads"]
        stream.owner = object()  # another layer took the slot meanwhile
        before = host_bytes_read(model)
        idx = chosen.heads.reshape(-1, CFG4.num_attention_heads).any(0).nonzero().squeeze(1)
        ln = model.layers()[2].self_attn_layer_norm(x)
        ops.attention(model.layers()[2].self_attn, ln, 2, batch, idx)
    assert (ops.prefetch_used, ops.prefetch_wasted) == (0, 1)
    assert host_bytes_read(model) - before == idx.numel() * ops.head_bytes  # read again


def test_busy_fraction_counts_steps_within_the_window():
    from dejavu.workers.busy import BusyMeter

    now = [0.0]
    meter = BusyMeter(window_s=10.0, clock=lambda: now[0])
    now[0] = 2.0
    meter.start()
    now[0] = 3.0
    meter.stop()
    assert meter.fraction() == pytest.approx(1 / 3)  # 1 s of 3 since it began
    now[0] = 12.5
    meter.start()
    now[0] = 13.0  # window [3, 13]: the first step left it, the running one counts
    assert meter.fraction() == pytest.approx(0.05)
    meter.stop()
    now[0] = 30.0
    assert meter.fraction() == 0.0
