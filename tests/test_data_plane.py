"""The same-host data plane (workers/data_plane.py): the slot/credit protocol of a ring,
its checks on malformed headers, the choice of path and its fallbacks, and pipelines of
real processes whose tokens equal the in-process engine's through the ring and through the
socket. The CUDA IPC ring has its own tests, marked gpu."""

from __future__ import annotations

import re
import time

import pytest
import torch
import zmq
from pipeline_fixtures import GREEDY, PROMPTS, add_predictors, cluster, make_tiny_model, read_log

from dejavu.runtime import wire
from dejavu.runtime.checkpoint import load_model
from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.step import Row, Step
from dejavu.scheduler.engine import Engine
from dejavu.scheduler.zmq_client import PipelineConnection
from dejavu.workers import data_plane
from dejavu.workers.data_plane import FILLED, FREE, Ring, SlotWriter, open_writer

pytestmark = pytest.mark.skipif(not data_plane.SHM_DIR.is_dir(), reason="no /dev/shm here")


def header(step_rows: int, width: int, hidden: int, dtype: str = "float32", *,
           carry: bool = False, slot: int | None = 0, ring: str = "") -> wire.Activations:
    rows = [Row(f"r{i}", i, [1] * width, 0, True, SamplingParams()) for i in range(step_rows)]
    return wire.Activations(0, Step(7, rows), dtype, (step_rows, width, hidden), "tok",
                            carry, slot=slot, ring=ring)


@pytest.fixture
def ring():
    r = Ring("cpu", 3, 4096)
    yield r
    r.close()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("rows,width,hidden,carry", [(1, 1, 7, False), (3, 5, 13, True),
                                                     (2, 1, 32, True)])
def test_a_slot_carries_hidden_and_carry_exactly(ring, dtype, rows, width, hidden, carry):
    writer = SlotWriter(ring.offer(), "cpu")
    torch.manual_seed(rows * width + hidden)
    x = torch.randn(rows, width, hidden).to(wire.DTYPES[dtype])
    c = torch.randn(rows, width, hidden).to(x.dtype) if carry else None
    slot = writer.put(x, c)
    assert slot is not None and int(ring.states[slot]) == FILLED
    msg = header(rows, width, hidden, dtype, carry=carry, slot=slot, ring=ring.name)
    got = ring.decode(wire.encode(msg), hidden)
    hidden_out, carry_out = ring.take(got)
    assert int(ring.states[slot]) == FREE
    assert torch.equal(hidden_out, x) and hidden_out.dtype == x.dtype
    assert (carry_out is None) == (c is None)
    if c is not None:
        assert torch.equal(carry_out, c)
    # What was taken is a copy: the sender may overwrite the slot at once.
    writer.put(torch.zeros_like(x), None)
    assert torch.equal(hidden_out, x)


def test_a_full_ring_or_a_large_tensor_takes_the_socket_and_credits_come_back(ring):
    writer = SlotWriter(ring.offer(), "cpu")
    x = torch.ones(1, 1, 8)
    slots = [writer.put(x * i, None) for i in range(3)]
    assert sorted(slots) == [0, 1, 2]
    assert writer.put(x, None) is None  # every slot unread: never overwritten, never waited
    ring.take(ring.decode(wire.encode(header(1, 1, 8, slot=1, ring=ring.name)), 8))
    assert writer.put(x * 9, None) == 1  # the credit returned
    assert writer.put(torch.ones(1, 1, 2000), None) is None  # 8000 bytes > 4096
    assert writer.sent == 4 and writer.fallbacks == 2


@pytest.mark.parametrize("change,needle", [
    (dict(slot=3), "slot 3: the ring has slots 0..2"),
    (dict(slot=-1), "slot -1"),
    (dict(ring="another"), "ring 'another'"),
    (dict(slot=None), "names no slot"),
    (dict(dtype="int8"), "dtype 'int8'"),
    (dict(shape=(1, 1, 9)), "does not match the step"),
])
def test_a_malformed_slot_header_is_refused_with_a_clear_error(ring, change, needle):
    msg = header(1, 1, 8, ring=ring.name)
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(wire.WireError, match=re.escape(needle)):
        ring.decode(wire.encode(msg), 8)


def test_a_slot_too_small_an_unfilled_slot_or_nan_is_refused(ring):
    big = header(4, 40, 8, ring=ring.name)  # 5120 bytes > 4096
    with pytest.raises(wire.WireError, match="5120 bytes cannot be in a slot of 4096"):
        ring.decode(wire.encode(big), 8)
    msg = ring.decode(wire.encode(header(1, 1, 8, slot=2, ring=ring.name)), 8)
    with pytest.raises(wire.WireError, match="slot 2, which the sender has not filled"):
        ring.take(msg)
    writer = SlotWriter(ring.offer(), "cpu")
    slot = writer.put(torch.full((1, 1, 8), float("nan")), None)
    msg = ring.decode(wire.encode(header(1, 1, 8, slot=slot, ring=ring.name)), 8)
    with pytest.raises(wire.WireError, match="NaN"):
        ring.take(msg)
    assert int(ring.states[slot]) == FREE  # a refused read still frees the slot
    with pytest.raises(wire.WireError, match="names a slot but came with tensor frames"):
        wire.decode_activations(wire.encode(header(1, 1, 8)), bytes(32), 8)


def test_the_path_falls_back_to_the_socket_and_says_why(ring):
    offer = ring.offer()
    writer, how = open_writer(offer, "", "cpu", "auto")
    assert writer is not None and "shared memory" in how and "3 slots" in how
    cases = [
        (open_writer(offer, "", "cpu", "socket"), 'data_plane = "socket" on this worker'),
        (open_writer(None, '[pipeline] data_plane = "socket"', "cpu", "auto"),
         'offers no shared ring ([pipeline] data_plane = "socket")'),
        (open_writer(wire.PlaneOffer(**{**_fields(offer), "host": "elsewhere"}), "", "cpu",
                     "auto"), "another host (elsewhere)"),
        (open_writer(wire.PlaneOffer(**{**_fields(offer), "path": "/etc/passwd"}), "", "cpu",
                     "auto"), "is not a ring in /dev/shm"),
        (open_writer(wire.PlaneOffer(**{**_fields(offer), "slot_bytes": 8192}), "", "cpu",
                     "auto"), "bytes, the offer implies"),
        (open_writer(wire.PlaneOffer(**{**_fields(offer), "kind": "cuda"}), "", "cpu", "auto"),
         "without its handles"),
    ]
    for (writer, how), needle in cases:
        assert writer is None and how.startswith("the socket: ") and needle in how, how
    assert data_plane.make_ring("cpu", 2, 64, "socket") == (None, '[pipeline] data_plane = '
                                                                  '"socket"')


def _fields(offer: wire.PlaneOffer) -> dict:
    return {f: getattr(offer, f) for f in offer.__struct_fields__}


def test_a_ring_file_is_private_and_removed_on_close():
    r = Ring("cpu", 2, 128)
    assert r.path.exists() and (r.path.stat().st_mode & 0o777) == 0o600
    r.close()
    assert not r.path.exists()


# --- pipelines of real processes ---------------------------------------------------------------


def hop_counts(log: str) -> tuple[int, int]:
    """(through rings, through sockets) received, summed over the workers' closing lines."""
    found = re.findall(r"received (\d+) hop\(s\) through its ring, (\d+) through the socket",
                       log)
    return sum(int(a) for a, _ in found), sum(int(b) for _, b in found)


@pytest.mark.parametrize("workers,plane", [(1, "auto"), (2, "auto"), (3, "auto"),
                                           (2, "socket"), (3, "socket")])
def test_dense_tokens_equal_the_engine_on_either_plane(tiny, greedy, workers, plane):
    with cluster(tiny, workers, data_plane=plane) as c:
        with PipelineConnection(c.address) as conn:
            assert [conn.run([p], GREEDY)[0].tokens for p in PROMPTS[:3]] == greedy[:3]
            assert [x.tokens for x in conn.run(PROMPTS, GREEDY)] == greedy
    log = read_log(c)
    paths = re.findall(r"worker (\d) -> worker \d: activations through (.*)", log)
    assert len(paths) == workers - 1
    ring, sock = hop_counts(log)
    if plane == "auto" and workers > 1:
        assert all(how.startswith("shared memory") for _, how in paths), paths
        assert ring > 0 and sock == 0, (ring, sock)
    elif workers > 1:
        assert all('data_plane = "socket"' in how for _, how in paths), paths
        assert ring == 0 and sock > 0


@pytest.mark.parametrize("plane", ["auto", "socket"])
def test_sparse_tokens_equal_the_sparse_engine_through_three_workers(tmp_path, plane):
    from dejavu.runtime.predictors import PredictorSet
    from dejavu.runtime.selection import PredictorSelector, SelectionConfig

    model_dir = make_tiny_model(tmp_path / "sparse")
    path = add_predictors(model_dir)
    model = load_model(model_dir)
    selector = PredictorSelector(PredictorSet.load(path, model),
                                 SelectionConfig(mlp_density=0.3, head_density=0.5))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: top-k near-ties flip otherwise
    try:
        sparse = Engine(model, max_batch=8, max_len=128, selector=selector)
        want = [sparse.generate(p, GREEDY).tokens for p in PROMPTS[:4]]
    finally:
        torch.set_num_threads(threads)
    with cluster(model_dir, 3, sparse=True, mlp_density=0.3, head_density=0.5,
                 data_plane=plane) as c, PipelineConnection(c.address) as conn:
        assert [conn.run([p], GREEDY)[0].tokens for p in PROMPTS[:4]] == want
    ring, sock = hop_counts(read_log(c))
    assert (ring > 0 and sock == 0) if plane == "auto" else (ring == 0 and sock > 0)


def test_forged_slot_headers_are_dropped_and_the_cluster_goes_on(tiny, greedy):
    """Slot headers without the token, with a bad slot or a stale ring reach a worker's data
    socket: each is dropped with a clear log line; no slot is freed by them."""
    with cluster(tiny, 2) as c:
        run_dir = c.address[len("ipc://"):].rsplit("/", 1)[0]
        ctx = zmq.Context()
        try:
            data = ctx.socket(zmq.PUSH)
            data.setsockopt(zmq.LINGER, 0)
            data.connect(f"ipc://{run_dir}/data1.sock")
            for slot, ring in ((0, "nosuchring"), (99, ""), (0, "")):
                data.send(wire.encode(header(1, 1, 32, slot=slot, ring=ring)))
            time.sleep(1.0)  # LINGER 0: closing at once could drop them unsent
        finally:
            data.close(linger=0)
            ctx.term()
        with PipelineConnection(c.address) as conn:
            assert [x.tokens for x in conn.run(PROMPTS, GREEDY)] == greedy
    log = read_log(c)
    assert "dropped a bad data frame" in log
    assert "ring 'nosuchring'" in log  # the first one is logged; the rest are counted


# --- CUDA IPC (two processes on one GPU) ---------------------------------------------------------


def _cuda_sender(offer_bytes: bytes, pipe) -> None:
    import msgspec

    offer = msgspec.msgpack.decode(offer_bytes, type=wire.PlaneOffer)
    writer, how = open_writer(offer, "", "cuda:0", "auto")
    pipe.send(how)
    for i in range(8):
        x = torch.full((2, 3, 64), float(i), device="cuda:0", dtype=torch.float16)
        torch.cuda._sleep(1_000_000)  # a slow producer: the reader must wait on the event
        slot = None
        while slot is None:
            slot = writer.put(x, x + 0.5)
        pipe.send(slot)
    pipe.recv()


@pytest.mark.gpu
def test_cuda_ipc_ring_between_two_processes_on_one_gpu():
    import multiprocessing as mp

    ring = Ring("cuda:0", 3, 1 << 16)
    try:
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_cuda_sender, args=(wire.encode(ring.offer()), theirs))
        proc.start()
        assert ours.recv().startswith("CUDA IPC into cuda:0")
        for i in range(8):
            slot = ours.recv()
            msg = ring.decode(wire.encode(header(2, 3, 64, "float16", carry=True, slot=slot,
                                                 ring=ring.name)), 64)
            x, c = ring.take(msg)
            assert torch.equal(x.cpu(), torch.full((2, 3, 64), float(i), dtype=torch.float16))
            assert torch.equal(c.cpu(), x.cpu() + 0.5)
        ours.send("done")
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        ring.close()


@pytest.mark.gpu
def test_two_workers_on_one_gpu_use_cuda_ipc_and_equal_the_socket_path(tiny):
    tokens = {}
    for plane in ("auto", "socket"):
        with cluster(tiny, 2, devices=["cuda:0", "cuda:0"], threads=0, data_plane=plane) as c:
            with PipelineConnection(c.address) as conn:
                tokens[plane] = [x.tokens for x in conn.run(PROMPTS, GREEDY)]
        log = read_log(c)
        if plane == "auto":
            assert "activations through CUDA IPC" in log, log[-2000:]
            assert hop_counts(log)[0] > 0 and hop_counts(log)[1] == 0
    # The plane moves bytes: the same GPU math gives the same tokens either way.
    assert tokens["auto"] == tokens["socket"]
