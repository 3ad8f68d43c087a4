"""The HTTP server over the pipeline: `PipelineClient` behind the serve app gives the same
completions as the in-process `LocalClient`, and a dead pipeline shows on /health."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from pipeline_fixtures import cluster, wait_until
from serve_fixtures import make_checkpoint, start

from dejavu.runtime.tokenizer import load_tokenizer
from dejavu.scheduler.serve import ServeOptions, make_app, serve_in_thread
from dejavu.scheduler.zmq_client import PipelineClient


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("servemodel"))


def completions(url: str, prompts: list[str]) -> list[str]:
    out = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for prompt in prompts:
            r = http.post("/v1/completions", json={"model": "tiny-opt", "prompt": prompt,
                                                   "max_tokens": 10, "temperature": 0})
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0]["text"])
    return out


def test_http_completions_through_the_pipeline_equal_the_in_process_server(model):
    prompts = ["the cat sat", "a dog ran in the", "numbers like"]
    with start(model) as served:
        want = completions(served.url, prompts)
    tokenizer = load_tokenizer(model)
    with cluster(model, 2, max_len=96) as c:
        client = PipelineClient(c.address)
        app = make_app(client, tokenizer, ServeOptions(), "tiny-opt", close_client=True)
        with serve_in_thread(app) as url:
            assert completions(url, prompts) == want
            with httpx.Client(base_url=url, timeout=10) as http:
                body = http.get("/health").json()
                assert body["status"] == "ok" and len(body["workers"]) == 2
                # Kill a worker: the launch stops (restart = never), /health says so.
                os.kill(body["workers"][1]["pid"], signal.SIGKILL)
                started = time.monotonic()
                assert wait_until(lambda: http.get("/health").json()["status"] == "dead", 3)
                print(f"/health reported the dead pipeline after "
                      f"{time.monotonic() - started:.2f} s")
                detail = http.get("/health").json()["detail"]
                assert "worker died: worker 1" in detail and "SIGKILL" in detail
