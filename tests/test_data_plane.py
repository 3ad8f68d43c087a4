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
from pipeline_fixtures import (
    GREEDY,
    PROMPTS,
    add_predictors,
    cluster,
    make_tiny_model,
    read_log,
    short_dir,
)

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
           carry: bool = False, slot: int | None = 0, ring: str = "", fill: int = 1,
           step_id: int = 7) -> wire.Activations:
    rows = [Row(f"r{i}", i, [1] * width, 0, True, SamplingParams()) for i in range(step_rows)]
    return wire.Activations(0, Step(step_id, rows), dtype, (step_rows, width, hidden), "tok",
                            carry, slot=slot, ring=ring, fill=fill)


def put(writer: SlotWriter, x: torch.Tensor, c: torch.Tensor | None = None, step_id: int = 7
        ) -> wire.Activations | None:
    """``writer.put`` with a fresh header; the header it filled in (slot, ring, fill)."""
    h = header(*x.shape, str(x.dtype).removeprefix("torch."), carry=c is not None, slot=None,
               fill=0, step_id=step_id)
    doorbell = writer.put(x, c, h)
    if doorbell is None:
        return None
    assert wire.decode_data(doorbell) == h  # the doorbell is the header, encoded
    return h


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
    h = put(writer, x, c)
    slot = h.slot
    assert int(ring.states[slot]) == h.fill == FILLED and h.ring == ring.name
    got = ring.decode(wire.encode(h), hidden)
    hidden_out, carry_out = ring.take(got)
    assert int(ring.states[slot]) == FREE
    assert torch.equal(hidden_out, x) and hidden_out.dtype == x.dtype
    assert (carry_out is None) == (c is None)
    if c is not None:
        assert torch.equal(carry_out, c)
    # What was taken is a copy: the sender may overwrite the slot at once.
    assert put(writer, torch.zeros_like(x)).fill == 2
    assert torch.equal(hidden_out, x)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("rows,width,hidden,carry", [(1, 1, 7, False), (3, 5, 13, True),
                                                     (2, 1, 32, True)])
def test_a_lent_slot_reads_what_a_copied_one_reads_and_stays_held_until_released(
        ring, dtype, rows, width, hidden, carry):
    """``lend`` (views of the slot, what a worker does) against ``take`` (the copy out)."""
    writer = SlotWriter(ring.offer(), "cpu")
    torch.manual_seed(rows + width * hidden)
    x = torch.randn(rows, width, hidden).to(wire.DTYPES[dtype])
    c = torch.randn(rows, width, hidden).to(x.dtype) if carry else None
    copied = ring.take(ring.check(put(writer, x, c), hidden))
    h = put(writer, x, c)
    lent = ring.lend(ring.check(h, hidden))
    for a, b in zip(copied, lent, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
    assert lent[0].untyped_storage().data_ptr() == ring.block.untyped_storage().data_ptr()
    assert int(ring.states[h.slot]) == h.fill  # held: the sender cannot write it
    with pytest.raises(wire.WireError, match="being read already"):
        ring.lend(ring.check(h, hidden))  # a repeated header reads nothing twice
    ring.release()
    assert int(ring.states[h.slot]) == FREE and ring.received == 2
    # The same shape again reuses the views made the first time.
    again = ring.lend(ring.check(put(writer, x + 1, c), hidden))
    assert again[0] is ring.views.get(again_slot := ring.lent[0], x.dtype, x.shape, carry)[0]
    assert torch.equal(again[0], x + 1) and again_slot != h.slot
    ring.release()


def test_a_lent_slot_with_nan_is_refused_and_given_back(ring):
    writer = SlotWriter(ring.offer(), "cpu")
    h = put(writer, torch.full((1, 1, 8), float("inf")))
    with pytest.raises(wire.WireError, match="NaN"):
        ring.lend(ring.check(h, 8))
    assert int(ring.states[h.slot]) == FREE and not ring.lent


def test_put_refuses_tensors_that_disagree_with_their_header(ring):
    writer = SlotWriter(ring.offer(), "cpu")
    h = header(1, 1, 8, slot=None, fill=0)
    with pytest.raises(ValueError, match="float16"):
        writer.put(torch.ones(1, 1, 8, dtype=torch.float16), None, h)
    with pytest.raises(ValueError, match=re.escape("[1, 1, 4]")):
        writer.put(torch.ones(1, 1, 8), torch.ones(1, 1, 4), h)
    assert writer.sent == 0 and all(int(s) == FREE for s in ring.states)


def test_a_full_ring_or_a_large_tensor_takes_the_socket_and_credits_come_back(ring):
    writer = SlotWriter(ring.offer(), "cpu")
    x = torch.ones(1, 1, 8)
    slots = [put(writer, x * i).slot for i in range(3)]
    assert sorted(slots) == [0, 1, 2]
    assert put(writer, x) is None  # every slot unread: never overwritten, never waited
    ring.take(ring.decode(wire.encode(header(1, 1, 8, slot=1, ring=ring.name, fill=2)), 8))
    assert put(writer, x * 9).slot == 1  # the credit returned
    assert put(writer, torch.ones(1, 1, 2000)) is None  # 8000 bytes > 4096
    assert writer.sent == 4 and writer.fallbacks == 2


@pytest.mark.parametrize("change,needle", [
    (dict(slot=3), "slot 3: the ring has slots 0..2"),
    (dict(slot=-1), "slot -1"),
    (dict(ring="another"), "ring 'another'"),
    (dict(slot=None), "names no slot"),
    (dict(fill=0), "name no fill (0)"),
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
    h = put(writer, torch.full((1, 1, 8), float("nan")))
    stale = ring.decode(wire.encode(header(1, 1, 8, slot=h.slot, ring=ring.name, fill=9)), 8)
    with pytest.raises(wire.WireError, match="which the sender has not filled"):
        ring.take(stale)  # a doorbell for another fill of that slot frees nothing
    with pytest.raises(wire.WireError, match="NaN"):
        ring.take(ring.decode(wire.encode(h), 8))
    assert int(ring.states[h.slot]) == FREE  # a refused read still frees the slot
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


# What the sender of the spin test does, in order: a fill (and whether its header rides in
# the box, so that a spinning receiver takes it before its doorbell), or a hop by the socket.
SPIN_PLAN = [("fill", False),   # the first fill: what came before is unknown, doorbell only
             ("fill", True),
             ("socket", False),
             ("fill", False),   # after a socket message: it must not overtake that message
             ("fill", True)]


def _spin_sender(offer_bytes: bytes, address: str, pipe) -> None:
    import msgspec
    import zmq

    writer = SlotWriter(msgspec.msgpack.decode(offer_bytes, type=wire.PlaneOffer), "cpu")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(address)
    pipe.recv()  # go: the receiver's first spin has timed out
    for i, (how, boxed) in enumerate(SPIN_PLAN):
        x = torch.full((1, 1, 8), float(i))
        if how == "socket":
            h = header(1, 1, 8, slot=None, fill=0, step_id=i)
            push.send_multipart([wire.encode(h), wire.tensor_frame(x)])
            writer.sent_by_socket()
            continue
        doorbell = writer.put(x, None, header(1, 1, 8, slot=None, fill=0, step_id=i))
        if boxed:
            pipe.recv()  # the receiver took it from the ring: only now ring the bell
        push.send(doorbell)
    pipe.recv()
    push.close()
    ctx.term()


def test_a_spin_takes_fills_before_their_doorbells_in_order_and_a_timeout_loses_nothing(
        ring, tmp_path):
    """A second process fills the ring (and once sends by the socket); the receiver spins:
    a spin with nothing to find times out and returns None; a fill whose header rides in
    the box is taken from the ring, its later doorbell recognised and dropped; a fill
    without one (the first, and the one after the socket message) comes by its doorbell,
    after the socket message. Every tensor arrives once, in the order sent."""
    import multiprocessing as mp

    address = f"ipc://{short_dir()}/spin.sock"
    zctx = zmq.Context()
    pull = zctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(address)
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_spin_sender, args=(wire.encode(ring.offer()), address, theirs))
    proc.start()
    got, early, dropped = [], [], 0
    try:
        t0 = time.perf_counter()
        assert ring.wait_fill(0.05) is None  # nothing filled yet: the spin gives up
        assert time.perf_counter() - t0 >= 0.05
        ours.send("go")
        for how, boxed in SPIN_PLAN:
            if boxed:
                box = ring.wait_fill(30.0)
                assert box is not None
                msg = ring.check(wire.decode_data(box), 8)
                x, _ = ring.take(msg, early=True)
                early.append(msg.step.step_id)
                ours.send("taken")
            else:
                assert ring.wait_fill(0.02) is None  # unfilled yet, or its box is empty
                while True:
                    frames = pull.recv_multipart()
                    if len(frames) == 2:
                        msg, x, _ = wire.decode_activations(frames[0], frames[1], 8)
                        assert how == "socket"
                        break
                    msg = wire.decode_data(frames[0])
                    if ring.seen(msg):
                        dropped += 1
                        continue
                    x, _ = ring.take(ring.check(msg, 8))
                    break
            got.append((msg.step.step_id, float(x.flatten()[0])))
        ours.send("done")
        while dropped < 2 and pull.poll(10_000):
            assert ring.seen(wire.decode_data(pull.recv()))
            dropped += 1
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        pull.close()
        zctx.term()
    assert got == [(i, float(i)) for i in range(len(SPIN_PLAN))]
    assert early == [1, 4] and ring.picked == 2 and dropped == 2
    assert ring.received == 4 and not ring.picked_early
    assert all(int(s) == FREE for s in ring.states)


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


def picked_counts(log: str) -> int:
    """Hops picked up from a ring before their doorbell, summed over the workers."""
    return sum(int(n) for n in re.findall(r"(\d+) picked up from the ring before", log))


@pytest.mark.parametrize("workers,plane", [(1, "auto"), (2, "auto"), (3, "auto"),
                                           (2, "socket"), (3, "socket"), (2, "spin"),
                                           (3, "spin")])
def test_dense_tokens_equal_the_engine_on_either_plane(tiny, greedy, workers, plane):
    """"spin": the shared ring, each receiver spinning on it for 20 ms after a step."""
    spin = {"data_plane_spin_us": 20000.0} if plane == "spin" else {}
    with cluster(tiny, workers, data_plane="socket" if plane == "socket" else "auto",
                 **spin) as c:
        with PipelineConnection(c.address) as conn:
            assert [conn.run([p], GREEDY)[0].tokens for p in PROMPTS[:3]] == greedy[:3]
            assert [x.tokens for x in conn.run(PROMPTS, GREEDY)] == greedy
    log = read_log(c)
    paths = re.findall(r"worker (\d) -> worker \d: activations through (.*)", log)
    assert len(paths) == workers - 1
    ring, sock = hop_counts(log)
    spins = re.findall(r"its ring is spun on for (\S+) us", log)
    if workers > 1 and plane != "socket":
        assert spins == ["20000" if spin else "0"] * (workers - 1), spins
        assert (picked_counts(log) > 0) == bool(spin), picked_counts(log)
        # Dense: no message but the hops goes to the next worker, so every fill but the
        # first has its header in the box (a spin never meets a socket-only fill after it).
        boxless = re.findall(r"(\d+) found a fill whose header came only by the socket", log)
        assert len(boxless) == workers - 1 and all(int(n) <= 1 for n in boxless), boxless
    if plane != "socket" and workers > 1:
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


def _spawn_writer(target, ring: Ring):
    """Another process (spawned: CUDA cannot fork) running ``target(offer, pipe)`` against
    ``ring``'s offer; (this end of the pipe, the process), started."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(wire.encode(ring.offer()), theirs))
    proc.start()
    return ours, proc


def _cuda_sender(offer_bytes: bytes, pipe) -> None:
    import msgspec

    offer = msgspec.msgpack.decode(offer_bytes, type=wire.PlaneOffer)
    writer, how = open_writer(offer, "", "cuda:0", "auto")
    pipe.send(how)
    for i in range(8):
        x = torch.full((2, 3, 64), float(i), device="cuda:0", dtype=torch.float16)
        torch.cuda._sleep(1_000_000)  # a slow producer: the reader must wait on the event
        h = header(2, 3, 64, "float16", carry=True, slot=None, fill=0)
        while writer.put(x, x + 0.5, h) is None:
            pass
        pipe.send((h.slot, h.fill))
    pipe.recv()


@pytest.mark.gpu
def test_cuda_ipc_ring_between_two_processes_on_one_gpu():
    ring = Ring("cuda:0", 3, 1 << 16)
    try:
        ours, proc = _spawn_writer(_cuda_sender, ring)
        assert ours.recv().startswith("CUDA IPC into cuda:0")
        for i in range(8):
            slot, fill = ours.recv()
            msg = ring.decode(wire.encode(header(2, 3, 64, "float16", carry=True, slot=slot,
                                                 ring=ring.name, fill=fill)), 64)
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


def _cuda_refiller(offer_bytes: bytes, pipe) -> None:
    import msgspec

    offer = msgspec.msgpack.decode(offer_bytes, type=wire.PlaneOffer)
    writer, _ = open_writer(offer, "", "cuda:0", "auto")
    for value in (1.0, 2.0):
        h = header(1, 1, 64, "float16", slot=None, fill=0)
        while writer.put(torch.full((1, 1, 64), value, device="cuda:0",
                                    dtype=torch.float16), None, h) is None:
            pass  # one slot: free again once the receiver released it
        pipe.send((h.slot, h.fill))
    pipe.recv()


@pytest.mark.gpu
def test_a_lent_cuda_slot_is_not_overwritten_before_the_readers_stream_used_it():
    """One slot: the sender's second fill waits (on the GPU) for the free event recorded at
    ``release``, after a slow read of the lent view, so the read sees the first fill."""
    ring = Ring("cuda:0", 1, 1 << 12)
    try:
        ours, proc = _spawn_writer(_cuda_refiller, ring)
        slot, fill = ours.recv()
        x, _ = ring.lend(ring.decode(wire.encode(header(1, 1, 64, "float16", slot=slot,
                                                        ring=ring.name, fill=fill)), 64))
        torch.cuda._sleep(200_000_000)  # a slow step: the read below runs long after now
        read = x * 1
        ring.release()  # the free event follows the read on this stream
        slot, fill = ours.recv()  # the second fill went in (its copy waits on the GPU)
        second, _ = ring.take(ring.decode(wire.encode(header(
            1, 1, 64, "float16", slot=slot, ring=ring.name, fill=fill)), 64))
        assert torch.equal(read.cpu(), torch.full((1, 1, 64), 1.0, dtype=torch.float16))
        assert torch.equal(second.cpu(), torch.full((1, 1, 64), 2.0, dtype=torch.float16))
        ours.send("done")
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        ring.close()


def test_launch_suggests_mps_only_where_workers_share_a_gpu_without_it(tmp_path):
    """Workers on one GPU are separate CUDA contexts unless an MPS daemon runs: the launch
    log then says so, naming the shared device and the command; not for distinct GPUs,
    CPU workers, or with a daemon's control pipe present."""
    from dejavu.scheduler.config import default_micro_batches
    from dejavu.scheduler.process import mps_hint

    none = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "absent")}
    hint = mps_hint(["cuda:0", "cuda:0", "cuda:1"], none)
    assert hint is not None and "cuda:0" in hint and "cuda:1" not in hint
    assert "nvidia-cuda-mps-control -d" in hint
    assert mps_hint(["cuda:0", "cuda:1"], none) is None
    assert mps_hint(["cpu", "cpu"], none) is None
    # "cuda" is a worker's current device, cuda:0: the same GPU as "cuda:0", as the default
    # micro-batch count (config.default_micro_batches) counts it
    shared = mps_hint(["cuda", "cuda:0"], none)
    assert shared is not None and "cuda:0" in shared
    assert default_micro_batches(2, 8, ["cuda", "cuda:0"]) == 1
    (tmp_path / "control").touch()  # the daemon's pipe
    assert mps_hint(["cuda:0", "cuda:0"], {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) is None
