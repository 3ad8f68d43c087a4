"""The run directory of one cluster: private (0700), locked, and home of its ipc sockets and,
when some address is not one of those sockets, of its per-cluster CURVE keys.

The default, ``/tmp/dejavu-run-<uid>`` when ``XDG_RUNTIME_DIR`` is unset, sits in a
directory every user can write to, so it is opened without following links: ``lstat``
first (a symbolic link, a non-directory, another owner or a directory others can write to
is refused with one line naming the path and what is wrong), then ``O_NOFOLLOW |
O_DIRECTORY``, checked to be the very inode ``lstat`` saw. Everything inside (lock, keys,
sockets) is then reached relative to that descriptor. /tmp's sticky bit keeps another user
from renaming or replacing a directory that is ours, so the path stays ours for the ipc
addresses too.

A second ``launch`` on the same directory is refused (an exclusive ``flock`` held for the
scheduler's lifetime; the kernel drops it if the scheduler dies, so a crash never leaves a
stale lock). The launch writes its client address to ``client.address`` there, so that
``chat``, ``generate`` and ``serve`` can find it (``running_launch``). On a clean stop the
socket files, that address and the keys are removed; a directory made for
one cluster (``Cluster``) is removed whole by whoever outlives the other, and one left by a
killed cluster is reclaimed (``reclaim_stale``) when the next one starts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from .transport import Curve, create_keys, load_curve

# sockaddr_un's sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_IPC_PATH = 107
KEYS_NAME = "curve"  # per-cluster CURVE keys, made by launch when an address needs them
ADDRESS_FILE = "client.address"  # the running launch's client address, for clients to find

log = logging.getLogger("dejavu.scheduler")


class RunDirError(RuntimeError):
    pass


def default_run_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        return Path(base) / "dejavu-run"
    return Path(tempfile.gettempdir()) / f"dejavu-run-{os.getuid()}"


def open_private_dir(path: Path, *, create: bool, repair: bool = True) -> int:
    """A descriptor of ``path``, checked to be a real directory of ours that no other user
    can write to (made 0700 when it is not, with ``repair``; else refused); ``RunDirError``
    otherwise."""
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # checked below like any other
    try:
        seen = os.lstat(path)
    except FileNotFoundError:
        raise RunDirError(f"run directory {path} does not exist") from None
    if stat.S_ISLNK(seen.st_mode):
        raise RunDirError(f"run directory {path} is a symbolic link (to {os.readlink(path)}); "
                          "refusing to follow it: remove it or choose another [pipeline] "
                          "run_dir")
    if not stat.S_ISDIR(seen.st_mode):
        raise RunDirError(f"run directory {path} is not a directory; remove it or choose "
                          "another [pipeline] run_dir")
    if seen.st_uid != os.getuid():
        raise RunDirError(f"run directory {path} belongs to uid {seen.st_uid}, not to this "
                          f"user (uid {os.getuid()}); choose another [pipeline] run_dir")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise RunDirError(f"run directory {path}: cannot open it ({exc.strerror})") from None
    info = os.fstat(fd)
    if (info.st_dev, info.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        raise RunDirError(f"run directory {path} was replaced while being checked")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:  # others may have planted files in it: nothing inside can be trusted
        os.close(fd)
        raise RunDirError(f"run directory {path} is writable by other users (mode "
                          f"{mode:04o}); remove it or choose another [pipeline] run_dir")
    if mode != 0o700:
        if not repair:
            os.close(fd)
            raise RunDirError(f"run directory {path} has mode {mode:04o}, not 0700")
        os.fchmod(fd, 0o700)
    return fd


class RunDir:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_run_dir()
        self._fd: int | None = None
        self._lock_fd: int | None = None

    def acquire(self) -> RunDir:
        fd = open_private_dir(self.path, create=True)
        try:
            lock = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            raise RunDirError(f"run directory {self.path}: cannot open its lock "
                              f"({exc.strerror})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(lock)
            os.close(fd)
            raise RunDirError(f"run directory {self.path} is in use by a running launch "
                              f"(pid {holder}); stop it or choose another --run-dir") from None
        os.ftruncate(lock, 0)
        os.write(lock, str(os.getpid()).encode())
        self._fd, self._lock_fd = fd, lock
        self._remove_keys()  # a crashed launch's keys must not outlive it
        return self

    def address(self, name: str) -> str:
        path = self.path / f"{name}.sock"
        if len(str(path).encode()) > MAX_IPC_PATH:
            raise RunDirError(f"ipc socket path {path} is longer than {MAX_IPC_PATH} bytes; "
                              "choose a shorter [pipeline] run_dir")
        return f"ipc://{path}"

    def holds(self, address: str) -> bool:
        """Whether ``address`` is an ipc socket directly inside this directory: only this
        user can reach it (connecting needs search permission on the 0700 directory)."""
        return address.startswith("ipc://") and Path(address[6:]).parent == self.path

    def make_keys(self) -> Path:
        """Fresh CURVE keys for this cluster in ``<run dir>/curve`` (0700, secrets 0600)."""
        self._remove_keys()
        os.mkdir(KEYS_NAME, 0o700, dir_fd=self._fd)
        return create_keys(self.path / KEYS_NAME)

    def _remove_keys(self) -> None:
        try:
            info = os.lstat(KEYS_NAME, dir_fd=self._fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(KEYS_NAME, dir_fd=self._fd)
        else:  # whatever it is (a link too), it goes itself, not what it points to
            os.unlink(KEYS_NAME, dir_fd=self._fd)

    def publish(self, client_address: str) -> None:
        """Tell clients on this host where the launch holding the lock listens."""
        tmp = f".{ADDRESS_FILE}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self._fd)
        try:
            os.write(fd, (client_address + "\n").encode())
        finally:
            os.close(fd)
        # Readers never see a half-written file.
        os.replace(tmp, ADDRESS_FILE, src_dir_fd=self._fd, dst_dir_fd=self._fd)

    def release(self, *, remove: bool = False) -> None:
        """Unlock; remove the sockets, the published address and the keys, and with
        ``remove`` (a directory made for this cluster alone) everything in it and the
        directory itself."""
        if self._fd is None:
            return
        for name in os.listdir(self._fd):
            if remove or name.endswith(".sock") or name == ADDRESS_FILE:
                try:
                    os.unlink(name, dir_fd=self._fd)
                except (FileNotFoundError, IsADirectoryError):
                    pass
        self._remove_keys()
        if self._lock_fd is not None:
            try:
                os.unlink("lock", dir_fd=self._fd)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None
        os.close(self._fd)
        self._fd = None
        if remove:
            try:
                os.rmdir(self.path)
            except OSError as exc:
                log.warning("could not remove the run directory %s: %s", self.path, exc.strerror)


def running_launch(path: str | Path | None = None) -> tuple[str, int] | None:
    """(client address, pid) of the launch holding the run directory ``path`` (default:
    ``default_run_dir()``), or None when none does: no such private directory of ours, no
    published address, or a lock nobody holds (a launch that was killed)."""
    try:
        fd = open_private_dir(Path(path) if path else default_run_dir(), create=False,
                              repair=False)
    except RunDirError:
        return None
    try:
        lock = os.open("lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            # A shared lock taken at once means no launch holds it: give it back at once.
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            pid = int(os.pread(lock, 32, 0).decode().strip() or 0)
        finally:
            os.close(lock)
        address_fd = os.open(ADDRESS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=fd)
        try:
            address = os.read(address_fd, 4096).decode().strip()
        finally:
            os.close(address_fd)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
    return (address, pid) if address else None


def cluster_keys(directory: Path) -> Path | None:
    """The per-cluster keys a launch made in ``directory`` (a run directory), if it is a
    private directory of ours that holds them."""
    try:
        os.close(open_private_dir(directory, create=False, repair=False))
    except RunDirError:
        return None
    keys = directory / KEYS_NAME
    return keys if (keys / "client.key_secret").is_file() else None


def find_curve(address: str, keys_dir: str | None, run_dir: str | None) -> Curve | None:
    """The keys to reach a cluster at ``address``: ``keys_dir`` when given; else those its
    launch made in its run directory (the ipc address's own directory, then ``run_dir`` or
    the default one); else none (a cluster of ipc sockets in its private directory)."""
    if keys_dir:
        return load_curve(keys_dir)
    places = [Path(address[len("ipc://"):]).parent] if address.startswith("ipc://") else []
    places.append(Path(run_dir) if run_dir else default_run_dir())
    for place in places:
        if (keys := cluster_keys(place)) is not None:
            return load_curve(keys)
    return None


def reclaim_stale(base: Path, prefix: str, *, min_age_s: float = 120.0) -> list[Path]:
    """Remove directories ``base/prefix*`` of ours that a killed cluster left: their lock is
    not held (or, lock-less, they are older than ``min_age_s``: one being made right now has
    no lock yet). Returns what was removed; each is logged."""
    removed = []
    try:
        names = [n for n in os.listdir(base) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        path = base / name
        try:
            fd = open_private_dir(path, create=False, repair=False)
        except RunDirError:
            continue  # not ours, or not safe to touch: leave it alone
        try:
            try:
                lock = os.open("lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if time.time() - os.fstat(fd).st_mtime < min_age_s:
                    continue
                lock = None
            if lock is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a running cluster
                finally:
                    os.close(lock)
            for entry in os.listdir(fd):
                try:
                    os.unlink(entry, dir_fd=fd)
                except IsADirectoryError:
                    shutil.rmtree(entry, dir_fd=fd)
            os.rmdir(path)
        except OSError:
            continue
        finally:
            os.close(fd)
        log.warning("removed the stale run directory %s (its cluster was killed)", path)
        removed.append(path)
    return removed
