"""One hop between two worker processes on one device: the shared ring vs the socket.

    python -m dejavu.bench.bench_hops --out bench/results                 # GPU: CUDA IPC
    python -m dejavu.bench.bench_hops --device cpu --shapes tiny --iters 50 --out /tmp/h

Two processes (this one and a peer it starts), each with a data input exactly as a worker
has: a PULL socket and a ring of slots (workers/data_plane.py), the same wire headers
(runtime/wire.py) for a step of ``batch`` decode rows. The activations [batch, 1, hidden]
go to the peer and back, ``--iters`` times per case; the peer reads what arrived before it
sends it back, and this side waits for the returning tensor to be on its device (a CUDA
synchronize) before it counts the round trip: one hop is half a round trip, including the
copies, the event waits and the header on the socket. The socket path is today's: device
-> host, tensor frame, host -> device. Results: median (and p90) microseconds per hop for
each hidden size of ``--shapes`` and each batch of ``--batch``; the headline key
``hop_us_opt30b_batch1_gpu_path`` is opt-30b's hidden size at batch 1 on the ring.

``--throughput`` adds the product's figure: opt-1.3b (random weights), 8 streams, through
two workers on the one GPU vs one worker (bench_pipeline's run), on the shared ring.

What this measures: the data plane alone and then the pipeline as users run it; it does
not tune anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import torch
import zmq

from ..runtime import wire
from ..runtime.sampling import SamplingParams
from ..runtime.step import Row, Step
from ..scheduler.transport import make_socket
from ..workers.data_plane import Ring, SlotWriter
from .bench_pipeline import SHAPES

STOP = -1  # step id of the header that ends the peer
SPIN_ON, SPIN_OFF = -2, -3  # step ids of the headers that set the peer's spin for a case
MAX_BYTES = 1 << 30
TOKEN = "bench"


class Endpoint:
    """One side of the hop: its PULL input with a ring, a PUSH to the other side's input."""

    def __init__(self, device: str, addr_in: str, addr_out: str, slot_bytes: int) -> None:
        self.device = torch.device(device)
        self.ctx = zmq.Context()
        self.pull = make_socket(self.ctx, zmq.PULL, MAX_BYTES, server=True)
        self.pull.bind(addr_in)
        self.push = make_socket(self.ctx, zmq.PUSH, MAX_BYTES)
        self.push.connect(addr_out)
        self.ring = Ring(device, 4, slot_bytes)
        self.writer: SlotWriter | None = None
        self.spin_s = 0.0  # how long ``arrive`` spins on the ring before it sleeps on the socket

    def exchange_offers(self) -> None:
        self.push.send(wire.encode(self.ring.offer()))
        offer = msgspec.msgpack.decode(self.pull.recv(), type=wire.PlaneOffer)
        self.writer = SlotWriter(offer, self.device)

    def send(self, header: wire.Activations, x: torch.Tensor, ring: bool) -> None:
        if ring:
            doorbell = None
            while doorbell is None:  # the other side frees slots as it reads them
                doorbell = self.writer.put(x, None, header)
            self.push.send(doorbell, copy=False)
        else:
            header.slot, header.ring, header.fill = None, "", 0
            self.push.send_multipart([wire.encode(header), wire.tensor_frame(x)], copy=False)
            self.writer.sent_by_socket()

    def recv(self) -> tuple[wire.Activations, torch.Tensor, bool]:
        """The next activations (on this side's device) and whether they came by the ring."""
        return self.take(self.arrive())

    def arrive(self):
        """Wait as a worker does: with a spin, first the frames already here, then the ring
        for ``spin_s``, then the socket; doorbells of hops already taken are dropped. What
        came: ("box", header bytes from the ring), ("lone", decoded header) or ("frames",
        frames)."""
        while True:
            if self.spin_s and not self.pull.poll(0):
                header = self.ring.wait_fill(self.spin_s)
                if header is not None:
                    return "box", header
            frames = self.pull.recv_multipart(copy=False)
            if len(frames) != 1:
                return "frames", frames
            # Decoded once, here: it may be the doorbell of a hop taken in a case with a
            # spin, come after that case ended.
            lone = wire.decode_data(frames[0].buffer)
            if not self.ring.seen(lone):
                return "lone", lone

    def take(self, arrival) -> tuple[wire.Activations, torch.Tensor, bool]:
        """What a worker does with what came (workers/worker.py ``_on_data``, ``_pick_up``):
        one decode, then the worker's checks; the hidden size, which a worker knows, is the
        header's. From the ring the tensor is lent in place, as a worker reads it: call
        ``ring.release()`` once its reads are issued."""
        kind, got = arrival
        if kind == "frames" and len(got) > 1:
            hidden = msgspec.msgpack.decode(got[0].buffer, type=wire.Activations).shape[2]
            msg, x, _ = wire.decode_activations(got[0].buffer, got[1].buffer, hidden)
            return msg, x.to(self.device), False
        lone = wire.decode_data(got) if kind == "box" else got
        msg = self.ring.check(lone, lone.shape[2])
        return msg, self.ring.lend(msg, early=kind == "box")[0], True

    def close(self) -> None:
        self.ring.close()
        self.pull.close(0)
        self.push.close(0)
        self.ctx.term()


def header(batch: int, hidden: int, dtype: str, step_id: int = 0) -> wire.Activations:
    rows = [Row(f"r{i}", i, [1], 100, False, SamplingParams()) for i in range(batch)]
    return wire.Activations(0, Step(step_id, rows), dtype, (batch, 1, hidden), TOKEN)


def run_peer(args) -> int:
    """The echo side: every tensor goes back the way it came, until a STOP header."""
    end = Endpoint(args.device, args.addr_in, args.addr_out, args.slot_bytes)
    try:
        end.exchange_offers()
        while True:
            msg, x, ring = end.recv()
            if msg.step.step_id == STOP:
                return 0
            if msg.step.step_id in (SPIN_ON, SPIN_OFF):
                end.ring.release()
                end.spin_s = args.spin_us / 1e6 if msg.step.step_id == SPIN_ON else 0.0
                continue
            end.send(msg, x, ring)  # as a worker does: a header around the step it got
            end.ring.release()
    finally:
        end.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_hops(end: Endpoint, hidden: int, batch: int, dtype: str, ring: bool, iters: int,
              warmup: int, spin_s: float = 0.0) -> dict:
    """Median and p90 microseconds of one hop (half a round trip to the peer and back), and
    the medians of this side's pieces of a round trip, and how many answers the spin took
    from the ring before their doorbell (``picked``): ``send_us`` (slot copy + header on
    the socket, or device->host + frames), ``wait_us`` (until the answer's frames are here:
    the peer's whole turn and both socket crossings), ``take_us`` (decode, checks, the
    slot lent in place) and ``sync_us`` (on a GPU: until the answer's copy has run). ``spin_s``:
    both sides spin on their ring that long before they sleep on the socket."""
    x = torch.randn(batch, 1, hidden, device=end.device).to(wire.DTYPES[dtype])
    end.spin_s = spin_s
    end.send(header(1, 1, dtype, SPIN_ON if spin_s else SPIN_OFF),
             torch.zeros(1, 1, 1, device=end.device).to(wire.DTYPES[dtype]), False)
    # Built before the clock starts: a worker wraps the step it already has in a header.
    headers = [header(batch, hidden, dtype, i) for i in range(warmup + iters)]
    times, pieces = [], []
    picked = end.ring.picked
    for i in range(warmup + iters):
        _sync(end.device)
        t0 = time.perf_counter_ns()
        end.send(headers[i], x, ring)
        t1 = time.perf_counter_ns()
        arrival = end.arrive()
        t2 = time.perf_counter_ns()
        msg, back, via_ring = end.take(arrival)
        t3 = time.perf_counter_ns()
        _sync(end.device)  # the returned tensor is on this device now
        t4 = time.perf_counter_ns()
        times.append((t4 - t0) / 2e3)
        pieces.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
        if via_ring != ring or not torch.equal(back, x):
            raise RuntimeError(f"the hop changed the path or the tensor (hidden {hidden})")
        end.ring.release()
    kept = sorted(times[warmup:])
    split = {f"{name}_us": round(statistics.median(p[k] for p in pieces[warmup:]) / 1e3, 1)
             for k, name in enumerate(("send", "wait", "take", "sync"))}
    return {"median_us": round(statistics.median(kept), 1),
            "p90_us": round(kept[int(0.9 * (len(kept) - 1))], 1), **split,
            "picked": end.ring.picked - picked}  # answers taken from the ring by spinning


PATHS = (("ring+spin", True, True), ("ring", True, False), ("socket", False, False))


def hop_rows(device: str, shapes: list[str], batches: list[int], dtype: str, iters: int,
             warmup: int, spin_us: float, label: str, log=print) -> list[dict]:
    hidden_max = max(SHAPES[s]["hidden_size"] for s in shapes)
    slot_bytes = max(batches) * hidden_max * torch.empty((), dtype=wire.DTYPES[dtype]
                                                         ).element_size()
    tmp = Path(tempfile.mkdtemp(prefix="bench-hops-"))
    a, b = f"ipc://{tmp}/a.sock", f"ipc://{tmp}/b.sock"
    peer = subprocess.Popen([sys.executable, "-m", "dejavu.bench.bench_hops", "--peer",
                             "--device", device, "--addr-in", b, "--addr-out", a,
                             "--slot-bytes", str(slot_bytes), "--spin-us", str(spin_us)])
    end = Endpoint(device, a, b, slot_bytes)
    rows = []
    try:
        end.exchange_offers()
        for shape in shapes:
            hidden = SHAPES[shape]["hidden_size"]
            for batch in batches:
                for path, ring, spin in PATHS:
                    if spin and not spin_us:
                        continue
                    row = {"label": label, "shape": shape, "hidden": hidden, "batch": batch,
                           "path": path, "bytes": batch * hidden * wire.DTYPES[dtype].itemsize,
                           **time_hops(end, hidden, batch, dtype, ring, iters, warmup,
                                       spin_us / 1e6 if spin else 0.0)}
                    log(json.dumps(row))
                    rows.append(row)
        end.send(header(1, 1, dtype, STOP), torch.zeros(1, 1, 1, device=end.device).to(
            wire.DTYPES[dtype]), False)
        peer.wait(30)
    finally:
        end.close()
        if peer.poll() is None:
            peer.kill()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return rows


def throughput_rows(out: Path, tokens: int, log=print) -> list[dict]:
    """opt-1.3b, 8 streams: one worker, then two on the same GPU over the shared ring, with
    the default micro-batches (the last row) and with 1 and 2: on one GPU the stages cannot
    run at once, and each micro-batch reads every weight again for fewer rows."""
    from .bench_pipeline import random_checkpoint, run_one

    where = Path(os.environ.get("HOPS_CHECKPOINT_DIR", "/dev/shm/dejavu-hops-opt-1.3b"))
    model, _ = random_checkpoint("opt-1.3b", where, torch.float16,
                                 log=lambda m: print(m, file=sys.stderr))
    rows = []
    for workers, micro in ((1, 0), (2, 1), (2, 2), (2, 0)):
        row = run_one(model, workers, 8, tokens, "float16", 32, devices=["cuda:0"] * workers,
                      data_plane="auto", micro_batches=micro)
        row = {k: row.get(k) for k in ("workers", "streams", "micro_batches", "tokens_per_s",
                                       "stage_ms", "hop_ms", "queue_ms", "round_trip_ms",
                                       "in_flight_peak", "busy_fraction",
                                       "error", "devices") if k in row}
        log(json.dumps(row))
        rows.append(row)
    return rows


def summary(rows: list[dict], throughput: list[dict], cuda: bool, label: str = "") -> dict:
    """Flat headline keys, e.g. hop_us_opt30b_batch1_gpu_path (the ring, spun on when the
    rows have a spin, which a worker does only with [pipeline] data_plane_spin_us set; on a
    CPU the ring is shared memory: ..._shm_path), ..._gpu_nospin_path (the workers'
    default) and ..._socket_path; ``label`` (e.g. "mps") ends every hop key."""
    ring = "gpu" if cuda else "shm"
    spun = any(r["path"] == "ring+spin" for r in rows)
    names = {"ring+spin": ring, "ring": f"{ring}_nospin" if spun else ring, "socket": "socket"}
    out = {}
    for r in rows:
        out[f"hop_us_{r['shape'].replace('-', '').replace('.', '_')}_batch{r['batch']}_"
            f"{names[r['path']]}_path{'_' + label if label else ''}"] = r["median_us"]
    one = [r["tokens_per_s"] for r in throughput if r.get("workers") == 1 and
           r.get("tokens_per_s")]
    if one and len(throughput) > 1 and "tokens_per_s" in throughput[-1]:
        # The default (last row), then each micro-batch count measured.
        out["throughput_2w_over_1w_opt1_3b_8_streams"] = round(
            throughput[-1]["tokens_per_s"] / one[0], 3)
        for r in throughput[1:-1]:
            if r.get("tokens_per_s") is not None:
                out[f"throughput_2w_over_1w_opt1_3b_8_streams_{r['micro_batches']}mb"] = \
                    round(r["tokens_per_s"] / one[0], 3)
    return out


def markdown(meta: dict, rows: list[dict], throughput: list[dict], head: dict) -> str:
    label = f" [{meta['label']}]" if meta.get("label") else ""
    lines = [f"# One hop, two processes on {meta['device']}{label} ({meta['date']}), "
             f"{meta['dtype']}", "", f"`{meta['command']}`", "",
             "Pieces of one round trip on the timing side (medians, us): send = slot copy + "
             "header (or device->host + frames), wait = until the answer is here (the peer's "
             "turn, both crossings), take = decode, checks, slot lent in place, sync = until the "
             "answer's copy ran (GPU).", "",
             "| shape | hidden | batch | bytes | path | hop us (p90) | send | wait | take | sync |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['hidden']} | {r['batch']} | {r['bytes']} | "
                     f"{r['path']} | {r['median_us']} ({r['p90_us']}) | {r['send_us']} | "
                     f"{r['wait_us']} | {r['take_us']} | {r['sync_us']} |")
    if throughput:
        lines += ["", "| workers on one GPU | streams | micro-batches | tokens/s | stage ms | "
                  "hop ms | input wait ms | round trip ms | most in flight | busy |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in throughput:
            lines.append(f"| {r.get('workers')} | {r.get('streams')} | "
                         f"{r.get('micro_batches')} | "
                         f"{r.get('tokens_per_s', r.get('error'))} | {r.get('stage_ms')} | "
                         f"{r.get('hop_ms')} | {r.get('queue_ms')} | "
                         f"{r.get('round_trip_ms')} | {r.get('in_flight_peak')} | "
                         f"{r.get('busy_fraction')} |")
    lines += ["", "Headline: " + ", ".join(f"`{k}` = {v}" for k, v in head.items()
                                             if "_socket_" not in k)]
    return "\n".join(lines) + "\n"


def write(base: Path, meta: dict, rows: list[dict], throughput: list[dict], cuda: bool) -> None:
    head = summary(rows, throughput, cuda, meta.get("label", ""))
    Path(f"{base}.json").write_text(json.dumps(
        {"meta": meta, **head, "hops": rows, "throughput": throughput}, indent=2))
    Path(f"{base}.md").write_text(markdown(meta, rows, throughput, head))
    print(json.dumps(head), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_hops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda:0" if cuda else "cpu")
    parser.add_argument("--shapes", default="opt-1.3b,opt-13b,opt-30b,opt-66b")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--dtype", default="float16" if cuda else "float32",
                        choices=sorted(wire.DTYPES))
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--throughput", action="store_true",
                        help="also opt-1.3b, 8 streams, 2 workers on one GPU vs 1 (CUDA only)")
    parser.add_argument("--tokens", type=int, default=32, help="per stream, --throughput")
    parser.add_argument("--spin-us", type=float, default=300.0,
                        help="the ring+spin rows: microseconds each side spins on its ring "
                        "before it sleeps on the socket (0: no ring+spin rows)")
    parser.add_argument("--label", default="",
                        help="names this run in the rows, keys and file names (e.g. mps)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--addr-in", help=argparse.SUPPRESS)
    parser.add_argument("--addr-out", help=argparse.SUPPRESS)
    parser.add_argument("--slot-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        # One thread per side, as CPU workers get on a small machine: two processes whose
        # thread pools spin against each other measure the pools, not the hop.
        torch.set_num_threads(1)
    if args.peer:
        return run_peer(args)
    shapes = args.shapes.split(",")
    for shape in shapes:
        if shape not in SHAPES:
            parser.error(f"--shapes: {shape!r} is not one of {', '.join(sorted(SHAPES))}")
    batches = [int(b) for b in args.batch.split(",")]
    device = (torch.cuda.get_device_name(torch.device(args.device)).replace(" ", "-")
              if args.device.startswith("cuda") else platform.machine())
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    meta = {"date": stamp, "device": device, "dtype": args.dtype, "iters": args.iters,
            "label": args.label, "spin_us": args.spin_us, "torch": torch.__version__,
            "command": "python -m dejavu.bench.bench_hops " +
            " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{stamp}-{device}-hops{'-' + args.label if args.label else ''}"
    cuda = args.device.startswith("cuda")
    if args.label and not args.label.replace("-", "").isalnum():
        parser.error(f"--label: {args.label!r} must be letters, digits and dashes")
    rows = hop_rows(args.device, shapes, batches, args.dtype, args.iters, args.warmup,
                    args.spin_us, args.label)
    write(base, meta, rows, [], cuda)  # kept if the throughput run is cut short
    if args.throughput and cuda:
        write(base, meta, rows, throughput_rows(out, args.tokens), cuda)
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
