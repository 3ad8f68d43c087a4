"""A pipeline client facing slow steps: it must wait for a slow but live scheduler, and
give up on a gone one quickly and with the reason.

Two tests run the real cluster (scheduler and worker processes, a step made slow by a
``sleep`` fault, a ``kill -9`` of the scheduler). Two put the client in front of a scripted
scheduler (a real ROUTER socket in a thread, speaking the wire protocol) to produce, on
demand, what a loaded machine produces by chance: a health answer that never comes back,
and the final ``Health(state="stopped")`` that a stopping scheduler sends its clients.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import zmq
from pipeline_fixtures import GREEDY, PROMPTS, cluster, read_log, short_dir

from dejavu.runtime import wire
from dejavu.runtime.checkpoint import load_model
from dejavu.scheduler.core import Event
from dejavu.scheduler.engine import Engine
from dejavu.scheduler.zmq_client import PipelineConnection, SchedulerGone

SLEEP_S = 4.0  # the slow step: longer than the client's dead_s below
DEAD_S = 2.5
SILENCE_S = 0.5


def health(state: str, detail: str = "") -> wire.Health:
    return wire.Health(state, [], 1, 0, 0, 1.0, 0.0, detail=detail)


class ScriptedScheduler(threading.Thread):
    """A ROUTER that takes ``Generate``s and answers the n-th ``HealthQuery`` with
    ``answer(n)`` (None: no answer); ``finish_after_s`` after a request arrived, it sends
    that request's final event."""

    def __init__(self, answer, finish_after_s: float | None = None) -> None:
        super().__init__(daemon=True)
        self.answer = answer
        self.finish_after_s = finish_after_s
        self.dir = short_dir()
        self.address = f"ipc://{self.dir}/client.sock"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.queries = 0
        self.halt = threading.Event()

    def run(self) -> None:
        due: list[tuple[float, bytes, str]] = []
        while not self.halt.is_set():
            if self.sock.poll(20):
                identity, payload = self.sock.recv_multipart()
                msg = wire.decode_client(payload)
                if isinstance(msg, wire.HealthQuery):
                    self.queries += 1
                    reply = self.answer(self.queries)
                    if reply is not None:
                        self.sock.send_multipart([identity, wire.encode(reply)])
                elif isinstance(msg, wire.Generate) and self.finish_after_s is not None:
                    due.append((time.monotonic() + self.finish_after_s, identity,
                                msg.request_id))
            for item in [d for d in due if d[0] <= time.monotonic()]:
                due.remove(item)
                event = Event(item[2], token=7, finished=True, finish_reason="length")
                self.sock.send_multipart([item[1], wire.encode(wire.Events([event]))])

    def __enter__(self) -> ScriptedScheduler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join(timeout=2)
        self.sock.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_a_lost_health_answer_is_asked_again_not_taken_for_death():
    """The first health query of a silence gets no answer (lost on a loaded machine); the
    scheduler answers every later one, and the request ends after 4 s, longer than dead_s.
    A client that asks only once per silence declares a live scheduler dead."""
    with ScriptedScheduler(lambda n: None if n == 1 else health("ready"),
                           finish_after_s=SLEEP_S) as fake, \
            PipelineConnection(fake.address, silence_s=SILENCE_S, dead_s=DEAD_S) as conn:
        rid = conn.submit([5, 6, 7], GREEDY)
        started = time.monotonic()
        events = conn.events()
        elapsed = time.monotonic() - started
    assert [(e.request_id, e.finished) for e in events] == [(rid, True)]
    assert elapsed >= SLEEP_S - 0.5
    assert fake.queries >= 2  # it asked again after the unanswered query


def test_a_stopped_cluster_is_reported_at_once_with_its_reason():
    """A stopping scheduler's last word to its clients is Health(state="stopped") with the
    reason; a client with a request open must raise at once, naming it, instead of waiting
    dead_s and then blaming silence."""
    reason = "worker died: worker 0 (pid 4242) step 3 has run 60.4 s, past the 60 s watchdog"
    dead_s = 10.0
    with ScriptedScheduler(lambda n: health("stopped", reason) if n == 1 else None) as fake, \
            PipelineConnection(fake.address, silence_s=SILENCE_S, dead_s=dead_s) as conn:
        conn.submit([5, 6, 7], GREEDY)
        started = time.monotonic()
        with pytest.raises(SchedulerGone) as info:
            conn.events()
        elapsed = time.monotonic() - started
    assert elapsed < SILENCE_S + 1.5, f"took {elapsed:.1f} s"
    assert reason in str(info.value) and "1 request(s) lost" in str(info.value)


# --- the real cluster ------------------------------------------------------------------------


def test_a_step_longer_than_the_clients_dead_timeout_is_waited_for(tiny):
    """The scheduler answers health queries while a step sleeps past the client's dead_s."""
    greedy = Engine(load_model(tiny), max_batch=2, max_len=128).generate(PROMPTS[1], GREEDY)
    faults = [wire.Fault("sleep", worker=1, seconds=SLEEP_S, request="slow")]
    with cluster(tiny, 2, faults=faults, restart="never") as c:
        with PipelineConnection(c.address, silence_s=SILENCE_S, dead_s=DEAD_S) as conn:
            started = time.monotonic()
            rid = conn.submit(PROMPTS[1], GREEDY, request_id="slow")
            tokens, final = [], None
            while final is None:
                for e in conn.events():
                    assert e.request_id == rid
                    tokens += [e.token] if e.token is not None else []
                    final = e if e.finished else None
            elapsed = time.monotonic() - started
        assert elapsed >= SLEEP_S
        assert final.error is None and tokens == greedy.tokens
        assert "worker died" not in read_log(c)


def test_a_killed_scheduler_is_still_declared_gone_within_dead_s(tiny):
    faults = [wire.Fault("sleep", worker=0, seconds=30.0, request="slow")]
    with cluster(tiny, 1, faults=faults, restart="never") as c:
        with PipelineConnection(c.address, silence_s=SILENCE_S, dead_s=DEAD_S) as conn:
            conn.submit(PROMPTS[1], GREEDY, request_id="slow")
            time.sleep(0.5)  # the step is sleeping on the worker
            os.kill(c.proc.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(SchedulerGone, match="has not answered"):
                while True:
                    conn.events()
            elapsed = time.monotonic() - started
        assert elapsed < DEAD_S + 1.0, f"took {elapsed:.1f} s"


def test_after_a_watchdog_stops_the_cluster_the_next_request_fails_at_once_naming_it(tiny):
    """What a loaded 2-core box did to ``bench_pipeline`` (Triton interpreter): the warm-up
    prefill outlived the step watchdog, the worker exited, the cluster stopped (restart
    "never") and told its clients why. The next request must fail at once with that
    reason, not after dead_s of silence blamed on the scheduler."""
    faults = [wire.Fault("sleep", worker=0, seconds=5.0, request="slow")]
    dead_s = 10.0
    with cluster(tiny, 2, faults=faults, restart="never", watchdog_s=1.0) as c:
        with PipelineConnection(c.address, silence_s=SILENCE_S, dead_s=dead_s) as conn:
            rid = conn.submit(PROMPTS[1], GREEDY, request_id="slow")
            final = None
            while final is None:
                final = next((e for e in conn.events() if e.finished), None)
            assert final.request_id == rid and "past the 1 s watchdog" in final.error
            assert c.proc.wait(timeout=10) == 3  # the cluster stopped
            conn.submit(PROMPTS[0], GREEDY)
            started = time.monotonic()
            with pytest.raises(SchedulerGone, match="stopped: worker died: worker 0") as info:
                conn.events()
            elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"took {elapsed:.1f} s"
    assert "watchdog" in str(info.value)
