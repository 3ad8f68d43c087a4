"""`chat`, `generate` and `serve` find a running `launch` through its run directory and say
which one they joined; `--connect` to a missing socket fails at once; with no launch, chat
runs in this process. Real `launch` processes and real sockets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from pipeline_fixtures import short_dir, wait_until
from serve_fixtures import make_checkpoint

from dejavu.scheduler.discover import JoinError, join
from dejavu.scheduler.rundir import running_launch
from dejavu.scheduler.zmq_client import PipelineConnection

CLI = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})}, **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("joinmodel"))


@pytest.fixture(scope="module")
def launched(model):
    """`launch --workers 2` on the default run directory of a private XDG_RUNTIME_DIR."""
    xdg = short_dir()
    run_dir = xdg / "dejavu-run"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(xdg)}
    log = open(xdg / "launch.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*CLI, "launch", "--workers", "2", "--model", str(model)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env)

    def ready():
        if proc.poll() is not None:
            raise AssertionError((xdg / "launch.log").read_text())
        found = running_launch(run_dir)
        if found is None:
            return False
        with PipelineConnection(found[0]) as conn:
            try:
                return conn.health(timeout_s=0.5).state == "ready"
            except TimeoutError:
                return False

    try:
        assert wait_until(ready, 120, 0.2) is not None
        yield proc, xdg, run_dir
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        log.close()
        shutil.rmtree(xdg, ignore_errors=True)


def test_the_launch_publishes_its_address_in_the_run_directory(launched):
    proc, _, run_dir = launched
    address, pid = running_launch(run_dir)
    assert address == f"ipc://{run_dir}/client.sock" and pid == proc.pid


def test_generate_and_chat_join_the_launch_of_the_default_run_directory(launched, model):
    _, xdg, run_dir = launched
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    common = ["--model", str(model), "--prompt", "the cat", "--max-new-tokens", "6", "--json"]
    joined = cli("generate", *common, env=env)
    assert joined.returncode == 0, joined.stderr
    assert (f"joined the launch at ipc://{run_dir}/client.sock: 2 worker(s) (cpu, cpu), "
            f"model {model}") in joined.stderr
    assert "warning" not in joined.stderr  # sampling flags apply per request
    local = cli("generate", *common, "--dense", env={"XDG_RUNTIME_DIR": str(short_dir())})
    assert "joined" not in local.stderr
    assert json.loads(joined.stdout) == json.loads(local.stdout)

    chat = cli("chat", "--model", str(model), "--max-new-tokens", "4", env=env,
               input="hello\n")
    assert chat.returncode == 0, chat.stderr
    assert f"joined the launch at ipc://{run_dir}/client.sock: 2 worker(s)" in chat.stderr
    # --run-dir names the same directory from anywhere.
    named = cli("generate", *common, "--run-dir", str(run_dir),
                env={"XDG_RUNTIME_DIR": str(short_dir())})
    assert "joined the launch" in named.stderr and f"found in {run_dir}" in named.stderr


def test_flags_the_launch_settled_are_named_when_joining(launched, model):
    _, xdg, run_dir = launched
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    address = f"ipc://{run_dir}/client.sock"
    out = cli("generate", "--model", str(model), "--prompt", "the cat", "--max-new-tokens",
              "2", "--dense", "--dtype", "bfloat16", "--gpu-memory-gib", "2", env=env)
    assert out.returncode == 0, out.stderr
    assert (f"warning: ignored: --dense, --dtype bfloat16, --gpu-memory-gib 2.0: the launch "
            f"at {address} was started with its own; restart it with them, or pass "
            "--workers N to start a launch for this command") in out.stderr.splitlines()
    chat = cli("chat", "--model", str(model), "--max-new-tokens", "2", "--sparse",
               "--temperature", "0", env=env, input="hello\n")
    assert chat.returncode == 0, chat.stderr
    assert f"warning: ignored: --sparse: the launch at {address}" in chat.stderr


def test_ignored_on_join_names_only_what_the_launch_settled():
    from dejavu.runtime.settings import load_settings
    from dejavu.scheduler.discover import ignored_on_join

    given = load_settings(None, {"model.path": "m", "model.device": "cpu",
                                 "pipeline.run_dir": "/r", "generation.top_k": 5})
    assert ignored_on_join(given, "ipc:///r/c.sock") == (
        "warning: ignored: --device cpu: the launch at ipc:///r/c.sock was started with its "
        "own; restart it with them, or pass --workers N to start a launch for this command")
    sampling_only = load_settings(None, {"generation.temperature": 0.5, "model.dtype": None})
    assert ignored_on_join(sampling_only, "ipc:///r/c.sock") == ""
    assert ignored_on_join(sampling_only, "a", sparse=True).startswith(
        "warning: ignored: --sparse: the launch at a ")
    assert ignored_on_join(given, "a", sparse=False, others=["--max-batch 4"]).startswith(
        "warning: ignored: --dense, --device cpu, --max-batch 4: the launch at a ")
    assert ignored_on_join(sampling_only, "a", others=["--max-batch 4"]).startswith(
        "warning: ignored: --max-batch 4: the launch at a ")


def test_a_launch_of_another_model_is_not_joined(launched, tmp_path):
    _, xdg, run_dir = launched
    other = make_checkpoint(tmp_path / "other", seed=3)
    out = cli("generate", "--model", str(other), "--prompt", "a", "--max-new-tokens", "2",
              env={"XDG_RUNTIME_DIR": str(xdg)})
    assert out.returncode == 0, out.stderr
    assert f"not joining the launch at ipc://{run_dir}/client.sock" in out.stderr
    assert "joined" not in out.stderr


def test_connect_to_a_missing_socket_fails_at_once_naming_it(model):
    missing = f"ipc://{short_dir()}/client.sock"
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        out = cli(*command, "--model", str(model), "--connect", missing, input="hi\n")
        assert out.returncode == 2, out.stderr
        assert f"no launch at {missing}" in out.stderr and "Traceback" not in out.stderr
        assert "lost" not in out.stderr
    # At once: no request is queued for a peer that never comes (the CLI's time is mostly
    # imports, too noisy on a loaded machine to bound here).
    started = time.monotonic()
    with pytest.raises(JoinError, match="does not exist"):
        join(missing)
    assert time.monotonic() - started < 0.5


def test_serve_connect_to_a_missing_socket_fails_at_once(model):
    pytest.importorskip("fastapi")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    missing = f"ipc://{short_dir()}/client.sock"
    out = cli("serve", "--model", str(model), "--connect", missing, "--port", str(port))
    assert out.returncode == 2 and f"no launch at {missing}" in out.stderr


def test_without_a_launch_chat_runs_in_this_process(model):
    out = cli("chat", "--model", str(model), "--max-new-tokens", "4", input="hello\n/stats\n",
              env={"XDG_RUNTIME_DIR": str(short_dir())})
    assert out.returncode == 0, out.stderr
    assert f"no launch running: chatting with {model} in this process" in out.stderr
    assert "history: 1 turn(s) kept" in out.stdout
    assert "starting a launch" not in out.stderr


def test_serve_joins_the_running_launch(launched, model):
    pytest.importorskip("fastapi")
    import socket
    import urllib.request

    _, xdg, run_dir = launched
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([*CLI, "serve", "--model", str(model), "--port", str(port),
                             "--dtype", "bfloat16", "--gpu-memory-gib", "3", "--max-batch", "4"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(xdg)})
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving "):
                break
        text = "".join(lines)
        assert f"joined the launch at ipc://{run_dir}/client.sock: 2 worker(s)" in text, text
        assert ("warning: ignored: --dtype bfloat16, --gpu-memory-gib 3.0, --max-batch 4: the "
                "launch at") in text, text
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(
                {"model": str(model), "prompt": "the cat", "max_tokens": 3}).encode(),
            headers={"Content-Type": "application/json"})
        body = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_killed_launch_is_not_found(tmp_path):
    """The address file outlives a SIGKILLed launch; its lock does not: nothing is found."""
    run_dir = short_dir() / "run"
    code = ("import sys, time\nfrom dejavu.scheduler.rundir import RunDir\n"
            f"d = RunDir({str(run_dir)!r}).acquire()\nd.publish('ipc://somewhere')\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert running_launch(run_dir) == ("ipc://somewhere", proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
    assert (run_dir / "client.address").exists()
    assert running_launch(run_dir) is None
