"""`serve --workers 2`: the HTTP server over a real pipeline (scheduler + two worker
processes on the CPU, ZeroMQ between them). Its answers equal the in-process engine's; a
worker killed with SIGKILL turns /health to 503 within 2 s and fails the request in
flight with an error that says so."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import httpx
import pytest
from pipeline_fixtures import config, short_dir
from serve_fixtures import make_checkpoint, reference_logprobs

from dejavu.runtime.checkpoint import load_model
from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.tokenizer import load_tokenizer
from dejavu.runtime.wire import Fault
from dejavu.scheduler.engine import Engine
from dejavu.scheduler.serve import ServeOptions, make_app, serve_in_thread
from dejavu.scheduler.serve.server import launch_client


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("pipe") / "tiny")


@pytest.fixture
def served(model_dir):
    run = short_dir()
    tok = load_tokenizer(model_dir)
    # Worker 0 stalls for 20 s at its 20th step (the stream below is then mid-answer), so
    # the kill always lands while a request is in flight, however fast this machine is.
    stall = Fault("sleep", worker=0, at_step=20, seconds=20.0)
    client = launch_client(config(model_dir, 2, run / "run", max_len=96, slots=4,
                                          faults=[stall]))
    app = make_app(client, tok, ServeOptions(), "tiny-opt", close_client=True)
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield http, client, tok
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_pipeline_server_answers_like_the_engine_and_dies_loudly(served, model_dir):
    http, client, tok = served
    ids = tok.encode("the cat sat")
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0,
                                           "ignore_eos": True, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    engine = Engine(load_model(model_dir), tok, max_batch=1)
    want = engine.generate(ids, SamplingParams(max_new_tokens=6, ignore_eos=True))
    choice = r.json()["choices"][0]
    assert choice["text"] == tok.decode(ids) + want.text
    lp = choice["logprobs"]["token_logprobs"]
    assert lp[1:len(ids)] == pytest.approx(reference_logprobs(model_dir, ids), abs=1e-4)

    health = http.get("/health").json()
    assert health["status"] == "ok" and len(health["workers"]) == 2
    victim = health["workers"][1]["pid"]

    out: dict = {}

    def stream():
        out["r"] = http.post("/v1/completions", json={
            "prompt": ids, "max_tokens": 80, "ignore_eos": True, "stream": True})

    t = threading.Thread(target=stream)
    t.start()
    assert _wait(lambda: client.stats()["tokens"] >= 8, 20) is not None
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    took = _wait(lambda: http.get("/health").status_code == 503, 5)
    assert took is not None and took < 2.0, took
    t.join(max(0.1, 2.0 - (time.monotonic() - killed)))
    assert not t.is_alive(), "the request in flight still hangs 2 s after the worker died"
    errors = [json.loads(line[6:]) for line in out["r"].text.splitlines()
              if line.startswith("data: {") and '"error"' in line]
    assert errors, out["r"].text[-500:]
    message = errors[0]["error"]["message"]
    assert "worker" in message or "exited" in message or "died" in message, message
    r = http.post("/v1/completions", json={"prompt": "a"})
    assert r.status_code == 503


def _wait(predicate, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.02)
    return None
