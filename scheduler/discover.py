"""Which engine a front end (``chat``, ``generate``, ``serve``) talks to, and joining a
running ``launch``.

The rule, first match wins:

1. ``--connect ADDRESS``: that launch; a missing ipc socket or a silent address fails at
   once, naming the address.
2. ``--workers N`` on the command line: a new launch of N workers, started for this
   command and stopped with it.
3. A launch holding the run directory (``--run-dir``, ``[pipeline] run_dir`` or the
   default one): joined, through the address it published there; unless ``--model`` names
   another model than the one it runs (then the next rule applies, and ``note`` says so).
4. ``[pipeline] workers`` > 1: a new launch, as in 2.
5. Otherwise the in-process engine.

What this module does not know: how an engine is built or a launch started; it only says
which one to use and checks that a launch answers.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from .rundir import default_run_dir, running_launch
from .zmq_client import PipelineConnection


class JoinError(ConnectionError):
    """No launch answers at the address; one line naming it."""


@dataclass(frozen=True)
class Target:
    kind: str  # "connect" (a running launch) | "start" (a new launch) | "local"
    address: str = ""
    workers: int = 1
    found_in: str = ""  # the run directory a running launch was found through
    note: str = ""  # why a running launch was not joined


def choose(settings, *, connect: str | None = None, run_dir: str | None = None) -> Target:
    """The target for these settings (already merged with the command line)."""
    workers = settings.pipeline.workers
    if connect:
        return Target("connect", address=connect)
    if settings.sources.get("pipeline.workers") == "command line":
        return Target("start", workers=workers)
    where = run_dir or settings.pipeline.run_dir or str(default_run_dir())
    found = running_launch(where)
    note = ""
    if found is not None:
        note = _other_model(settings, found[0], where)
        if not note:
            return Target("connect", address=found[0], found_in=where)
    if workers > 1:
        return Target("start", workers=workers, note=note)
    return Target("local", note=note)


def _other_model(settings, address: str, found_in: str) -> str:
    """Why the launch at ``address`` does not fit a ``--model`` given on the command line
    ("" when it does, or when no model was given: then any launch will do)."""
    if settings.sources.get("model.path") != "command line":
        return ""
    try:
        with join(address, keys_dir=settings.pipeline.keys_dir or None,
                  run_dir=found_in, timeout_s=5.0) as conn:
            running = conn.health().model
    except JoinError:
        return ""  # gone meanwhile: the caller's join reports it
    wanted = settings.model_path()
    if os.path.realpath(wanted) == os.path.realpath(running):
        return ""
    return f"not joining the launch at {address}: it runs {running}, not {wanted}"


# Settings a launch fixes when it starts; a command that joins it cannot change them. Any
# other [model], [sparsity] or [pipeline] key given on its command line is one of these.
_JOIN_KEEPS = {"model.path", "pipeline.workers", "pipeline.run_dir", "pipeline.keys_dir"}
_LAUNCH_SECTIONS = ("model.", "sparsity.", "pipeline.")


def ignored_on_join(settings, address: str, *, sparse: bool | None = None,
                    others: Sequence[str] = ()) -> str:
    """A warning naming the command-line flags that the running launch at ``address``
    settled when it started (device, dtype, GPU budget, sparsity, ...); "" when none was
    given. ``sparse`` is the command's --sparse/--dense (None: not given); ``others`` are
    flags of the command that are no settings key but that the launch settles all the same
    (serve's "--max-batch 4": its slots), as given."""
    flags = [f"--{key.split('.', 1)[1].replace('_', '-')} {_value(settings, key)}"
             for key, source in sorted(settings.sources.items())
             if source == "command line" and key.startswith(_LAUNCH_SECTIONS)
             and key not in _JOIN_KEEPS]
    if sparse is not None:
        flags.insert(0, "--sparse" if sparse else "--dense")
    flags += others
    if not flags:
        return ""
    return (f"warning: ignored: {', '.join(flags)}: the launch at {address} was started "
            "with its own; restart it with them, or pass --workers N to start a launch for "
            "this command")


def _value(settings, key: str):
    section, name = key.split(".", 1)
    return getattr(getattr(settings, section), name)


def check_address(address: str) -> None:
    """Fail at once on an ipc:// address whose socket file does not exist (ZeroMQ would
    queue the request and wait for a peer that never comes)."""
    if not address.startswith("ipc://"):
        return
    path = address[len("ipc://"):]
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise JoinError(f"no launch at {address}: {path} does not exist (is `dejavu-run "
                        "launch` running? it prints its address as 'clients connect to "
                        "...')") from None
    except OSError as exc:
        raise JoinError(f"cannot reach {address}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise JoinError(f"no launch at {address}: {path} is not a socket")


def join(address: str, *, keys_dir: str | None = None, run_dir: str | None = None,
         timeout_s: float = 5.0) -> PipelineConnection:
    """A connection to the launch at ``address`` that has answered a health query (keys as
    ``PipelineConnection`` finds them: ``keys_dir``, else the launch's own in its run
    directory)."""
    check_address(address)
    conn = PipelineConnection(address, keys_dir=keys_dir, run_dir=run_dir)
    try:
        conn.health(timeout_s=timeout_s)
    except TimeoutError:
        conn.close()
        raise JoinError(f"no launch answers at {address} within {timeout_s:g} s (not "
                        "running, or it refused this client's keys)") from None
    except BaseException:
        conn.close()
        raise
    return conn


def describe(health, address: str) -> str:
    """One line naming the cluster a command joined."""
    workers = health.workers
    where = ", ".join(f"{w.device}" for w in workers)
    return (f"joined the launch at {address}: {len(workers)} worker(s) ({where}), model "
            f"{health.model}, {health.state}")
