"""Transport security of the pipeline: hardened sockets, local-only defaults, and CURVE
for anything else (an unauthenticated peer delivers nothing and the refusal is logged)."""

from __future__ import annotations

import logging
import shutil
import socket
import time

import pytest
import zmq
from pipeline_fixtures import GREEDY, PROMPTS, cluster, config, read_log, short_dir

from dejavu.runtime import wire
from dejavu.runtime.checkpoint import load_model
from dejavu.runtime.sampling import SamplingParams
from dejavu.scheduler.engine import Engine
from dejavu.scheduler.launch import launch
from dejavu.scheduler.transport import (
    CLIENT_MAX_BYTES,
    TransportError,
    check_addresses,
    create_keys,
    load_curve,
    make_socket,
)
from dejavu.scheduler.zmq_client import PipelineConnection

HOST = "127.0.0.2"  # loopback, but not a default address: it needs CURVE like a LAN address


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_every_socket_has_linger_0_a_size_limit_and_routers_refuse_unknown_peers():
    ctx = zmq.Context()
    try:
        router = make_socket(ctx, zmq.ROUTER, CLIENT_MAX_BYTES)
        dealer = make_socket(ctx, zmq.DEALER, 1234)
        assert router.getsockopt(zmq.LINGER) == 0 and dealer.getsockopt(zmq.LINGER) == 0
        assert router.getsockopt(zmq.MAXMSGSIZE) == CLIENT_MAX_BYTES
        assert dealer.getsockopt(zmq.MAXMSGSIZE) == 1234
        router.bind("inproc://r")
        with pytest.raises(zmq.ZMQError) as info:  # ROUTER_MANDATORY: no silent drop
            router.send_multipart([b"nobody", b"x"], zmq.NOBLOCK)
        assert info.value.errno == zmq.EHOSTUNREACH
        router.close()
        dealer.close()
    finally:
        ctx.term()


def test_non_local_addresses_need_curve_keys(tmp_path, tiny, caplog):
    check_addresses(["ipc:///tmp/x.sock", "tcp://127.0.0.1:5000", "tcp://[::1]:1"], None)
    with pytest.raises(TransportError, match="keys_dir"):
        check_addresses(["tcp://10.1.2.3:5000"], None)
    with pytest.raises(TransportError, match="keys_dir"):
        check_addresses(["tcp://0.0.0.0:5000"], None)
    run_dir = short_dir()
    cfg = config(tiny, 1, run_dir / "run", client_address=f"tcp://{HOST}:{free_port()}")
    with caplog.at_level(logging.ERROR):
        assert launch(cfg) == 2
    assert "reachable from other machines" in caplog.text
    curve = load_curve(create_keys(tmp_path / "keys"))
    check_addresses(["tcp://10.1.2.3:5000"], curve)
    with pytest.raises(TransportError, match="already exist"):
        create_keys(tmp_path / "keys")
    assert (tmp_path / "keys" / "server.key_secret").stat().st_mode & 0o777 == 0o600


def test_a_curve_cluster_serves_authorized_clients_only(tiny, tmp_path):
    keys = create_keys(tmp_path / "keys")
    # An intruder who knows the server's public key but whose own key is not authorized.
    other = create_keys(tmp_path / "intruder")
    for name in ("server.key", "server.key_secret"):
        shutil.copy(keys / name, other / name)
    engine = Engine(load_model(tiny), max_batch=8, max_len=128)
    want = [engine.generate(p, GREEDY).tokens for p in PROMPTS[:3]]
    addresses = {"control_address": f"tcp://{HOST}:{free_port()}",
                 "client_address": f"tcp://{HOST}:{free_port()}",
                 "data_addresses": [f"tcp://{HOST}:{free_port()}"]}
    with cluster(tiny, 2, keys_dir=str(keys), **addresses) as c:
        address = addresses["client_address"]
        with PipelineConnection(address, keys_dir=str(keys)) as conn:
            assert [x.tokens for x in conn.run(PROMPTS[:3], GREEDY)] == want
            before = conn.health().tokens_out
        # A client with keys the cluster does not know, and one without CURVE at all.
        with PipelineConnection(address, keys_dir=str(other)) as bad:
            bad.submit(PROMPTS[0], GREEDY)
            with pytest.raises(TimeoutError):
                bad.health(timeout_s=1.0)
        ctx = zmq.Context()
        plain = ctx.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(address)
        plain.send(wire.encode(wire.Generate("plain", PROMPTS[0], SamplingParams())))
        plain.send(wire.encode(wire.HealthQuery()))
        assert plain.poll(1000) == 0
        # Nor can a plain peer pose as a worker on the control socket.
        fake = ctx.socket(zmq.DEALER)
        fake.setsockopt(zmq.LINGER, 0)
        fake.setsockopt(zmq.IDENTITY, b"w1")
        fake.connect(addresses["control_address"])
        fake.send(wire.encode(wire.Fatal(1, "forged")))
        time.sleep(0.5)
        plain.close()
        fake.close()
        ctx.term()
        with PipelineConnection(address, keys_dir=str(keys)) as conn:
            health = conn.health()
            assert health.tokens_out == before  # nothing from the refused peers ran
            assert all(w.state == "ready" for w in health.workers)
            # An oversized request is dropped by the size limit; the cluster goes on.
            conn.submit([1] * (CLIENT_MAX_BYTES // 2), GREEDY)
            assert [x.tokens for x in conn.run(PROMPTS[:1], GREEDY)] == want[:1]
        log = read_log(c)
    assert "refused a CURVE peer" in log and "not authorized" in log
    assert "security handshake failed" in log


def test_workers_started_by_hand_join_a_curve_cluster_over_tcp(tiny, tmp_path):
    """The multi-host recipe of the README on one machine: `launch` with spawn = false and
    `dejavu-run worker` started separately, everything over CURVE-encrypted TCP."""
    import subprocess
    import sys

    keys = create_keys(tmp_path / "keys")
    engine = Engine(load_model(tiny), max_batch=8, max_len=128)
    want = [engine.generate(p, GREEDY).tokens for p in PROMPTS[:2]]
    control = f"tcp://{HOST}:{free_port()}"
    addresses = {"control_address": control, "client_address": f"tcp://{HOST}:{free_port()}",
                 "data_addresses": [f"tcp://{HOST}:{free_port()}"]}
    cli = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]
    workers = [subprocess.Popen([*cli, "worker", "--index", str(i), "--control", control,
                                 "--keys-dir", str(keys)], stdin=subprocess.DEVNULL)
               for i in range(2)]
    try:
        with cluster(tiny, 2, keys_dir=str(keys), spawn=False, **addresses) as c:
            with PipelineConnection(addresses["client_address"], keys_dir=str(keys)) as conn:
                health = conn.health()
                assert [w.pid for w in health.workers] == [p.pid for p in workers]
                assert [w.device for w in health.workers] == ["cpu", "cpu"]
                assert [x.tokens for x in conn.run(PROMPTS[:2], GREEDY)] == want
        # A clean stop of the launch stops the workers it did not start, too.
        assert [p.wait(timeout=15) for p in workers] == [0, 0]
        assert "waiting for worker 1 to connect" in read_log(c)
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
