"""reliability.md, case by case, with real processes on the CPU: a scheduler process and
worker processes over ZeroMQ, faults injected at exact points (a raise, an out-of-memory
error, a sleep or a hang when a given request reaches a given worker) or from outside
(kill -9, SIGSTOP, SIGTERM). Each test asserts the figure of its row."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Collection

import msgspec
import pytest
import zmq
from pipeline_fixtures import GREEDY, PROMPTS, alive, cluster, read_log, wait_until

from dejavu.runtime import wire
from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.step import Row, Step, StepResult
from dejavu.scheduler.zmq_client import PipelineConnection

LONG = SamplingParams(max_new_tokens=110, ignore_eos=True)


def start_three(conn: PipelineConnection, timeout_s: float = 60.0) -> dict[str, int]:
    """Three long requests, returned once each has streamed a token (so all are in flight),
    as request id -> tokens read so far: on a loaded machine one request may stream several
    tokens before another starts, and a caller that counts tokens must start from these.
    Events of other requests (late ones of an earlier test) are not theirs and are skipped."""
    tokens = {conn.submit(PROMPTS[i], LONG): 0 for i in range(3)}
    deadline = time.monotonic() + timeout_s
    while not all(tokens.values()):
        assert time.monotonic() < deadline, f"requests not all started in {timeout_s} s"
        for e in conn.events(timeout_s=1.0):
            if e.request_id in tokens:
                assert not e.finished, e
                tokens[e.request_id] += e.token is not None
    return tokens


def collect_errors(conn: PipelineConnection, rids: Collection[str], timeout_s: float) -> dict:
    """request id -> (seconds until its final event, its error)."""
    start = time.monotonic()
    done = {}
    while set(done) != set(rids) and time.monotonic() - start < timeout_s:
        for e in conn.events(timeout_s=0.05):
            if e.finished and e.request_id in rids:
                done[e.request_id] = (time.monotonic() - start, e.error)
    return done


# --- one cluster, several faults that it must survive --------------------------------------

FAULTS = [
    wire.Fault("sleep", worker=1, seconds=5.0, request="slow"),
    wire.Fault("oom", worker=0, request="oom"),
    wire.Fault("raise", worker=1, request="bad"),
]


@pytest.fixture(scope="module")
def survivor(tiny):
    with cluster(tiny, 2, faults=FAULTS, restart="never") as c:
        yield c


def test_a_slow_healthy_step_is_not_declared_dead(survivor, greedy):
    with PipelineConnection(survivor.address) as conn:
        pids = [w.pid for w in conn.health().workers]
        started = time.monotonic()
        out = conn.run([PROMPTS[0]], GREEDY)  # warm-up, then the 5 s step
        rid = conn.submit(PROMPTS[1], GREEDY, request_id="slow")
        tokens, final = [], None
        while final is None:
            for e in conn.events():
                if e.request_id == rid:
                    tokens += [e.token] if e.token is not None else []
                    final = e if e.finished else None
        elapsed = time.monotonic() - started
        assert elapsed >= 5.0  # the sleep really happened
        assert final.error is None and tokens == greedy[1] and out[0].tokens == greedy[0]
        health = conn.health()
        assert [w.pid for w in health.workers] == pids
        assert all(w.state == "ready" for w in health.workers)
    assert "worker died" not in read_log(survivor)


def test_out_of_memory_fails_that_batch_and_the_worker_serves_the_next(survivor, greedy):
    with PipelineConnection(survivor.address) as conn:
        pids = [w.pid for w in conn.health().workers]
        conn.submit(PROMPTS[2], GREEDY, request_id="oom")
        (event,) = [e for e in conn.events(timeout_s=10) if e.finished]
        assert event.request_id == "oom" and event.finish_reason == "error"
        assert "OutOfMemoryError" in event.error and "worker 0" in event.error
        assert [c.tokens for c in conn.run(PROMPTS[:4], GREEDY)] == greedy[:4]
        assert [w.pid for w in conn.health().workers] == pids


def test_an_exception_in_one_requests_step_fails_only_that_request(survivor, greedy):
    with PipelineConnection(survivor.address) as conn:
        rids = [conn.submit(PROMPTS[i], GREEDY, request_id=rid)
                for i, rid in enumerate(["ok-a", "bad", "ok-b"])]
        done: dict[str, list] = {rid: [] for rid in rids}
        while not all(evs and evs[-1].finished for evs in done.values()):
            for e in conn.events(timeout_s=10):
                done[e.request_id].append(e)
        finals = {rid: evs[-1] for rid, evs in done.items()}
        assert finals["bad"].finish_reason == "error"
        assert "request bad" in finals["bad"].error and "InjectedFault" in finals["bad"].error
        for rid, i in (("ok-a", 0), ("ok-b", 2)):
            assert finals[rid].error is None
            assert [e.token for e in done[rid] if e.token is not None] == greedy[i]
        assert rids and conn.run([PROMPTS[5]], GREEDY)[0].tokens == greedy[5]


def test_fuzzed_frames_on_every_socket_crash_nothing(survivor, greedy):
    """Thousands of random and malformed frames to the client socket, the control socket
    (posing as workers) and a worker's data socket; then the cluster still answers right."""
    rng = random.Random(1)
    run_dir = os.path.dirname(survivor.address[len("ipc://"):])
    ctx = zmq.Context()
    socks = []
    try:
        client = ctx.socket(zmq.DEALER)
        client.connect(survivor.address)
        control = [ctx.socket(zmq.DEALER) for _ in range(3)]
        # Not the workers' own routing ids: taking those over is a different attack, by
        # a process of the same user (the run directory is 0700), outside this test.
        for sock, ident in zip(control, [b"w9", b"w0.hbx", b"intruder"], strict=True):
            sock.setsockopt(zmq.IDENTITY, ident)
            sock.connect(f"ipc://{run_dir}/control.sock")
        data = ctx.socket(zmq.PUSH)
        data.connect(f"ipc://{run_dir}/data1.sock")
        socks = [client, *control, data]
        for sock in socks:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100000)
        good_step = Step(10**6, [Row("fuzz", 0, [1, 2], 0, True, SamplingParams())])
        valid = [wire.encode(wire.Generate("f", [1], SamplingParams())),
                 wire.encode(wire.StepDone(0, StepResult(123456, [], {}))),
                 wire.encode(wire.Activations(0, good_step, "float32", (1, 2, 32)))]
        for i in range(3000):
            kind = i % 4
            if kind == 0:
                frames = [rng.randbytes(rng.randrange(200))]
            elif kind == 1:
                frames = [msgspec.msgpack.encode(_junk(rng))]
            elif kind == 2:
                b = bytearray(rng.choice(valid))
                b[rng.randrange(len(b))] = rng.randrange(256)
                frames = [bytes(b)]
            else:
                frames = [rng.randbytes(8) for _ in range(rng.randrange(0, 4))] or [b""]
            if rng.random() < 0.3:  # the data socket wants header + tensor
                frames = [*frames, rng.randbytes(rng.choice([0, 8, 256]))]
            for sock in (client, rng.choice(control), data):
                sock.send_multipart(frames)
        # Valid-looking but wrong: a NaN tensor and a step that no one scheduled.
        import torch

        nan = torch.full((1, 2, 32), float("nan"))
        data.send_multipart([valid[2], bytes(wire.tensor_frame(nan))])
        time.sleep(1.0)
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
    with PipelineConnection(survivor.address) as conn:
        assert [c.tokens for c in conn.run(PROMPTS, GREEDY)] == greedy
        health = conn.health()
        assert all(w.state == "ready" for w in health.workers)
    assert "dropped a bad" in read_log(survivor)


def _junk(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 8 else 4)
    if kind == 0:
        return rng.choice([rng.randrange(-(2**63), 2**64), float("nan"), float("inf"), None])
    if kind == 1:
        return rng.choice(["Generate", "Abort", "HealthQuery", "StepDone", "Heartbeat",
                           "Activations", "Hello", "Ready"])
    if kind == 2:
        return rng.randbytes(rng.randrange(8))
    if kind == 3:
        value: list = []
        for _ in range(rng.randrange(1, 300)):
            value = [value]
        return value
    if kind == 4:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["kind", "request_id", "prompt", "params", "step", "epoch", "index", "result"]
    return {rng.choice(keys): _junk(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_zz_kill_9_of_a_worker_fails_its_requests_fast_and_stops_launch(survivor):
    """Runs last in this module: it ends the shared cluster."""
    with PipelineConnection(survivor.address) as conn:
        victim = conn.health().workers[1].pid
        rids = start_three(conn)
        os.kill(victim, signal.SIGKILL)
        done = collect_errors(conn, rids, timeout_s=5)
    assert set(done) == set(rids), "every request in flight must end"
    worst = max(t for t, _ in done.values())
    print(f"kill -9: all 3 requests failed {worst * 1000:.0f} ms after the kill")
    assert worst < 0.5  # noticed (process sentinel) and reported within 0.5 s
    for _, error in done.values():
        assert error.startswith("worker died: worker 1") and f"pid {victim}" in error
        assert "SIGKILL" in error
    assert survivor.proc.wait(timeout=10) == 3
    assert f"worker 1 (pid {victim}) killed by SIGKILL" in read_log(survivor)


# --- freezing, a step that never ends, restarts, and the scheduler's own death -------------
# One cluster that restarts dead workers serves all four cases, in this order.


@pytest.fixture(scope="module")
def phoenix(tiny):
    hang = [wire.Fault("hang", worker=1, request="stuck")]
    with cluster(tiny, 2, heartbeat_s=0.3, watchdog_s=1.5, restart="on-failure",
                 max_restarts=30, faults=hang) as c:
        yield c


def _back(conn: PipelineConnection) -> None:
    assert wait_until(lambda: conn.health().state == "ready", 60, 0.1) is not None


def test_a_frozen_worker_is_detected_within_three_heartbeats_plus_one_second(phoenix, greedy):
    with PipelineConnection(phoenix.address) as conn:
        victim = conn.health().workers[1].pid
        rids = start_three(conn)
        os.kill(victim, signal.SIGSTOP)
        try:
            done = collect_errors(conn, rids, timeout_s=5)
        finally:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert set(done) == set(rids)
        worst = max(t for t, _ in done.values())
        print(f"SIGSTOP: requests failed {worst:.2f} s after the stop (bound 1.9 s)")
        assert worst <= 3 * 0.3 + 1.0
        assert all("stopped responding" in err for _, err in done.values())
        assert wait_until(lambda: not alive(victim), 5) is not None  # killed, not left frozen
        _back(conn)
        assert conn.run([PROMPTS[0]], GREEDY)[0].tokens == greedy[0]


def test_a_step_that_never_ends_trips_the_watchdog(phoenix, greedy):
    with PipelineConnection(phoenix.address) as conn:
        victim = conn.health().workers[1].pid
        started = time.monotonic()
        conn.submit(PROMPTS[0], GREEDY, request_id="stuck")
        done = collect_errors(conn, ["stuck"], timeout_s=10)
        elapsed = time.monotonic() - started
        print(f"watchdog: the hung step failed after {elapsed:.2f} s (watchdog 1.5 s)")
        (_, error), = done.values()
        assert "watchdog" in error and "worker 1" in error
        assert 1.5 <= elapsed < 1.5 + 2.0
        assert wait_until(lambda: not alive(victim), 5) is not None
        _back(conn)
        assert conn.run([PROMPTS[1]], GREEDY)[0].tokens == greedy[1]
    assert "past the 1.5 s watchdog" in read_log(phoenix)


def _scheduler_resources(pid: int) -> tuple[int, int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return fds, threads, rss


@pytest.mark.slow
def test_restart_policy_brings_a_killed_worker_back_20_times_without_leaks(phoenix, greedy):
    with PipelineConnection(phoenix.address) as conn:
        scheduler = phoenix.proc.pid
        baseline = None
        restarts = conn.health().workers[1].restarts
        for cycle in range(21):
            victim = conn.health().workers[1].pid
            rids = start_three(conn)
            os.kill(victim, signal.SIGKILL)
            done = collect_errors(conn, rids, timeout_s=5)
            assert set(done) == set(rids)
            assert all("worker died" in err and "SIGKILL" in err for _, err in done.values())
            _back(conn)
            # The restarted worker serves the next request, with the right tokens.
            assert conn.run([PROMPTS[cycle % 8]], GREEDY)[0].tokens == greedy[cycle % 8]
            if cycle == 0:  # after one full cycle every lazily made resource exists
                baseline = _scheduler_resources(scheduler)
        after = _scheduler_resources(scheduler)
        print(f"scheduler fds/threads/RSS KiB: baseline {baseline}, after 20 cycles {after}")
        assert after[0] <= baseline[0] and after[1] <= baseline[1]
        assert after[2] <= baseline[2] + 8 * 1024  # RSS within 8 MiB of the baseline
        assert conn.health().workers[1].restarts == restarts + 21


def test_zz_workers_exit_within_5_s_when_the_scheduler_is_killed(phoenix):
    """Runs last: it ends the shared cluster."""
    with PipelineConnection(phoenix.address) as conn:
        pids = [w.pid for w in conn.health().workers]
        start_three(conn)
        os.kill(phoenix.proc.pid, signal.SIGKILL)
        phoenix.proc.wait()
        gone = wait_until(lambda: not any(alive(p) for p in pids), 5.0)
        print(f"scheduler kill -9: workers gone after {gone} s")
        assert gone is not None and gone < 5.0


# --- the scheduler's own death and a clean stop ------------------------------------------------


def test_sigterm_to_the_launch_process_group_drains_and_exits_0(tiny):
    """systemd's default stop and `timeout` signal the whole process group: the workers
    leave stopping to the scheduler, which drains and exits 0 (workers used to die at once
    with exit code 255, and the launch with 3, "worker died")."""
    with cluster(tiny, 2, drain_timeout_s=10) as c, PipelineConnection(c.address) as conn:
        assert conn.run([PROMPTS[0]], GREEDY)[0].error is None
        os.killpg(c.proc.pid, signal.SIGTERM)
        assert c.proc.wait(timeout=30) == 0, c.proc.returncode


def test_sigterm_while_streaming_drains_and_exits_0_leaving_nothing(tiny, greedy):
    with cluster(tiny, 2, drain_timeout_s=10) as c, PipelineConnection(c.address) as conn:
        run_dir = os.path.dirname(c.address[len("ipc://"):])
        pids = [w.pid for w in conn.health().workers]
        # A second launch on the same run directory is refused, not allowed to steal it.
        second = subprocess.run(
            [sys.executable, "-m", "dejavu.scheduler.launch", "--config-json",
             msgspec.json.encode(c.config).decode()], capture_output=True, text=True,
            timeout=60)
        assert second.returncode == 2 and "in use by a running launch" in second.stderr
        assert os.path.exists(f"{run_dir}/client.sock")
        # Directory private to this user.
        assert os.stat(run_dir).st_mode & 0o777 == 0o700
        rids = start_three(conn)
        started = time.monotonic()
        c.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: conn.health().state == "draining", 5) is not None
        late = conn.run([PROMPTS[3]], GREEDY)[0]  # refused: draining
        done = {}
        tokens = dict(rids)  # what start_three read already
        while len(done) < 3:
            for e in conn.events(timeout_s=10):
                if e.request_id not in tokens:
                    continue
                tokens[e.request_id] += e.token is not None
                if e.finished:
                    done[e.request_id] = e
        assert c.proc.wait(timeout=15) == 0
        elapsed = time.monotonic() - started
        print(f"SIGTERM: drained 3 streams and exited 0 in {elapsed:.2f} s")
        assert not [n for n in os.listdir(run_dir) if n.endswith(".sock") or n == "lock"]
    assert "shutting down" in late.error
    assert all(e.finish_reason == "length" and e.error is None for e in done.values())
    assert all(n == LONG.max_new_tokens for n in tokens.values())  # drained, not cut
    assert wait_until(lambda: not any(alive(p) for p in pids), 5) is not None
