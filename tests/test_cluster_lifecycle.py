"""A cluster's life at its edges, with real processes: bad inputs under `launch` are one
line and exit code 2; nothing is left behind by a failed start or a killed `serve`; and
`serve --connect` follows its `launch` through a restart, /health telling the truth."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import torch
from pipeline_fixtures import alive, config, short_dir, wait_until
from safetensors.torch import load_file, save_file
from serve_fixtures import make_checkpoint

from dejavu.runtime.checkpoint import CheckpointError, load_model
from dejavu.runtime.tokenizer import load_tokenizer
from dejavu.scheduler.launch import Cluster, LaunchError
from dejavu.scheduler.serve import ServeOptions, make_app, serve_in_thread
from dejavu.scheduler.zmq_client import PipelineClient

CLI = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("life") / "tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_nan(model_dir: Path, out: Path, key_part: str) -> tuple[Path, str]:
    """A copy of the checkpoint with one NaN in the first tensor whose name has key_part."""
    shutil.copytree(model_dir, out)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return out, key


def run_launch(cfg) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dejavu.scheduler.launch", "--config-json",
                           msgspec.json.encode(cfg).decode()], capture_output=True, text=True,
                          timeout=180)
    return proc.returncode, proc.stderr, time.monotonic() - started


def test_non_finite_weights_are_refused_at_load_naming_the_tensor(model_dir, tmp_path):
    bad, key = with_nan(model_dir, tmp_path / "nan", "layers.1.fc2")
    with pytest.raises(CheckpointError, match=f"'{key}' holds 1 NaN or infinite value"):
        load_model(bad)
    load_model(bad, layers=range(0, 1))  # a span without that tensor loads
    # Finite as stored, infinite once converted: named as an overflow of the dtype.
    big = tmp_path / "big"
    shutil.copytree(model_dir, big)
    tensors = load_file(big / "model.safetensors")
    tensors[key] = torch.full_like(tensors[key], 1e6)
    save_file(tensors, big / "model.safetensors", metadata={"format": "pt"})
    load_model(big)
    with pytest.raises(CheckpointError, match=f"'{key}' overflows float16"):
        load_model(big, dtype="float16")


@pytest.mark.parametrize("case", ["predictors", "weights"])
def test_bad_predictors_or_weights_under_launch_are_one_line_and_exit_2(model_dir, tmp_path,
                                                                        case):
    run = short_dir()
    try:
        if case == "predictors":
            junk = tmp_path / "predictors.safetensors"
            junk.write_bytes(b"not a safetensors file at all")
            cfg = config(model_dir, 2, run / "run", max_len=96, sparse=True,
                         predictors=str(junk))
            named = str(junk)
        else:  # worker 1's span (layers 1..2 of 2) holds the NaN
            bad, named = with_nan(model_dir, tmp_path / "nan", "layers.1.fc2")
            cfg = config(bad, 2, run / "run", max_len=96)
        code, stderr, took = run_launch(cfg)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    errors = [ln for ln in stderr.splitlines() if " ERROR " in ln]
    print(f"\n{case}: exit {code} after {took:.1f} s: {errors}")
    assert code == 2, stderr[-3000:]
    assert len(errors) == 1 and "cannot launch" in errors[0] and named in errors[0], errors
    assert "Traceback" not in stderr and "worker died" not in stderr


def test_a_failed_start_leaves_no_run_directory(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    cfg = config(model_dir, 2, "", max_len=200, sparse=True, predictors=str(junk))
    with pytest.raises(LaunchError, match="exited with code 2 .*max_len = 200"):
        Cluster(cfg).start(timeout_s=120, log=tmp_path / "launch.log")
    cfg = config(model_dir, 2, "", max_len=96, sparse=True, predictors=str(junk))
    with pytest.raises(LaunchError, match="exited with code 2 .*cannot launch: worker"):
        Cluster(cfg).start(timeout_s=120, log=tmp_path / "launch.log")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("dejavu-run-")]


def test_kill_9_of_serve_leaves_nothing_and_a_stale_dir_is_reclaimed(model_dir, tmp_path):
    """`serve --workers 2` killed with SIGKILL: its launch and workers stop and its run
    directory is gone. One left by a cluster killed whole is removed by the next start."""
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    port = free_port()
    log = open(tmp_path.parent / f"{tmp_path.name}-serve.log", "w")  # noqa: SIM115
    serve = subprocess.Popen([*CLI, "serve", "--workers", "2", "--model", str(model_dir),
                              "--port", str(port)], env=env, stdout=log, stderr=log)
    try:
        health = None
        deadline = time.monotonic() + 180
        while health is None and time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            except httpx.HTTPError:
                assert serve.poll() is None, Path(log.name).read_text()[-3000:]
                time.sleep(0.5)
        assert health and health["status"] == "ok", health
        (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("dejavu-run-")]
        pids = [w["pid"] for w in health["workers"]]
        launch_pid = int((run_dir / "lock").read_text())
        serve.kill()
        serve.wait()
        killed = time.monotonic()
        took = wait_until(lambda: not run_dir.exists(), 15)
        gone = wait_until(lambda: not any(alive(p) for p in [launch_pid, *pids]), 15)
    finally:
        if serve.poll() is None:
            serve.kill()
        log.close()
    print(f"\nkill -9 of serve: run directory gone after {took}s, processes after "
          f"{time.monotonic() - killed:.2f} s")
    assert took is not None and gone is not None
    # A directory a killed cluster left (its lock no longer held) goes at the next start.
    stale = tmp_path / f"dejavu-run-{os.getuid()}-0badc0de"
    stale.mkdir(mode=0o700)
    (stale / "lock").write_text("12345")
    (stale / "client.sock").write_text("")
    from dejavu.scheduler.rundir import reclaim_stale

    held = tmp_path / f"dejavu-run-{os.getuid()}-0000beef"  # a running cluster's: kept
    held.mkdir(mode=0o700)
    import fcntl

    with open(held / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert reclaim_stale(tmp_path, f"dejavu-run-{os.getuid()}-") == [stale]
        assert held.exists() and not stale.exists()


def test_serve_connect_follows_its_launch_through_a_restart(model_dir):
    """`serve --connect` to a loopback-TCP launch (its keys change with each start): 503
    and no worker alive while the launch is gone, 200 and answers again after it is back;
    the same when the launch is killed with SIGKILL."""
    run = short_dir()
    addresses = {"control_address": f"tcp://127.0.0.1:{free_port()}",
                 "client_address": f"tcp://127.0.0.1:{free_port()}",
                 "data_addresses": [f"tcp://127.0.0.1:{free_port()}"]}
    cfg = config(model_dir, 2, run / "run", max_len=96, slots=4, **addresses)
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    first = Cluster(cfg).start(timeout_s=120, log=run / "a.log")
    clusters = [first]
    figures = {}
    try:
        client = PipelineClient(first.address, run_dir=str(first.run_dir))
        app = make_app(client, load_tokenizer(model_dir), ServeOptions(), "tiny",
                       close_client=True)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/v1/completions", json=body).status_code == 200
            want = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
            for how in ("SIGTERM", "SIGKILL"):
                old = clusters[-1]
                old_pids = [w["pid"] for w in http.get("/health").json()["workers"]]
                gone_at = time.monotonic()
                if how == "SIGTERM":
                    old.stop()
                else:
                    old.proc.send_signal(signal.SIGKILL)
                figures[f"{how}: 503 after"] = wait_until(
                    lambda: http.get("/health").status_code == 503, 15)
                assert figures[f"{how}: 503 after"] is not None, http.get("/health").json()
                down = http.get("/health").json()
                assert not any(w["alive"] for w in down["workers"]), down
                assert http.post("/v1/completions", json=body).status_code == 503
                if how == "SIGKILL":
                    assert wait_until(lambda pids=old_pids: not any(map(alive, pids)), 10)
                    old.stop()
                new = Cluster(cfg).start(timeout_s=120, log=run / f"{how}.log")
                clusters.append(new)
                figures[f"{how}: 200 after the new launch was ready"] = wait_until(
                    lambda: http.get("/health").status_code == 200, 15)
                assert figures[f"{how}: 200 after the new launch was ready"] is not None
                up = http.get("/health").json()
                assert all(w["alive"] for w in up["workers"])
                assert {w["pid"] for w in up["workers"]}.isdisjoint(old_pids)
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
                figures[f"{how}: restart to answer"] = time.monotonic() - gone_at
    finally:
        for c in clusters:
            c.stop()
        shutil.rmtree(run, ignore_errors=True)
    print("\n" + "; ".join(f"{k} {v:.2f} s" for k, v in figures.items()))
