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
from dejavu.runtime.sparse import Lookahead, Selection, SparseContext, SparseStats  # noqa: E402

OFFLOADED = [1, 2, 3]  # consecutive: both stream slots, a prefetch while the layer before
# is itself offloaded


class Log:
    """A selector that logs each call (layer id, its source) into a shared event list."""

    def __init__(self, inner, events):
        self.inner, self.events = inner, events

    def __call__(self, lid, source):
        self.events.append(("select", lid, source.clone()))
        return self.inner(lid, source)

    def mlp_reads_own_input(self, lid):
        return self.inner.mlp_reads_own_input(lid)

    def select_neurons(self, lid, mlp_in):
        self.events.append(("neurons", lid, mlp_in.clone()))
        return self.inner.select_neurons(lid, mlp_in)


class OwnInput:
    """``inner``'s heads; neurons from the layer's own MLP input, as own-input ("mlp_in")
    predictors select them, after attention: a fixed projection's top 30% per token."""

    def __init__(self, inner, config):
        self.inner = inner
        g = torch.Generator().manual_seed(3)
        self.w = torch.randn(config.hidden_size, config.ffn_dim, generator=g).to(DEVICE)

    def mlp_reads_own_input(self, lid):
        return True

    def __call__(self, lid, source):
        return Selection(heads=self.inner(lid, source).heads)

    def select_neurons(self, lid, mlp_in):
        scores = mlp_in.float() @ self.w
        return scores >= scores.topk(round(0.3 * scores.shape[-1]), dim=-1).values[..., -1:]


def random_selector(own=False):
    inner = RandomSelector(CFG4.ffn_dim, CFG4.num_attention_heads, 0.3, 0.5, seed=9)
    return OffloadSelector(OwnInput(inner, CFG4) if own else inner, OFFLOADED, CFG4)


def forget_whole_blocks(model):
    """As if other layers had used the stream buffer since the prefill: decode steps must
    gather their rows (else the prefill's whole blocks serve them and nothing is fetched)."""
    stream = model.layers()[OFFLOADED[0]].offloaded.stream
    for slot in stream.slots:
        for block in slot.values():
            block.owner = None


def decode(model, cache, start, steps, *, lookahead, events=None, batch=2, own=False):
    """Greedy decode steps after a prefill; returns the logits of every step. ``own``:
    neurons predicted from each layer's own MLP input (``OwnInput``)."""
    device = cache.k.device
    events = [] if events is None else events
    sel = Log(random_selector(own), events)
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


def log_mlp_block(layer, events):
    """Log ("mlp", layer id, the residual entering the block) when the layer's MLP block
    starts (this instance's ``mlp_block`` wrapped)."""
    block = layer.mlp_block

    def logged(h, *args, **kwargs):
        events.append(("mlp", layer.layer_id, h.clone()))
        return block(h, *args, **kwargs)

    layer.mlp_block = logged


def test_the_next_layer_is_selected_from_the_mlp_input_before_the_mlp_runs():
    """With lookahead on, layer l+1's selector runs before layer l's MLP block starts
    (``mlp_block`` is called: the block's LayerNorm may run earlier, its output shared with
    the predictors), on exactly the residual that enters that MLP block; off, after it."""
    for lookahead in (True, False):
        model = offloaded_model(torch.float16, OFFLOADED, CFG4)
        _, cache = prefill(model, CFG4, 5, batch=2)
        events = []
        for lid in (1, 2):
            log_mlp_block(model.layers()[lid], events)
        decode(model, cache, 5, 1, lookahead=lookahead, events=events)
        order = [(kind, lid) for kind, lid, _ in events]
        for lid in (1, 2):
            select_next = order.index(("select", lid + 1))
            mlp = order.index(("mlp", lid))
            assert (select_next < mlp) == lookahead, (lookahead, order)
            source = events[select_next][2]
            assert torch.equal(source, events[mlp][2])  # the MLP block's input, either way


def test_own_input_layers_prefetch_heads_early_and_neurons_after_attention():
    """Neurons predicted from each layer's own MLP input: with lookahead an offloaded
    layer's heads are selected (and requested) one layer early, its neurons only once its
    attention block has run (``select_mlp``), from the residual entering its MLP block, and
    requested then. Same logits and bytes as without lookahead; every request used."""
    outs, reads, counts, logs = [], [], [], []
    for lookahead in (False, True):
        model = offloaded_model(torch.float16, OFFLOADED, CFG4)
        for lid in OFFLOADED:
            model.layers()[lid].offloaded.stage_neurons = True
        _, cache = prefill(model, CFG4, 5, batch=2)
        events = []
        for lid in (1, 2):
            log_mlp_block(model.layers()[lid], events)
        before = host_bytes_read(model)
        outs.append(decode(model, cache, 5, 3, lookahead=lookahead, events=events, own=True))
        reads.append(host_bytes_read(model) - before)
        counts.append(prefetch_counts(model))
        logs.append(events)
    assert torch.equal(outs[0], outs[1])
    assert reads[0] == reads[1]
    assert counts[0] == counts[1] == (len(OFFLOADED) * 3 * 2, 0)  # heads and neurons
    events = logs[1]
    order = [(kind, lid) for kind, lid, _ in events]
    for lid in (1, 2):
        neurons, mlp = order.index(("neurons", lid)), order.index(("mlp", lid))
        assert order.index(("select", lid + 1)) < mlp  # heads: one layer early
        assert order.index(("select", lid)) < neurons < mlp
        assert torch.equal(events[neurons][2], events[mlp][2])  # the MLP block's input


def test_own_input_next_layer_is_sent_ahead_with_its_heads_only():
    """A selection sent to the next stage carries what is known early: an own-input
    layer's heads, never neurons (an offloaded one's all-rows fill included)."""
    model = offloaded_model(torch.float16, OFFLOADED, CFG4)
    _, cache = prefill(model, CFG4, 5, batch=2)
    for own in (False, True):
        sent = []
        ahead = Lookahead(send_layer=2, send=lambda lid, sel, sent=sent: sent.append((lid, sel)))
        ctx = SparseContext(random_selector(own), dense_above=1.01, ahead=ahead)
        pos = torch.full((2, 1), 5, device=DEVICE)
        with torch.inference_mode():
            model(torch.tensor([[7], [8]], device=DEVICE),
                  Batch(pos, torch.arange(2, device=DEVICE), cache, ctx, length=6))
        assert [lid for lid, _ in sent] == [2]
        sel = sent[0][1]
        assert sel.heads is not None and sel.heads.shape == (2, 1, CFG4.num_attention_heads)
        assert (sel.neurons is None) == own


def test_inbox_of_an_own_input_first_layer_reads_no_neurons():
    """The receiving half: for a first layer whose neurons come from its own MLP input, a
    message's neuron ids are not read (nor those rows prefetched), only its heads."""
    from types import SimpleNamespace

    from dejavu.runtime import wire
    from dejavu.workers.ahead import Inbox

    for own in (False, True):
        model = offloaded_model(torch.float16, OFFLOADED, CFG4)
        prefill(model, CFG4, 5, batch=1)
        forget_whole_blocks(model)
        span = SimpleNamespace(layers=lambda m=model: m.layers()[1:], config=CFG4)
        stage = SimpleNamespace(model=span, device=torch.device(DEVICE),
                                selector=random_selector(own))
        ops = model.layers()[1].offloaded
        ops.stage_neurons = True
        inbox = Inbox(stage, prefetch=True)
        before = host_bytes_read(model)
        inbox.receive(wire.SelectionAhead(0, 4, 1, ["r"], 1, heads=[0, 2], neurons=[1, 5, 9]))
        sel = inbox.take(0, SimpleNamespace(step_id=4, width=1,
                                            rows=[SimpleNamespace(request_id="r")]))[1]
        assert sel.heads[0, 0].nonzero().squeeze(1).tolist() == [0, 2]
        assert (sel.neurons is None) == own
        want = 2 * ops.head_bytes + (0 if own else 3 * ops.neuron_bytes)
        assert host_bytes_read(model) - before == want


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
