"""The run directory of one cluster: private (0700), locked, and home of its ipc sockets.

A second ``launch`` on the same directory is refused (an exclusive ``flock`` held for the
scheduler's lifetime; the kernel drops it if the scheduler dies, so a crash never leaves a
stale lock). The launch writes its client address to ``client.address`` there, so that
``chat``, ``generate`` and ``serve`` can find it (``running_launch``). On a clean stop the
socket files and the address file are removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path

# sockaddr_un's sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_IPC_PATH = 107
ADDRESS_FILE = "client.address"


class RunDirError(RuntimeError):
    pass


def default_run_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        return Path(base) / "dejavu-run"
    return Path(tempfile.gettempdir()) / f"dejavu-run-{os.getuid()}"


class RunDir:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_run_dir()
        self._lock_fd: int | None = None

    def acquire(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = self.path.stat()
        if info.st_uid != os.getuid():
            raise RunDirError(f"run directory {self.path} belongs to another user; choose "
                              "another [pipeline] run_dir")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(self.path, 0o700)
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = (self.path / "lock").read_text().strip() or "another process"
            raise RunDirError(f"run directory {self.path} is in use by a running launch "
                              f"(pid {holder}); stop it or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return self

    def address(self, name: str) -> str:
        path = self.path / f"{name}.sock"
        if len(str(path).encode()) > MAX_IPC_PATH:
            raise RunDirError(f"ipc socket path {path} is longer than {MAX_IPC_PATH} bytes; "
                              "choose a shorter [pipeline] run_dir")
        return f"ipc://{path}"

    def publish(self, client_address: str) -> None:
        """Tell clients on this host where the launch holding the lock listens."""
        tmp = self.path / f".{ADDRESS_FILE}.{os.getpid()}"
        tmp.write_text(client_address + "\n")
        tmp.replace(self.path / ADDRESS_FILE)  # readers never see a half-written file

    def release(self) -> None:
        for sock in self.path.glob("*.sock"):
            sock.unlink(missing_ok=True)
        (self.path / ADDRESS_FILE).unlink(missing_ok=True)
        if self._lock_fd is not None:
            (self.path / "lock").unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None


def running_launch(path: str | Path | None = None) -> tuple[str, int] | None:
    """(client address, pid) of the launch holding the run directory ``path`` (default:
    ``default_run_dir()``), or None when no launch holds it. The lock file names the pid;
    a pid that is gone means a launch that died without cleaning up."""
    run_dir = Path(path) if path else default_run_dir()
    try:
        pid = int((run_dir / "lock").read_text().strip())
        address = (run_dir / ADDRESS_FILE).read_text().strip()
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except OSError as exc:
        if exc.errno != errno.EPERM:  # EPERM: alive, another user's (its dir is 0700 anyway)
            return None
    return (address, pid) if address else None
