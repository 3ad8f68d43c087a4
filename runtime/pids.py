"""Whether a process id still names a running process, for the workers (a ring file whose
owner died) and the HTTP front end (a worker of the cluster it started).

What this module does not know: whose process it is or what to do about a dead one.
"""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs. Gone: no such process, or a zombie (exited, not yet reaped
    by its parent: state Z in /proc/<pid>/stat). A process of another user (kill(0) refused)
    counts as running; without /proc (not Linux) kill(0) alone decides."""
    if pid <= 0:
        raise ValueError(f"process_alive: pid must be positive, got {pid} (0 and negative "
                         "values name process groups)")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _state(pid) not in ("Z", None)


def _state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat ("R", "S", "Z", ...); "?" without /proc; None
    when the process left between the two looks."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else "?"
    except OSError:
        return "?"
    # The command name (field 2) is in parentheses and may hold ") ": split after the last.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] if fields else "?"
