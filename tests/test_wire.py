"""The wire schema: round trips, validation on decode, tensor frames, fuzzed frames, and a
static check that product code never uses pickle, eval, exec or torch.load."""

from __future__ import annotations

import random
import re
from pathlib import Path

import msgspec
import pytest
import torch

from dejavu.runtime import wire
from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.settings import make_settings
from dejavu.runtime.step import Row, Step, StepResult, TokenResult
from dejavu.scheduler.core import Event

REPO = Path(__file__).resolve().parents[1]


def step(rows=2, width=3) -> Step:
    return Step(7, [Row(f"r{i}", i, list(range(1, width + 1 - i)), 0, True,
                        SamplingParams(max_new_tokens=5, temperature=0.5, seed=3))
                    for i in range(rows)], release=["old"])


def test_every_message_round_trips_through_its_own_socket_decoder():
    worker_msgs = [wire.Hello(1, 42, "h"), wire.Ready(1, (0, 2), "cpu", 10, 20, 0.5),
                   wire.StepDone(2, StepResult(7, [TokenResult("a", 5, -0.1, [(5, -0.1)])],
                                               {"b": "boom"}), [0.1], [0.01]),
                   wire.StepFailed(2, 7, 1, "oom"), wire.Heartbeat(1, 3, 7, 0.2),
                   wire.Fatal(1, "watchdog")]
    for m in worker_msgs:
        assert wire.decode_worker(wire.encode(m)) == m
    # The settings travel whole and typed, non-default values included.
    settings = make_settings({"model.path": "/m", "sparsity.mlp_recall": 0.95,
                              "sparsity.dense_layers": "0", "sparsity.backend": "torch"})
    sched_msgs = [wire.RunStep(1, step()), wire.SetEpoch(3), wire.HeartbeatAck(9),
                  wire.Shutdown("bye"),
                  wire.Setup(settings, (0, 2), "cpu", 8, 128, None, "ipc:///x", 0, 1.0,
                             60.0, 30.0, 1 << 20, token="t", threads=1,
                             faults=[wire.Fault("raise", 1, 2, request="r1")])]
    for m in sched_msgs:
        assert wire.decode_scheduler(wire.encode(m)) == m
    assert wire.decode_scheduler(wire.encode(sched_msgs[-1])).settings.sparsity.mlp_recall == 0.95
    client_msgs = [wire.Generate("x", [1, 2], SamplingParams(stop=("a",))), wire.Abort("x"),
                   wire.HealthQuery()]
    for m in client_msgs:
        assert wire.decode_client(wire.encode(m)) == m
    ev = wire.Events([Event("x", token=3, text="hi", logprob=-1.0, top=[(3, -1.0)]),
                      Event("x", finished=True, finish_reason="error", error="worker died")])
    assert wire.decode_reply(wire.encode(ev)) == ev


def test_a_message_cannot_arrive_on_the_wrong_socket():
    with pytest.raises(wire.WireError):
        wire.decode_client(wire.encode(wire.StepFailed(0, 1, 0, "x")))
    with pytest.raises(wire.WireError):
        wire.decode_worker(wire.encode(wire.Generate("x", [1], SamplingParams())))
    with pytest.raises(wire.WireError):
        wire.decode_scheduler(wire.encode(wire.Hello(0, 1, "h")))


def test_decoding_validates_types_ranges_and_unknown_fields():
    good = msgspec.msgpack.decode(wire.encode(wire.Generate("x", [1, 2], SamplingParams())))
    for field, value in [("prompt", ["a"]), ("request_id", 5), ("prompt", "12")]:
        bad = dict(good, **{field: value})
        with pytest.raises(wire.WireError, match="client"):
            wire.decode_client(msgspec.msgpack.encode(bad))
    # SamplingParams re-runs its own range checks on decode: the message names the field.
    bad = dict(good, params=dict(good["params"], temperature=float("nan")))
    with pytest.raises(wire.WireError, match="temperature"):
        wire.decode_client(msgspec.msgpack.encode(bad))
    with pytest.raises(wire.WireError, match="unknown"):
        wire.decode_client(msgspec.msgpack.encode(dict(good, extra=1)))
    with pytest.raises(wire.WireError):
        wire.decode_client(msgspec.msgpack.encode(dict(good, prompt=[1.5, 2**64 - 1])))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_activations_travel_as_header_plus_raw_frame_bit_exact(dtype):
    s = step(rows=2, width=3)
    hidden = torch.randn(2, 3, 8).to(wire.DTYPES[dtype])
    header = wire.encode(wire.Activations(1, s, dtype, (2, 3, 8)))
    frame = wire.tensor_frame(hidden)
    assert frame.nbytes == hidden.numel() * hidden.element_size()
    msg, got, carry = wire.decode_activations(header, bytes(frame), hidden_size=8)
    assert msg.step == s and got.dtype == hidden.dtype and carry is None
    assert torch.equal(got, hidden)


def test_activations_that_disagree_with_their_header_are_refused():
    s = step(rows=2, width=3)
    hidden = torch.randn(2, 3, 8)

    def check(header_kw, payload, match):
        kw = dict(epoch=1, step=s, dtype="float32", shape=(2, 3, 8)) | header_kw
        with pytest.raises(wire.WireError, match=match):
            wire.decode_activations(wire.encode(wire.Activations(**kw)), payload, 8)

    check({"shape": (2, 4, 8)}, bytes(wire.tensor_frame(hidden)), "shape")
    check({"dtype": "int64"}, bytes(wire.tensor_frame(hidden)), "dtype")
    check({}, bytes(wire.tensor_frame(hidden))[:-4], "bytes")
    nan = hidden.clone()
    nan[1, 2, 3] = float("nan")
    check({}, bytes(wire.tensor_frame(nan)), "NaN")
    check({"step": Step(1, [])}, b"", "no rows")
    check({"carry": True}, bytes(wire.tensor_frame(hidden)), "carry")


def _junk(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 60 else 6)
    if kind == 0:
        return rng.randrange(-(2**63), 2**64)
    if kind == 1:
        return rng.choice([float("nan"), float("inf"), -0.0, 1e308, rng.random()])
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 3:
        return rng.randbytes(rng.randrange(16))
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return rng.choice(["Generate", "Abort", "HealthQuery", "RunStep", "Activations",
                           "StepDone", "Setup", "Hello"])
    if kind == 6:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:  # deep nesting
        value = []
        for _ in range(rng.randrange(1, 200)):
            value = [value]
        return value
    keys = ["kind", "request_id", "prompt", "params", "step", "rows", "epoch", "dtype", "shape"]
    return {rng.choice(keys): _junk(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_fuzzed_frames_raise_only_wire_errors():
    rng = random.Random(0)
    good = wire.encode(wire.Generate("x", [1, 2, 3], SamplingParams()))
    decoders = [wire.decode_client, wire.decode_worker, wire.decode_scheduler,
                wire.decode_reply]
    for i in range(3000):
        choice = i % 3
        if choice == 0:
            frame = rng.randbytes(rng.randrange(64))
        elif choice == 1:
            frame = msgspec.msgpack.encode(_junk(rng))
        else:  # a valid message with a few bytes flipped or cut
            b = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            frame = bytes(b[: rng.randrange(1, len(b) + 1)])
        for decode in decoders:
            try:
                decode(frame)
            except wire.WireError:
                pass
        try:
            wire.decode_activations(frame, rng.randbytes(rng.randrange(64)), 8)
        except wire.WireError:
            pass


# Product code: everything installed as the dejavu package.
PRODUCT_DIRS = ["runtime", "workers", "scheduler", "kernels", "tools"]
FORBIDDEN = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|marshal|shelve)\b", re.M),
     "pickle-like module"),
    (re.compile(r"(?<![\w.])eval\s*\("), "eval()"),
    (re.compile(r"(?<![\w.])exec\s*\("), "exec()"),
    (re.compile(r"torch\.load\s*\((?![^)]*weights_only\s*=\s*True)"), "torch.load without "
                                                                        "weights_only=True"),
    (re.compile(r"\bext_hook\b|\bmsgpack\.ExtType\b"), "msgpack extension hook"),
    (re.compile(r"\brecv_pyobj\b|\bsend_pyobj\b"), "pyzmq pickle helpers"),
]


def forbidden_uses(text: str) -> list[str]:
    return [what for pattern, what in FORBIDDEN if pattern.search(text)]


def test_the_static_check_catches_what_it_should():
    assert forbidden_uses("import pickle\n") == ["pickle-like module"]
    assert forbidden_uses("x = eval(s)") == ["eval()"]
    assert forbidden_uses("sock.recv_pyobj()") == ["pyzmq pickle helpers"]
    assert forbidden_uses("torch.load(f)") == ["torch.load without weights_only=True"]
    assert forbidden_uses("torch.load(f, weights_only=True)") == []
    assert forbidden_uses("model.eval()\nliteral_eval(x)") == []


def test_product_code_has_no_pickle_eval_exec_or_torch_load():
    offenders = []
    for folder in PRODUCT_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for what in forbidden_uses(path.read_text(encoding="utf-8")):
                offenders.append(f"{path.relative_to(REPO)}: {what}")
    assert offenders == []
