"""runtime/pids.py: a running process is alive; an exited one is dead, also while it is a
zombie its parent has not reaped (the case kill(0) alone gets wrong)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dejavu.runtime.pids import process_alive


def test_this_process_is_alive():
    assert process_alive(os.getpid())


def test_a_running_child_is_alive_and_a_reaped_one_is_not():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombies are read from /proc")
def test_an_exited_child_not_yet_reaped_is_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while _state(child.pid) != "Z":  # exited; Popen has not waited on it
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        os.kill(child.pid, 0)  # kill(0) still succeeds on a zombie...
        assert not process_alive(child.pid)  # ...but it is gone
    finally:
        child.wait()


@pytest.mark.parametrize("pid", [0, -1])
def test_a_process_group_id_is_refused(pid):
    with pytest.raises(ValueError, match="pid must be positive"):
        process_alive(pid)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[-1].split()[0]
