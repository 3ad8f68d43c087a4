"""Activations between neighbouring workers of one host, through slot buffers they share.

The receiving worker owns a ring of slot buffers for its input (``Ring``) and offers it
once, in its ``Ready``; the scheduler forwards the offer to the sending worker, which opens
it (``SlotWriter``) when it can, else keeps the socket. Where the slots live:
- "cuda": one allocation on the receiver's GPU, shared by CUDA IPC, with two interprocess
  events per slot; the sender's copy and the receiver's read stay on their streams;
- "shm": a file in /dev/shm (CPU workers), so the CPU tests run this same protocol.

Per slot, a state word in a small shared-memory file says who may touch the slot: FREE (0,
the sender may write it) or the number of the fill that is in it (the receiver owns it
until it has read it). Fills are numbered 1, 2, ... by the one sender, in order:
- sender (``SlotWriter.put``): takes a FREE slot (none, or tensors too large: it returns
  None and the hop takes the socket; it never waits), copies hidden [and carry] in, writes
  the encoded header into the slot's header box, stores the fill number in the slot's state
  and then in ``last fill``; the caller sends the same header on the data socket (the
  doorbell);
- receiver: checks the slot holds the header's fill, then either copies the tensors out
  and marks it FREE (``Ring.take``, the plain reference), or lends them in place, views of
  the slot, marking it FREE only at ``Ring.release`` once the step that read them is
  issued (``Ring.lend``, what a worker does: no copy and no allocation per hop).
The receiver may pick a fill up before its doorbell (``Ring.wait_fill``): it spins, for a
bounded time, on ``last fill`` reaching the next fill it expects, then reads the header
from the box, decodes and checks it exactly as the doorbell's, and takes the tensors; the
doorbell that comes later is recognised (``Ring.seen``) and dropped. That saves the
socket's thread wake-ups on a hop. A fill goes in order with the socket's other messages
(activations that took the socket, selections sent ahead): a fill made after such a
message has an empty box, so the receiver waits for its doorbell, which the socket
delivers after that message.
On CUDA the copies are asynchronous: the sender's stream waits on the slot's ``free``
event before its copy and records ``ready`` after; the receiver's stream waits on
``ready`` before it reads the slot and records ``free`` after its last read (after the
copy out, or, lent, after the whole step that read the views). No host synchronisation on
either side: a state word is written after the event record it announces, so the event a
side waits on is always the latest one that matters.
Per hop neither side makes new tensor views: the typed views of a slot for a (dtype,
shape) are made once and kept (``SlotViews``).

What this module does not know: sockets, steps, or what the tensors mean.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import time
from pathlib import Path

import numpy as np
import torch

from ..runtime import wire
from ..runtime.pids import process_alive

FREE, FILLED = 0, 1  # FILLED: the first fill's number; any fill number > 0 is a full slot
MAGIC = 0x444A5652494E4732  # "DJVRING2": the file is a ring of this module, this layout
# Words of the file's first HEADER bytes: magic, slots, slot_bytes, last fill, one state per
# slot. Then one header box of BOX bytes per slot ([int64 length][encoded header]; length 0:
# the header comes only by the socket), then (CPU rings) the slots.
HEADER = 4096
BOX = 4096
FIRST_STATE = 4
SHM_DIR = Path("/dev/shm")
PREFIX = "dejavu-ring"


class PlaneError(RuntimeError):
    """A ring that cannot be made or opened here; the hop then takes the socket."""


def boot_id() -> str:
    """This machine's boot id: two workers with equal host names and boot ids share a
    kernel, hence /dev/shm and the GPUs' IPC."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def slot_bytes_for(slots: int, max_len: int, hidden_size: int, dtype: torch.dtype,
                   carry: bool, cap_mib: float) -> int:
    """One slot's bytes: the largest step this worker can receive ([slots, max_len,
    hidden], twice with the carried predictor input) or ``cap_mib``, whichever is less."""
    step = slots * max_len * hidden_size * torch.empty((), dtype=dtype).element_size()
    step *= 2 if carry else 1
    return max(64, min(step, int(cap_mib * 2**20)) // 64 * 64)


# --- the shared state file -------------------------------------------------------------------


def _sweep_stale() -> None:
    """Remove ring files of this user whose owner died without closing them (kill -9)."""
    for path in SHM_DIR.glob(f"{PREFIX}-{os.getuid()}-*"):
        try:
            pid = int(path.name.split("-")[3])
        except (IndexError, ValueError):
            continue
        if pid > 0 and not process_alive(pid):
            path.unlink(missing_ok=True)


def _map(path: Path, nbytes: int, *, create: bool) -> torch.Tensor:
    """The file at ``path`` mapped shared, as ``nbytes`` uint8 (made 0600 when ``create``)."""
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
    elif (size := path.stat().st_size) != nbytes:
        raise PlaneError(f"{path} has {size} bytes, the offer implies {nbytes}")
    return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)


def _file_bytes(slots: int, slot_bytes: int, cuda: bool) -> int:
    return HEADER + slots * BOX + (0 if cuda else slots * slot_bytes)


def _words(mem: torch.Tensor, slots: int, slot_bytes: int, *, create: bool) -> np.ndarray:
    """The file's header words (numpy views, not tensors: a state is read or written twice
    per hop, and indexing a tensor costs 1-2 us each against ~0.1 us here). An aligned int64
    store is one store, and x86 keeps stores in order (and loads in order), so a slot's
    bytes and box are visible before the fill number that announces them."""
    words = mem[:HEADER].numpy().view(np.int64)
    if create:
        words[:3] = [MAGIC, slots, slot_bytes]
    elif words[:3].tolist() != [MAGIC, slots, slot_bytes]:
        raise PlaneError("the shared file does not hold the ring that was offered")
    return words


def _boxes(mem: torch.Tensor, slots: int) -> tuple[np.ndarray, np.ndarray, memoryview]:
    """Each slot's header box: [slots, BOX] bytes, their length words ([slots] int64, a
    strided view) and the boxes as one writable memoryview (a header is stored with one
    slice assignment)."""
    boxes = mem[HEADER:HEADER + slots * BOX].numpy().reshape(slots, BOX)
    lengths = boxes.reshape(-1).view(np.int64)[::BOX // 8]
    return boxes, lengths, memoryview(boxes.reshape(-1))


class SlotViews:
    """Typed views of one ring's slots, ``(hidden, carry or None)`` per (slot, dtype,
    shape, carry), made on first use and kept: a step of a shape seen before costs a dict
    lookup, not four tensor views (1-2 us each). Bounded: prefill widths vary."""

    LIMIT = 512

    def __init__(self, block: torch.Tensor, slot_bytes: int) -> None:
        self.block, self.slot_bytes = block, slot_bytes
        self._views: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def get(self, slot: int, dtype: torch.dtype, shape: tuple[int, ...], carry: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The views, or None when the tensors do not fit in a slot."""
        key = (slot, dtype, shape, carry)
        views = self._views.get(key)
        if views is None:
            views = self._make(slot, dtype, shape, carry)
            if views is None:
                return None
            if len(self._views) >= self.LIMIT:
                self._views.clear()
            self._views[key] = views
        return views

    def _make(self, slot, dtype, shape, carry):
        one = math.prod(shape) * dtype.itemsize
        if one * (2 if carry else 1) > self.slot_bytes:
            return None
        base = slot * self.slot_bytes
        hidden = self.block[base:base + one].view(dtype).view(shape)
        if not carry:
            return hidden, None
        return hidden, self.block[base + one:base + 2 * one].view(dtype).view(shape)


# --- receiver ----------------------------------------------------------------------------------


class Ring:
    """The slots a receiving worker reads its input from; made at start-up, offered once."""

    def __init__(self, device: str | torch.device, slots: int, slot_bytes: int) -> None:
        if not SHM_DIR.is_dir():
            raise PlaneError(f"no {SHM_DIR} on this host")
        if not 1 <= slots <= (HEADER // 8 - FIRST_STATE):
            raise PlaneError(f"{slots} slots: expected 1..{HEADER // 8 - FIRST_STATE}")
        self.device = torch.device(device)
        self.slots, self.slot_bytes = slots, slot_bytes
        self.name = secrets.token_hex(8)
        self.received = self.picked = 0  # fills taken; of them, picked up by spinning
        # Spins that took nothing: no fill in time; a fill whose header is not in its box.
        self.spun_out = self.boxless = 0
        self.next_fill = 1  # the sender's next fill, in the order it makes them
        self.picked_early: set[int] = set()  # fills taken before their doorbell came
        self.lent: list[int] = []  # slots lent in place (``lend``), FREE at ``release``
        _sweep_stale()
        self.path = SHM_DIR / f"{PREFIX}-{os.getuid()}-{os.getpid()}-{self.name}"
        cuda = self.device.type == "cuda"
        self.mem = _map(self.path, _file_bytes(slots, slot_bytes, cuda), create=True)
        words = _words(self.mem, slots, slot_bytes, create=True)
        self.last_fill = words[3:4]
        self.states = words[FIRST_STATE:FIRST_STATE + slots]
        self.boxes, self.box_lengths, _ = _boxes(self.mem, slots)
        self.cuda = cuda
        if cuda:
            with torch.cuda.device(self.device):
                self.block = torch.empty(slots * slot_bytes, dtype=torch.uint8,
                                         device=self.device)
                self.ready = [torch.cuda.Event(interprocess=True) for _ in range(slots)]
                self.free = [torch.cuda.Event(interprocess=True) for _ in range(slots)]
        else:
            self.block = self.mem[HEADER + slots * BOX:]
        self.views = SlotViews(self.block, slot_bytes)

    def offer(self) -> wire.PlaneOffer:
        cuda = None
        uuid = ""
        if self.device.type == "cuda":
            fields = self.block.untyped_storage()._share_cuda_()
            with torch.cuda.device(self.device):
                ready = [bytes(e.ipc_handle()) for e in self.ready]
                free = [bytes(e.ipc_handle()) for e in self.free]
            cuda = wire.CudaRing(bytes(fields[1]), fields[2], fields[3], bytes(fields[4]),
                                 fields[5], None if fields[6] is None else bytes(fields[6]),
                                 bool(fields[7]), ready, free)
            uuid = device_uuid(self.device)
        return wire.PlaneOffer(self.device.type if cuda is None else "cuda", self.name,
                               socket.gethostname(), boot_id(), str(self.path), self.slots,
                               self.slot_bytes, uuid, cuda)

    def decode(self, header: bytes | memoryview, hidden_size: int) -> wire.Activations:
        return wire.decode_slot_header(header, hidden_size, ring=self.name, slots=self.slots,
                                       slot_bytes=self.slot_bytes)

    def check(self, msg, hidden_size: int) -> wire.Activations:
        """``decode``'s checks on a header already decoded (``wire.decode_data``)."""
        return wire.check_slot_header(msg, hidden_size, ring=self.name, slots=self.slots,
                                      slot_bytes=self.slot_bytes)

    def wait_fill(self, seconds: float) -> bytes | None:
        """Spin up to ``seconds`` for the sender's next fill; its header (to decode and
        check as a doorbell's, then ``take(msg, early=True)``), or None: no fill yet, or one
        whose header comes only by the socket (its box is empty)."""
        want, last = self.next_fill, self.last_fill
        if last[0] < want:
            deadline = time.perf_counter() + seconds
            while last[0] < want:
                if time.perf_counter() >= deadline:
                    self.spun_out += 1
                    return None
        found = np.flatnonzero(self.states == want)
        if not len(found):
            return None  # taken already (its doorbell came first)
        slot = int(found[0])
        n = int(self.box_lengths[slot])
        if not 0 < n <= BOX - 8:
            self.boxless += 1
            return None
        header = self.boxes[slot, 8:8 + n].tobytes()
        self.box_lengths[slot] = 0  # read once: a header refused here waits for its doorbell
        return header

    def seen(self, msg: wire.Activations) -> bool:
        """Whether ``msg`` is the doorbell of a fill already picked up by spinning (drop it)."""
        if msg.fill in self.picked_early:
            self.picked_early.discard(msg.fill)
            return True
        return False

    def take(self, msg: wire.Activations, *, early: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tensors in the slot ``msg`` names (a decoded header), copied out; the slot is
        FREE again afterwards, whatever happens. ``early``: picked up before its doorbell.
        The plain reference of ``lend``."""
        views = self._views_of(msg)
        slot = msg.slot
        try:
            if self.cuda:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(self.ready[slot])
                tensors = [v.clone() for v in views if v is not None]
                self.free[slot].record(stream)
            else:
                # Copied out first, then checked: the check sees what the model will read.
                tensors = [v.clone() for v in views if v is not None]
                for t in tensors:
                    wire.check_finite(t)
        finally:
            self.states[slot] = FREE
            self._taken(msg, early)
        self.received += 1
        return tensors[0], (tensors[1] if msg.carry else None)

    def lend(self, msg: wire.Activations, *, early: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tensors in the slot ``msg`` names, in place: views of the slot, valid until
        ``release``, which the caller must call once it has issued every read of them (on
        CUDA, on this device's current stream). The slot stays this worker's until then (the
        sender cannot write it); a refused read is released at once."""
        views = self._views_of(msg)
        slot = msg.slot
        self.lent.append(slot)
        self._taken(msg, early)
        if self.cuda:
            # No finiteness check here (the socket path has one): it would synchronise with
            # the GPU on every hop. The header carried the cluster's token, so a cluster
            # member wrote the slot.
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        else:
            try:
                for v in views:
                    if v is not None:
                        wire.check_finite(v)
            except wire.WireError:
                self.release()
                raise
        self.received += 1
        return views

    def release(self) -> None:
        """Give back the slots lent since the last release: on CUDA after the reads issued
        so far on this device's current stream (the ``free`` event), at once on a CPU."""
        if not self.lent:
            return
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        for slot in self.lent:
            if stream is not None:
                self.free[slot].record(stream)
            self.states[slot] = FREE  # after the record: the sender waits on the latest one
        self.lent.clear()

    def _views_of(self, msg: wire.Activations):
        """The slot's typed views for ``msg``, once the slot is known to hold its fill."""
        slot = msg.slot
        if msg.fill < FILLED or self.states[slot] != msg.fill:
            raise wire.WireError(f"activations in slot {slot}, which the sender has not filled")
        if slot in self.lent:
            raise wire.WireError(f"activations in slot {slot}, which is being read already")
        views = self.views.get(slot, wire.DTYPES[msg.dtype], msg.shape, msg.carry)
        if views is None:  # check_slot_header refuses these first
            self.states[slot] = FREE
            raise wire.WireError(f"activations of {wire.slot_bytes_of(msg)} bytes cannot be in "
                                 f"a slot of {self.slot_bytes}")
        return views

    def _taken(self, msg: wire.Activations, early: bool) -> None:
        self.next_fill = max(self.next_fill, msg.fill + 1)
        if early:
            self._remember_early(msg.fill)

    def _remember_early(self, fill: int) -> None:
        self.picked += 1
        self.picked_early.add(fill)
        if len(self.picked_early) > 4 * self.slots + 64:  # doorbells that never came
            self.picked_early.discard(min(self.picked_early))

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _local_cuda_index(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", i)) == uuid:
            return i
    raise PlaneError(f"the receiver's GPU {uuid} is not visible to this process")


# --- sender ------------------------------------------------------------------------------------


class SlotWriter:
    """The sender's side of a ring it was offered: ``put`` fills a free slot."""

    def __init__(self, offer: wire.PlaneOffer, device: str | torch.device) -> None:
        self.offer = offer
        self.sent = self.fallbacks = 0
        self._next = 0
        # A fill's header goes in its box only when no other message left by the socket
        # since the previous fill (and not on the first fill: what came before is unknown).
        self._in_order = False
        path = Path(offer.path)
        if path.parent != SHM_DIR or not path.name.startswith(f"{PREFIX}-"):
            raise PlaneError(f"the offered ring file {offer.path!r} is not a ring in {SHM_DIR}")
        cuda = offer.kind == "cuda"
        if cuda and offer.cuda is None:
            raise PlaneError("a cuda ring offered without its handles")
        nbytes = _file_bytes(offer.slots, offer.slot_bytes, cuda)
        try:
            self.mem = _map(path, nbytes, create=False)
        except OSError as exc:
            raise PlaneError(f"cannot open {path}: {exc.strerror}") from None
        words = _words(self.mem, offer.slots, offer.slot_bytes, create=False)
        # A restarted sender goes on numbering where the one before it stopped.
        self.last_fill = words[3:4]
        self.states = words[FIRST_STATE:FIRST_STATE + offer.slots]
        _, self.box_lengths, self.box_bytes = _boxes(self.mem, offer.slots)
        self.device = torch.device(device)
        self.cuda = cuda
        if cuda:
            self._open_cuda(offer)
        else:
            self.ring_device = torch.device("cpu")
            self.block = self.mem[HEADER + offer.slots * BOX:]
        self.views = SlotViews(self.block, offer.slot_bytes)

    def _open_cuda(self, offer: wire.PlaneOffer) -> None:
        if not torch.cuda.is_available():
            raise PlaneError("the ring is on a GPU and this process has no CUDA")
        local = _local_cuda_index(offer.device_uuid)
        if (self.device.type == "cuda" and self.device.index != local
                and not torch.cuda.can_device_access_peer(self.device.index, local)):
            raise PlaneError(f"cuda:{self.device.index} cannot reach cuda:{local} (no peer "
                             "access)")
        c = offer.cuda
        self.ring_device = torch.device("cuda", local)
        with torch.cuda.device(local):
            storage = torch.UntypedStorage._new_shared_cuda(
                local, c.storage_handle, c.storage_size, c.storage_offset,
                c.ref_counter_handle, c.ref_counter_offset, c.event_handle,
                c.event_sync_required)
            self.block = torch.empty(0, dtype=torch.uint8, device=self.ring_device).set_(storage)
            self.ready = [torch.cuda.Event.from_ipc_handle(local, h) for h in c.ready_events]
            self.free = [torch.cuda.Event.from_ipc_handle(local, h) for h in c.free_events]
        if self.block.numel() < offer.slots * offer.slot_bytes:
            raise PlaneError(f"the shared allocation has {self.block.numel()} bytes, the "
                             f"ring needs {offer.slots * offer.slot_bytes}")

    def describe(self) -> str:
        where = (f"CUDA IPC into {self.ring_device} ({self.offer.device_uuid})"
                 if self.offer.kind == "cuda" else "shared memory")
        return (f"{where}, {self.offer.slots} slots of {self.offer.slot_bytes / 2**20:.2f} "
                "MiB, same host")

    def put(self, hidden: torch.Tensor, carry: torch.Tensor | None,
            header: wire.Activations) -> bytes | None:
        """Copy ``hidden`` (then ``carry``, same dtype and shape) into a free slot, name it in
        ``header`` (slot, ring, fill), put the encoded header in the slot's box and announce
        the fill; the encoded header to send as the doorbell, or None when no slot is free
        or the tensors do not fit (send them by the socket and call ``sent_by_socket``).
        The tensors must have the header's dtype and shape (what the receiver will read)."""
        dtype, shape = wire.DTYPES[header.dtype], header.shape
        for t in (hidden, carry):
            if t is not None and (t.dtype is not dtype or t.shape != shape):
                raise ValueError(f"a {t.dtype} tensor of shape {list(t.shape)} under a header "
                                 f"of {header.dtype} {list(shape)}")
        slot = self._free_slot()
        views = None if slot is None else self.views.get(slot, dtype, shape, carry is not None)
        if views is None:
            self.fallbacks += 1
            return None
        fill = int(self.last_fill[0]) + 1
        header.slot, header.ring, header.fill = slot, self.offer.ring, fill
        encoded = wire.encode(header)
        self._copy_in(slot, views, hidden, carry)
        self._write_box(slot, encoded if self._in_order else b"")
        self.states[slot] = fill
        self.last_fill[0] = fill  # after the state: a receiver that sees it finds the slot
        self._next = slot + 1
        self._in_order = True
        self.sent += 1
        return encoded

    def sent_by_socket(self) -> None:
        """Another message to the receiver left by the socket: the next fill must wait for
        its doorbell, behind that message."""
        self._in_order = False

    def _copy_in(self, slot: int, views, hidden: torch.Tensor, carry: torch.Tensor | None
                 ) -> None:
        if self.cuda:
            stream = torch.cuda.current_stream(self.ring_device)
            stream.wait_event(self.free[slot])  # the receiver's read of this slot is done
            views[0].copy_(hidden, non_blocking=True)
            if carry is not None:
                views[1].copy_(carry, non_blocking=True)
            self.ready[slot].record(stream)
        else:
            views[0].copy_(hidden)
            if carry is not None:
                views[1].copy_(carry)

    def _write_box(self, slot: int, encoded: bytes) -> None:
        n = len(encoded) if len(encoded) <= BOX - 8 else 0  # too long: by the socket only
        at = slot * BOX + 8
        self.box_bytes[at:at + n] = encoded[:n]
        self.box_lengths[slot] = n

    def _free_slot(self) -> int | None:
        n = self.offer.slots
        for k in range(n):
            slot = (self._next + k) % n
            if self.states[slot] == FREE:
                return slot
        return None


def open_writer(offer: wire.PlaneOffer | None, note: str, device: str | torch.device,
                setting: str) -> tuple[SlotWriter | None, str]:
    """The writer for ``offer`` and a description of the path, or None and why the hop
    stays on the socket."""
    if setting == "socket":
        return None, 'the socket: [pipeline] data_plane = "socket" on this worker'
    if offer is None:
        return None, f"the socket: the next worker offers no shared ring ({note})"
    if offer.host != socket.gethostname() or offer.boot_id != boot_id():
        return None, f"the socket: the next worker is on another host ({offer.host})"
    try:
        writer = SlotWriter(offer, device)
    except (PlaneError, RuntimeError, OSError) as exc:
        return None, f"the socket: cannot open the next worker's ring: {exc}"
    return writer, writer.describe()


def spin_seconds(setting: float) -> tuple[float, str]:
    """How long a receiving worker spins on its ring after a step, and why."""
    if not setting:
        return 0.0, "0 us (off: [pipeline] data_plane_spin_us = 0, the default)"
    return setting / 1e6, f"{setting:g} us ([pipeline] data_plane_spin_us)"


def make_ring(device: str | torch.device, slots: int, slot_bytes: int, setting: str
              ) -> tuple[Ring | None, str]:
    """A ring for this worker's input, or None and why there is none."""
    if setting == "socket":
        return None, '[pipeline] data_plane = "socket"'
    try:
        return Ring(device, slots, slot_bytes), ""
    except (PlaneError, RuntimeError, OSError) as exc:
        return None, f"cannot make a shared ring here: {exc}"
