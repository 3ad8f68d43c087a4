"""How every socket of the cluster is made: hardening, address policy and CURVE keys.

- Every socket gets LINGER 0 (closing never blocks on a dead peer) and a maximum message
  size; ROUTERs get ROUTER_MANDATORY (sending to a gone peer raises instead of dropping).
- Addresses: ``ipc://`` (in the private run directory) and ``tcp://127.0.0.1`` are the
  defaults. Anything else reaches other machines, so it is refused unless CURVE keys are
  configured, and then every socket of the cluster authenticates and encrypts.
- Keys: ``create_keys(dir)`` writes one server and one client key pair (``dejavu-run
  keys``); copy the directory to every host. Without a keys directory, ``launch`` makes a
  fresh pair per cluster in its private run directory whenever some address is not an
  ipc socket inside that directory (tcp://127.0.0.1 is open to every local user), so no
  address of a cluster takes a peer without a key. A ZAP handler on each binding process
  lets in only the client public keys in ``authorized/``; refusals are logged, at most one
  line per ``REFUSAL_LOG_S`` for each kind (a peer that keeps reconnecting cannot flood
  the log).

What this module does not know: what travels on the sockets (``runtime.wire``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import zmq
import zmq.auth
import zmq.utils.z85

log = logging.getLogger("dejavu.transport")

CONTROL_MAX_BYTES = 64 * 1024 * 1024  # a step header: token ids of a full prefill batch
CLIENT_MAX_BYTES = 4 * 1024 * 1024  # a request: 2048 token ids and parameters fit easily
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
REFUSAL_LOG_S = 10.0


class TransportError(ValueError):
    """An address or key setting that cannot be used; names the setting and the fix."""


@dataclass(frozen=True)
class Curve:
    """The cluster's key material: one server pair (every binding socket), one client pair
    (every connecting socket), and the client public keys a binding socket accepts."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    authorized: frozenset[bytes]


def is_local(address: str) -> bool:
    if address.startswith(("ipc://", "inproc://")):
        return True
    if address.startswith("tcp://"):
        host = urlparse(address).hostname or ""
        return host in LOCAL_HOSTS or host == "::1"
    raise TransportError(f"address {address!r}: expected ipc://PATH or tcp://HOST:PORT")


def check_addresses(addresses: list[str], curve: Curve | None) -> None:
    """Refuse a non-local address without CURVE keys: it would expose the cluster."""
    for address in addresses:
        if not is_local(address) and curve is None:
            raise TransportError(
                f"address {address!r} is reachable from other machines; set [pipeline] "
                "keys_dir to a directory made by `dejavu-run keys` to turn on CURVE "
                "authentication and encryption, or use ipc:// or tcp://127.0.0.1"
            )


def harden(sock: zmq.Socket, max_bytes: int) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    if sock.type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


def make_socket(ctx: zmq.Context, kind: int, max_bytes: int, *, curve: Curve | None = None,
                server: bool = False) -> zmq.Socket:
    """A hardened socket; with ``curve``, a CURVE server (binding side) or client."""
    sock = harden(ctx.socket(kind), max_bytes)
    if curve is not None:
        if server:
            sock.curve_secretkey = curve.server_secret
            sock.curve_publickey = curve.server_public
            sock.curve_server = True
            sock.zap_domain = b"dejavu"
        else:
            sock.curve_secretkey = curve.client_secret
            sock.curve_publickey = curve.client_public
            sock.curve_serverkey = curve.server_public
    return sock


# --- keys ------------------------------------------------------------------------------------


def create_keys(directory: str | Path) -> Path:
    """Write server and client key pairs and authorize the client key. Secret files are
    0600, the directory 0700. Refuses to overwrite existing keys."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    if (out / "server.key_secret").exists() or (out / "client.key_secret").exists():
        raise TransportError(f"{out}: keys already exist; remove them first to make new ones")
    for name in ("server", "client"):
        public_file, secret_file = zmq.auth.create_certificates(str(out), name)
        os.chmod(secret_file, 0o600)
    authorized = out / "authorized"
    authorized.mkdir(exist_ok=True, mode=0o700)
    (authorized / "client.key").write_bytes((out / "client.key").read_bytes())
    return out


def load_curve(directory: str | Path) -> Curve:
    """The key pairs in ``directory`` (made by ``create_keys``) and its authorized keys."""
    keys = Path(directory)
    try:
        server_public, server_secret = zmq.auth.load_certificate(str(keys / "server.key_secret"))
        client_public, client_secret = zmq.auth.load_certificate(str(keys / "client.key_secret"))
        authorized = frozenset(
            zmq.auth.load_certificate(str(p))[0]
            for p in sorted((keys / "authorized").glob("*.key"))
        )
    except (OSError, ValueError) as exc:
        raise TransportError(f"[pipeline] keys_dir = {str(keys)!r}: cannot read the CURVE "
                             f"keys ({exc}); create them with `dejavu-run keys {keys}`") from None
    if server_secret is None or client_secret is None:
        raise TransportError(f"{keys}: a .key_secret file holds no secret key")
    return Curve(server_public, server_secret, client_public, client_secret, authorized)


class RepeatedWarning:
    """A warning logged at most once per ``every_s``; the lines held back are counted and
    reported with the next one."""

    def __init__(self, every_s: float = REFUSAL_LOG_S) -> None:
        self.every_s = every_s
        self.last = float("-inf")
        self.held = 0

    def __call__(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.held += 1
            return
        more = f" ({self.held} more since the last such line)" if self.held else ""
        log.warning(message + "%s", *args, more)
        self.last, self.held = now, 0


class ZapHandler(threading.Thread):
    """ZeroMQ's authentication hook (RFC 27) for this process: CURVE peers whose public
    key is authorized get in, everyone else is refused and logged."""

    def __init__(self, ctx: zmq.Context, authorized: frozenset[bytes]) -> None:
        super().__init__(name="zap", daemon=True)
        self.authorized = authorized
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("inproc://zeromq.zap.01")
        self.refused = 0
        self._warn = RepeatedWarning()
        self._halt = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._halt.is_set():
            if not poller.poll(100):
                continue
            try:
                frames = self.sock.recv_multipart()
            except zmq.ZMQError:
                return
            self.sock.send_multipart(self._answer(frames))

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        # version, request id, domain, address, identity, mechanism, credentials...
        if len(frames) < 6:
            return [b"1.0", b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        # CURVE gives the client's raw 32-byte key; key files hold it Z85-encoded.
        key = (zmq.utils.z85.encode(credentials[0]) if mechanism == b"CURVE"
               and len(credentials) == 1 and len(credentials[0]) == 32 else None)
        if key is not None and key in self.authorized:
            return [version, request_id, b"200", b"OK", b"", b""]
        self.refused += 1
        who = key.decode() if key is not None else "-"
        self._warn("refused a %s peer from %s (public key %s): not authorized",
                   mechanism.decode(errors="replace"), address.decode(errors="replace"), who)
        return [version, request_id, b"400", b"not authorized", b"", b""]

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=1.0)
        self.sock.close(linger=0)


class HandshakeWatcher(threading.Thread):
    """Logs every failed security handshake on the watched (binding) sockets: a peer
    without CURVE, with a wrong server key or with a refused client key. Such a peer never
    gets a message through; this makes the refusal visible."""

    _FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def __init__(self) -> None:
        super().__init__(name="handshakes", daemon=True)
        self.monitors: list[tuple[zmq.Socket, zmq.Socket, str]] = []
        self.failures = 0
        self._warn = RepeatedWarning()
        self._halt = threading.Event()

    def watch(self, sock: zmq.Socket, name: str) -> None:
        """Call from the thread that owns ``sock``, before ``start``."""
        self.monitors.append((sock, sock.get_monitor_socket(self._FAILED), name))

    def run(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        poller = zmq.Poller()
        for _, mon, _ in self.monitors:
            poller.register(mon, zmq.POLLIN)
        names = {mon: name for _, mon, name in self.monitors}
        while not self._halt.is_set():
            for mon, _ in poller.poll(100):
                try:
                    event = recv_monitor_message(mon, zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue
                self.failures += 1
                self._warn("refused a peer on the %s socket (%s): security handshake failed "
                           "(no CURVE, wrong keys or not authorized)", names[mon],
                           event.get("endpoint", b"").decode(errors="replace"))

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=1.0)
        for sock, mon, _ in self.monitors:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(linger=0)


def ipc_path(address: str) -> Path | None:
    return Path(address[len("ipc://"):]) if address.startswith("ipc://") else None
