"""What the server does when things go wrong around a request: no or a wrong API key, a
full queue, a client that goes away mid-request, and an engine that dies with requests in
flight. Faults are injected into the real engine (a slow or raising step)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from serve_fixtures import make_checkpoint, start


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "tiny")


def slow_steps(engine, seconds: float) -> None:
    """Every engine step takes at least `seconds` (runs on the engine thread)."""
    real = engine.stage.run

    def run(step):
        time.sleep(seconds)
        return real(step)

    engine.stage.run = run


def wait_until(predicate, timeout: float) -> float:
    """Seconds until predicate() holds; fails after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - t0


LONG = {"prompt": "the cat", "max_tokens": 80, "temperature": 0, "ignore_eos": True}


def test_api_key_guards_everything_but_health(model_dir):
    with start(model_dir, api_key="sekrit") as s:
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"),
                             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/openapi.json"), ("GET", "/docs")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
                r = httpx.request(method, s.url + path, headers=headers, json={})
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(s.url + "/health").status_code == 200
        good = {"Authorization": "Bearer sekrit"}
        assert httpx.get(s.url + "/v1/models", headers=good).status_code == 200
        r = httpx.post(s.url + "/v1/completions", headers=good,
                       json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 200


def test_full_queue_answers_429_then_recovers(model_dir):
    with start(model_dir, max_pending=2) as s:
        slow_steps(s.engine, 0.02)
        with httpx.stream("POST", s.url + "/v1/completions",
                          json={**LONG, "n": 2, "stream": True}) as running:
            assert running.status_code == 200
            # Keep the iterator: dropping it would close the connection (a disconnect).
            lines = running.iter_lines()
            next(lines)  # both choices are in the engine now
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "queue_full"
        # The stream was closed early; its two slots free up and requests go through again.
        wait_until(lambda: httpx.post(s.url + "/v1/completions", json={
            "prompt": "a", "max_tokens": 1}).status_code == 200, 5)


def test_client_disconnect_mid_stream_aborts_the_request(model_dir):
    with start(model_dir) as s:
        slow_steps(s.engine, 0.02)
        with httpx.stream("POST", s.url + "/v1/completions",
                          json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
        took = wait_until(lambda: not s.engine.scheduler.has_work(), 2)
        assert took < 1.0
        assert s.client.stats()["tokens"] < 40  # it stopped long before 80
        metrics = httpx.get(s.url + "/metrics").text
        assert 'dejavu_requests_total{endpoint="completions",finish_reason="abort"} 1' in metrics


def test_client_disconnect_while_waiting_for_a_whole_response_aborts(model_dir):
    with start(model_dir) as s:
        slow_steps(s.engine, 0.02)
        host, port = s.url.removeprefix("http://").split(":")
        body = json.dumps(LONG).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: s.engine.scheduler.has_work(), 2)
            time.sleep(0.1)
        took = wait_until(lambda: not s.engine.scheduler.has_work(), 2)
        assert took < 1.0
        assert s.client.stats()["tokens"] < 40


def test_dead_engine_turns_health_503_and_fails_requests_in_flight(model_dir):
    with start(model_dir) as s:
        slow_steps(s.engine, 0.02)
        dead = threading.Event()
        real_step = s.engine.step

        def step():
            if dead.is_set():
                raise RuntimeError("injected fault in the engine loop")
            return real_step()

        s.engine.step = step
        results: dict[str, object] = {}

        def whole():
            results["whole"] = httpx.post(s.url + "/v1/completions", json=LONG, timeout=10)

        def streamed():
            results["stream"] = httpx.post(s.url + "/v1/chat/completions", timeout=10, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
                "ignore_eos": True, "stream": True})

        threads = [threading.Thread(target=whole), threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        wait_until(lambda: s.client.stats()["tokens"] >= 4, 5)
        assert httpx.get(s.url + "/health").status_code == 200
        dead.set()
        t0 = time.monotonic()
        took = wait_until(lambda: httpx.get(s.url + "/health").status_code == 503, 2)
        assert took < 2.0
        for t in threads:
            t.join(max(0.1, 2.0 - (time.monotonic() - t0)))
            assert not t.is_alive(), "an in-flight request still hangs 2 s after the death"
        health = httpx.get(s.url + "/health").json()
        assert health["status"] == "dead" and "injected fault" in health["detail"]
        whole_r = results["whole"]
        assert whole_r.status_code == 503
        assert "injected fault" in whole_r.json()["error"]["message"]
        assert whole_r.json()["error"]["code"] == "engine_dead"
        stream_r = results["stream"]
        errors = [json.loads(line[6:]) for line in stream_r.text.splitlines()
                  if line.startswith("data: {") and '"error"' in line]
        assert errors and "injected fault" in errors[0]["error"]["message"]
        assert stream_r.text.rstrip().endswith("data: [DONE]")
        # New requests are refused at once, not queued into a dead engine.
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "a"}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        metrics = httpx.get(s.url + "/metrics").text
        assert "dejavu_engine_up 0" in metrics and 'dejavu_worker_up{worker="0"} 0' in metrics


def test_unexpected_engine_exception_is_an_error_not_a_broken_stream(model_dir):
    class Broken:  # the real client, whose streams break after two events
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        async def generate(self, prompt, params, request_id):
            n = 0
            async for event in self.inner.generate(prompt, params, request_id):
                yield event
                n += 1
                if n == 2:
                    raise RuntimeError("boom in the engine client")

    with start(model_dir, wrap=Broken) as s:
        r = s.http.post("/v1/completions", json=LONG)
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        r = s.http.post("/v1/completions", json={**LONG, "stream": True})
        assert r.status_code == 200
        assert "boom" in r.text and r.text.rstrip().endswith("data: [DONE]")
        # The aborted engine requests are gone and the server still serves.
        wait_until(lambda: not s.engine.scheduler.has_work(), 2)
        assert s.http.get("/health").status_code == 200
