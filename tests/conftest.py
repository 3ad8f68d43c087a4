"""Shared by every test file, loaded before any of them imports triton.

- Triton's interpreter: without CUDA the kernels run on CPU tensors through
  ``TRITON_INTERPRET=1`` (worker processes inherit it). Triton reads it when a kernel is
  defined, so it is set here, once, not per file. With CUDA it stays off: tests that run
  kernels then use the GPU (tests decide their device from ``torch.cuda.is_available()``).
- ``@pytest.mark.gpu``: the test needs CUDA; without it the test is skipped, never failed.
- Session-wide isolation: commands that look for a running `launch` in the default run
  directory ($XDG_RUNTIME_DIR/dejavu-run) must not find one that someone else on this
  machine started; each test session gets a private XDG_RUNTIME_DIR (subprocesses inherit
  it).
- ``tiny`` and ``greedy``: the pipeline tests' tiny random checkpoint (one per test module)
  and the in-process engine's greedy tokens for its PROMPTS, what every pipeline must
  return (`pipeline_fixtures.py`; imported when a test asks for them, so the kernel tests
  do not load the scheduler).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline_fixtures import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def greedy(tiny) -> list[list[int]]:
    from pipeline_fixtures import GREEDY, PROMPTS

    from dejavu.runtime.checkpoint import load_model
    from dejavu.scheduler.engine import Engine

    engine = Engine(load_model(tiny), max_batch=8, max_len=128)
    return [engine.generate(p, GREEDY).tokens for p in PROMPTS]
