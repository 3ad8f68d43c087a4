"""Other local users against a cluster: loopback TCP without a keys directory still
authenticates every socket (keys made per cluster in the private run directory), and the
run directory is never reached through a link or in another user's directory.

A rogue peer runs as a separate process without the keys (as uid 65534 when the tests run
as root, so it is really another user) and poses as worker 0 and as a client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pipeline_fixtures import (
    GREEDY,
    PROMPTS,
    cluster,
    config,
    read_log,
    short_dir,
    wait_until,
)

from dejavu.runtime import wire
from dejavu.runtime.sampling import SamplingParams
from dejavu.scheduler.launch import Cluster, launch
from dejavu.scheduler.rundir import RunDir, RunDirError
from dejavu.scheduler.zmq_client import PipelineConnection

NOBODY = 65534
CLI = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]


def _other_user_can_run_python() -> bool:
    """Root can run the rogue as uid 65534, if that user can run this Python and zmq (not
    when the interpreter lives under /root, as with pyenv)."""
    if os.getuid() != 0:
        return False
    try:
        return subprocess.run([sys.executable, "-c", "import zmq"], user=NOBODY, group=NOBODY,
                              extra_groups=[], cwd="/", capture_output=True,
                              timeout=60).returncode == 0
    except OSError:
        return False


AS_OTHER_USER = _other_user_can_run_python()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The rogue: plain ZeroMQ, no keys. It takes worker 0's routing id on the control socket and
# says Hello, asks the client socket for health and a generation, then counts for
# `seconds` every frame it gets back. It also reports whether it could read the keys.
ROGUE = textwrap.dedent("""
    import json, sys, time, zmq
    control, client, keys, hello, generate, health, seconds = sys.argv[1:8]
    try:
        open(keys, "rb").read()
        read_keys = True
    except OSError:
        read_keys = False
    ctx = zmq.Context()
    w0 = ctx.socket(zmq.DEALER)
    w0.setsockopt(zmq.IDENTITY, b"w0")
    w0.setsockopt(zmq.LINGER, 0)
    w0.connect(control)
    c = ctx.socket(zmq.DEALER)
    c.setsockopt(zmq.LINGER, 0)
    c.connect(client)
    got = {"control": 0, "client": 0}
    end = time.monotonic() + float(seconds)
    sent = 0
    while time.monotonic() < end:
        if sent < 20:  # again and again: a refused handshake must not flood the log
            for sock, frame in ((w0, hello), (c, generate), (c, health)):
                try:
                    sock.send(bytes.fromhex(frame), zmq.NOBLOCK)
                except zmq.Again:
                    pass
            sent += 1
        for name, sock in (("control", w0), ("client", c)):
            while sock.poll(0):
                sock.recv()
                got[name] += 1
        time.sleep(0.05)
    print(json.dumps(dict(got, read_keys=read_keys)))
""")


def run_rogue(control: str, client: str, keys: Path, seconds: float) -> subprocess.Popen:
    frames = [wire.encode(wire.Hello(0, 4242, "rogue")).hex(),
              wire.encode(wire.Generate("rogue", PROMPTS[0], SamplingParams())).hex(),
              wire.encode(wire.HealthQuery()).hex()]
    extra = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if AS_OTHER_USER else {}
    return subprocess.Popen([sys.executable, "-c", ROGUE, control, client,
                             str(keys / "client.key_secret"), *frames, str(seconds)],
                            stdout=subprocess.PIPE, cwd="/", **extra)


def test_loopback_tcp_without_keys_dir_lets_no_peer_without_the_keys_in(tiny, greedy):
    addresses = {"control_address": f"tcp://127.0.0.1:{free_port()}",
                 "client_address": f"tcp://127.0.0.1:{free_port()}",
                 "data_addresses": [f"tcp://127.0.0.1:{free_port()}"]}
    with cluster(tiny, 2, **addresses) as c:
        keys = c.run_dir / "curve"
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700
        assert stat.S_IMODE((keys / "client.key_secret").stat().st_mode) == 0o600
        with PipelineConnection(c.address, run_dir=str(c.run_dir)) as conn:
            pids = [w.pid for w in conn.health().workers]
            rogue = run_rogue(addresses["control_address"], c.address, keys, seconds=3.0)
            time.sleep(0.5)  # the rogue is connected and posing as worker 0 meanwhile
            started = time.monotonic()
            outs = conn.run(PROMPTS, GREEDY)
            took = time.monotonic() - started
            report = json.loads(rogue.communicate(timeout=30)[0])
            assert [o.tokens for o in outs] == greedy and all(o.error is None for o in outs)
            health = conn.health()
            assert [w.pid for w in health.workers] == pids
            assert all(w.state == "ready" for w in health.workers)
        # The command line finds the keys through [pipeline] run_dir.
        toml = c.run_dir.parent / "dejavu.toml"
        toml.write_text(f'[pipeline]\nrun_dir = "{c.run_dir}"\n')
        ids = ",".join(map(str, PROMPTS[2]))
        gen = subprocess.run([*CLI, "generate", "--config", str(toml), "--model", str(tiny),
                              "--connect", c.address, "--prompt-ids", ids,
                              "--max-new-tokens", "5", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0, gen.stderr
        tokens = json.loads(gen.stdout)["tokens"]
        assert tokens and tokens == greedy[2][:len(tokens)]
        # Without the keys a client of this user is refused too.
        with PipelineConnection(c.address, run_dir=str(short_dir())) as keyless:
            assert keyless.curve is None
            with pytest.raises(TimeoutError):
                keyless.health(timeout_s=1.0)
        log = read_log(c)
    print(f"\nrogue as {'uid 65534' if AS_OTHER_USER else 'this uid, keyless'}: "
          f"{report}; 8 requests beside it in {took:.2f} s")
    assert report["control"] == 0 and report["client"] == 0, report
    if AS_OTHER_USER:
        assert not report["read_keys"]
    refusals = [ln for ln in log.splitlines() if "security handshake failed" in ln]
    assert refusals, log[-2000:]
    # 20 tries on each of two sockets: at most one line per socket per 10 s.
    assert len(refusals) <= 4, refusals


def test_a_cluster_of_ipc_sockets_needs_no_keys_and_is_closed_to_other_users(tiny):
    with cluster(tiny, 1) as c:
        assert not (c.run_dir / "curve").exists()
        assert stat.S_IMODE(c.run_dir.stat().st_mode) == 0o700
        if AS_OTHER_USER:
            probe = subprocess.run(
                [sys.executable, "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX);"
                 "s.connect(sys.argv[1])", c.address[len("ipc://"):]],
                user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", capture_output=True,
                text=True)
            assert probe.returncode != 0 and "PermissionError" in probe.stderr


# --- the run directory ----------------------------------------------------------------------


def plant_victim(tmp: Path) -> tuple[Path, dict]:
    """A directory of the victim's with a lock and a socket-named file, mode 0755."""
    victim = tmp / "victim"
    victim.mkdir(mode=0o755)
    os.chmod(victim, 0o755)
    (victim / "lock").write_text("precious")
    (victim / "data.sock").write_text("not a socket")
    return victim, {"mode": 0o755, "lock": "precious"}


def victim_untouched(victim: Path, before: dict) -> bool:
    return (stat.S_IMODE(victim.stat().st_mode) == before["mode"]
            and (victim / "lock").read_text() == before["lock"]
            and (victim / "data.sock").exists())


def test_a_planted_symlink_as_the_default_run_dir_is_refused_and_left_alone(tmp_path):
    """`/tmp/dejavu-run-<uid>` planted as a link to a directory of the victim: `launch`
    refuses it with one line, and never chmods, locks or deletes anything behind it."""
    victim, before = plant_victim(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    link = tmp / f"dejavu-run-{os.getuid()}"
    link.symlink_to(victim)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {"TMPDIR": str(tmp)}
    proc = subprocess.run([*CLI, "launch", "--workers", "1"], env=env, capture_output=True,
                          text=True, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and str(link) in errors[0] and "symbolic link" in errors[0]
    assert "Traceback" not in proc.stderr
    assert victim_untouched(victim, before)
    # The same for a link given as [pipeline] run_dir, and for a lock planted as a link.
    with pytest.raises(RunDirError, match="symbolic link"):
        RunDir(link).acquire()
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    (own / "lock").symlink_to(victim / "lock")
    with pytest.raises(RunDirError, match="lock"):
        RunDir(own).acquire()
    assert victim_untouched(victim, before)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make another user's directory")
def test_another_users_run_dir_is_refused(tmp_path, tiny):
    victim, before = plant_victim(tmp_path)
    os.chown(victim, NOBODY, NOBODY)
    cfg = config(tiny, 1, victim)
    assert launch(cfg) == 2
    with pytest.raises(RunDirError, match=f"belongs to uid {NOBODY}"):
        RunDir(victim).acquire()
    assert victim_untouched(victim, before)


def test_a_run_dir_others_can_write_to_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(RunDirError, match="writable by other users"):
        RunDir(shared).acquire()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777


def test_a_worker_started_by_hand_finds_a_loopback_launchs_keys(tiny, greedy):
    """spawn = false on loopback TCP: `launch` makes the keys when it starts, and a worker
    started by hand without --keys-dir finds them in the run directory."""
    import threading

    control = f"tcp://127.0.0.1:{free_port()}"
    run = short_dir()
    c = Cluster(config(tiny, 1, run / "run", spawn=False, control_address=control,
                       client_address=f"tcp://127.0.0.1:{free_port()}"))
    starting = threading.Thread(target=c.start, kwargs={"timeout_s": 120,
                                                        "log": run / "launch.log"})
    starting.start()
    worker = None
    try:
        assert wait_until(lambda: (c.run_dir / "curve" / "client.key_secret").exists(), 60)
        worker = subprocess.Popen([*CLI, "worker", "--index", "0",
                                   "--control", control, "--run-dir", str(c.run_dir)],
                                  stdin=subprocess.DEVNULL)
        starting.join(120)
        with PipelineConnection(c.address, run_dir=str(c.run_dir)) as conn:
            assert [w.pid for w in conn.health().workers] == [worker.pid]
            assert conn.run(PROMPTS[:1], GREEDY)[0].tokens == greedy[0]
    finally:
        c.stop()
        if worker is not None and worker.poll() is None:
            worker.kill()
        shutil.rmtree(run, ignore_errors=True)
