"""Session-wide isolation: commands that look for a running `launch` in the default run
directory ($XDG_RUNTIME_DIR/dejavu-run) must not find one that someone else on this machine
started; each test session gets a private XDG_RUNTIME_DIR (subprocesses inherit it)."""

import os
import shutil
import tempfile

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_runtime_dir():
    path = tempfile.mkdtemp(prefix="dj-xdg-")  # short: ipc paths must fit 107 bytes
    saved = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = path
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = saved
        shutil.rmtree(path, ignore_errors=True)
