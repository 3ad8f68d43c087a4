"""`dejavu-run serve` (one real process) against clients that misbehave: impatient clients
that give up while their request waits for a slot, idle and slow sockets, huge prompts,
hostile bodies. After each, the server still serves and /health is 200."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import httpx
import pytest
from serve_fixtures import make_checkpoint
from serve_process import CLI, serve_process

LONG_STREAM = {"prompt": "It was a dark and stormy night", "max_tokens": 1000,
               "temperature": 0, "ignore_eos": True, "stream": True}


def test_impatient_clients_waiting_for_a_slot_do_not_kill_the_engine(tmp_path):
    # The shipped model with one KV slot: one long stream holds it, so every other request
    # waits in the scheduler's queue until its client gives up and disconnects.
    with serve_process(["--max-batch", "1"], tmp_path) as s, \
            httpx.Client(base_url=s.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=LONG_STREAM) as holder:
            assert holder.status_code == 200
            lines = holder.iter_lines()
            next(lines)  # the long request is in the slot and generating
            outcomes: list[str] = []

            def impatient(i: int) -> None:
                body = {"messages": [{"role": "user", "content": f"hello {i}"}],
                        "max_tokens": 4}
                try:
                    r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=1.0)
                    outcomes.append(str(r.status_code))
                except httpx.TimeoutException:
                    outcomes.append("timeout")

            threads = [threading.Thread(target=impatient, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert outcomes == ["timeout"] * 12, outcomes
            time.sleep(0.5)  # the server sees the disconnects and aborts the waiting requests
        # Closing the holder frees the slot: the scheduler admits from its queue next.
        r = http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 3,
                                               "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
        health = http.get("/health")
        assert health.status_code == 200, health.text
        assert "engine thread died" not in s.output()



@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped model, default settings, started with a soft limit of 512 open files
    (the server raises it to fit [serve] max_connections)."""
    with serve_process(["--max-batch", "2"], tmp_path_factory.mktemp("shipped"),
                       open_files=512) as s:
        yield s


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model with a short queue and short header and body deadlines."""
    where = tmp_path_factory.mktemp("tiny")
    model = make_checkpoint(where / "tiny")
    (where / "dejavu.toml").write_text(
        "[serve]\nmax_pending = 4\nheader_timeout_s = 1.0\nbody_timeout_s = 1.0\n"
        "max_connections = 100\n")
    with serve_process(["--model", str(model), "--max-batch", "1"], where) as s:
        yield s


def _health_latencies(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            code = http.get("/health").status_code
            out.append(time.perf_counter() - t0 if code == 200 else float("inf"))
            time.sleep(0.02)


def test_huge_prompts_do_not_stall_health(shipped):
    # Eight 3.9 MB prompts at once: refused (far more tokens than positions) while /health
    # keeps answering within a fraction of a second.
    huge = ("It was a dark and stormy night; the rain fell in torrents. " * 66_000)[:3_900_000]
    stop, latencies, codes = threading.Event(), [], []
    watcher = threading.Thread(target=_health_latencies, args=(shipped.url, stop, latencies))
    watcher.start()
    time.sleep(0.1)

    def post() -> None:
        r = httpx.post(shipped.url + "/v1/completions", timeout=120,
                       json={"prompt": huge, "max_tokens": 1})
        codes.append((r.status_code, r.json()["error"]["param"]))

    senders = [threading.Thread(target=post) for _ in range(8)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(120)
    stop.set()
    watcher.join(30)
    assert codes == [(400, "prompt")] * 8
    assert len(latencies) >= 5 and max(latencies) < 1.0, latencies
    assert httpx.get(shipped.url + "/health").status_code == 200


def test_long_prompt_is_tokenised_off_the_loop_and_refused_by_count(shipped):
    # Short enough in characters to need tokenising (on the tokenizer thread), too many
    # tokens for the positions: a 400 that counts them.
    text = "the rain fell in torrents over the old town. " * 1000
    r = httpx.post(shipped.url + "/v1/completions", timeout=60,
                   json={"prompt": text, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud83d"}]}',
     "messages"),
    ("/v1/completions", '{"prompt": "a", "stream": "yes"}', "stream"),
    ("/v1/completions", '{"prompt": "a", "stream": 1}', "stream"),
    ("/v1/completions", '{"prompt": "a", "echo": "true"}', "echo"),
])
def test_hostile_bodies_are_400s_naming_the_field(shipped, route, body, param):
    r = httpx.post(shipped.url + route, content=body.encode(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_chat_without_max_tokens_gets_a_bounded_default(shipped):
    r = httpx.post(shipped.url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0,
        "ignore_eos": True, "stop": []})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    # 256, not the ~1000 positions the prompt leaves (unless a stop string ended it early).
    assert usage["completion_tokens"] <= 256
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_idle_sockets_do_not_exhaust_the_server(shipped):
    # Twice as many idle sockets as the file limit the server started with: the longest
    # idle are closed to make room, the descriptors stay bounded, /health answers.
    host, port = shipped.url.removeprefix("http://").split(":")
    idle = []
    try:
        for _ in range(1024):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        t0 = time.perf_counter()
        assert httpx.get(shipped.url + "/health", timeout=5).status_code == 200
        assert time.perf_counter() - t0 < 1.0
        assert shipped.open_fds() < 1024 + 64
        r = httpx.post(shipped.url + "/v1/completions", timeout=60,
                       json={"prompt": "the cat", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        for sock in idle:
            sock.close()
    log = shipped.output()
    assert log.count("Too many open files") == 0
    assert log.count("closed an idle connection") <= 6  # rate-limited


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("partial", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",  # headers never end
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{",  # body
    b"",  # nothing at all
])
def test_slow_or_silent_clients_get_408_within_the_deadline(tiny, partial):
    host, port = tiny.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(partial)
        t0 = time.perf_counter()
        answer = _read_all(sock)
        waited = time.perf_counter() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert 0.9 < waited < 3.0
    assert httpx.get(tiny.url + "/health").status_code == 200
    assert _closed(tiny.url, "timed_out") >= 1  # this case's, at least


def _closed(url: str, reason: str) -> float:
    """dejavu_connections_closed_total{reason=...} from the server's /metrics."""
    text = httpx.get(url + "/metrics").text
    line = f'dejavu_connections_closed_total{{reason="{reason}"}} '
    values = [float(ln.removeprefix(line)) for ln in text.splitlines() if ln.startswith(line)]
    assert len(values) == 1, text
    return values[0]


def _get_health(sock: socket.socket) -> bytes:
    """One whole response on a kept-alive connection: headers, then Content-Length bytes (a
    single recv may stop after the headers and leave the body to the next call)."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_flood_of_silent_sockets_does_not_close_a_keep_alive_client(tiny):
    # At the cap, silent connections are closed before a keep-alive connection that has
    # served a request: the flood churns among itself.
    host, port = tiny.url.removeprefix("http://").split(":")
    evicted_before = _closed(tiny.url, "evicted")
    with socket.create_connection((host, int(port)), timeout=5) as client:
        assert _get_health(client).startswith(b"HTTP/1.1 200")
        flood = [socket.create_connection((host, int(port)), timeout=5) for _ in range(300)]
        try:
            time.sleep(0.3)
            assert tiny.open_fds() < 100 + 64
            assert _get_health(client).startswith(b"HTTP/1.1 200")  # the same connection
            closed = 0
            for sock in flood:
                sock.setblocking(False)
                try:
                    closed += sock.recv(1) == b""
                except BlockingIOError:
                    pass
            assert closed >= 200  # the oldest silent ones made room
            # ... and /metrics counts them (a scrape is one more connection: one more close)
            assert _closed(tiny.url, "evicted") - evicted_before >= closed
        finally:
            for sock in flood:
                sock.close()


def test_n_beyond_the_queue_is_400_and_a_full_queue_says_when_to_retry(tiny):
    r = httpx.post(tiny.url + "/v1/completions", timeout=30,
                   json={"prompt": "the cat", "n": 5, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    hold = {"prompt": "the cat", "n": 4, "max_tokens": 80, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=tiny.url, timeout=30) as http, \
            http.stream("POST", "/v1/completions", json=hold) as running:
        assert running.status_code == 200
        lines = running.iter_lines()
        next(lines)
        busy = httpx.post(tiny.url + "/v1/completions", timeout=30,
                          json={"prompt": "a", "max_tokens": 1})
        assert busy.status_code == 429
        assert int(busy.headers["retry-after"]) >= 1


def test_api_key_from_a_file_guards_the_server(tmp_path):
    model = make_checkpoint(tmp_path / "tiny")
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    with serve_process(["--model", str(model), "--api-key-file", str(key_file)],
                       tmp_path) as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={
            "Authorization": "Bearer from-a-file"}).status_code == 200
        assert "from-a-file" not in s.output()


@pytest.mark.parametrize(("args", "env"), [(["--api-key", ""], {}),
                                           ([], {"DEJAVU_API_KEY": ""})])
def test_an_empty_api_key_is_an_error_not_authentication_off(tmp_path, args, env):
    run = subprocess.run(CLI + ["serve", "--port", "1", *args], cwd=tmp_path,
                         env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2, run.stderr
    assert "API key is empty" in run.stderr


def test_where_the_api_key_comes_from(tmp_path):
    from dejavu.scheduler.serve import ServeError, read_api_key

    assert read_api_key(None, None, {"DEJAVU_API_KEY": "k1"}) == "k1"
    assert read_api_key("k2", None, {"DEJAVU_API_KEY": "k1"}) == "k2"
    assert read_api_key(None, None, {}) is None
    (tmp_path / "key").write_text("k3\nignored\n")
    assert read_api_key(None, str(tmp_path / "key"), {"DEJAVU_API_KEY": "k1"}) == "k3"
    (tmp_path / "empty").write_text("  \n")
    for args, match in [(("k2", str(tmp_path / "key")), "both"),
                        ((None, str(tmp_path / "empty")), "no key"),
                        ((None, str(tmp_path / "missing")), "cannot read")]:
        with pytest.raises(ServeError, match=match):
            read_api_key(*args, {})
