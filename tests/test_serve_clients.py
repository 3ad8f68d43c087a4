"""Real clients against a real server: the official `openai` Python client (streaming a
chat completion and a completion), and `dejavu-run serve` started as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serve_fixtures import make_checkpoint, start


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("clients") / "tiny")


def test_openai_client_streams_chat_and_completion(model_dir):
    openai = pytest.importorskip("openai")
    with start(model_dir, api_key="k-123") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="k-123", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-opt"]

        messages = [{"role": "user", "content": "hello there"}]
        whole = client.chat.completions.create(model="tiny-opt", messages=messages,
                                               max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True})
        stream = client.chat.completions.create(
            model="tiny-opt", messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 8
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

        done = client.completions.create(model="tiny-opt", prompt="the cat", max_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})
        pieces = client.completions.create(model="tiny-opt", prompt="the cat", max_tokens=6,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text
        assert done.usage.completion_tokens == 6

        # Errors arrive as the client's typed exceptions.
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="tiny-opt", prompt="the cat", temperature=5)
        assert "temperature" in str(bad.value)
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


CLI = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_runs_and_stops_cleanly(model_dir, tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        CLI + ["serve", "--model", str(model_dir),
         "--port", str(port), "--served-model-name", "tiny", "--max-batch", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "the cat", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0


def test_serve_command_refuses_bad_options(model_dir, tmp_path):
    run = subprocess.run(
        CLI + ["serve", "--model", str(model_dir),
         "--port", "70000"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "port" in run.stderr
    run = subprocess.run(
        CLI + ["serve", "--model", str(tmp_path / "none")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "none" in run.stderr


def test_serve_options_come_from_dejavu_toml_then_the_command_line(tmp_path):
    from dejavu.runtime.settings import load_settings
    from dejavu.scheduler.serve import ServeError, options_from_settings

    path = tmp_path / "dejavu.toml"
    path.write_text("[serve]\nport = 9001\nmax_pending = 3\nmax_body_kib = 2\n"
                    "[pipeline]\nworkers = 2\n")
    settings = load_settings(path, {"serve.port": 9002, "serve.host": None})
    options = options_from_settings(settings, max_batch=4)
    assert (options.port, options.host, options.workers, options.api_key) == (
        9002, "127.0.0.1", 2, None)
    with pytest.raises(ServeError, match="API key is empty"):  # not "authentication off"
        options_from_settings(settings, api_key="", max_batch=4)
    assert (options.limits.max_pending, options.limits.max_body_bytes) == (3, 2048)
    with pytest.raises(ServeError, match="max-batch"):
        options_from_settings(settings, max_batch=0)
