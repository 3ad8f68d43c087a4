"""`dejavu-run bench --small` as a user runs it: results go to a temporary directory (never
the working tree), and a failure is one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

CLI = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]


def bench(*args: str, cwd) -> subprocess.CompletedProcess:
    # --time-budget 0: every scenario is skipped; what is left is where results go.
    return subprocess.run([*CLI, "bench", "--small", "--time-budget", "0", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})


def test_small_writes_to_a_temporary_directory_not_the_working_tree(tmp_path):
    out = bench(cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    wrote = re.search(r"wrote (\S+\.json) and (\S+\.md)", out.stdout)
    assert wrote and os.path.isfile(wrote.group(1)), out.stdout
    assert not os.path.commonpath([wrote.group(1), str(tmp_path)]) == str(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_each_skipped_scenario_is_one_line_naming_it_and_why(tmp_path):
    from dejavu.bench.bench import BenchOptions, _plan

    out = bench("--out", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    labels = [label for _, label, _ in _plan(BenchOptions(small=True))]
    assert list(saved["skipped"]) == labels
    skipped = [ln for ln in out.stdout.splitlines() if " skipped: " in ln]
    assert skipped == [f"[bench] {label} skipped: {saved['skipped'][label]}"
                       for label in labels], out.stdout
    assert "time budget: " in saved["skipped"]["tune tiny"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without a GPU")
def test_accelerate_without_a_gpu_says_it_is_skipped(tmp_path):
    out = bench("--only", "accelerate", "--out", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [ln for ln in out.stdout.splitlines() if ln.startswith("[bench]")] == [
        "[bench] accelerate tiny skipped: accelerate's CPU offload needs a GPU"], out.stdout


def test_a_failure_is_one_line_and_exit_1(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    out = bench("--out", str(blocker), cwd=tmp_path)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "bench failed" in errors[0], out.stderr


def test_an_unknown_scenario_is_named_before_anything_runs(tmp_path):
    # Without --small, so on a CPU the misspelling is reported before "needs a CUDA GPU".
    out = subprocess.run([*CLI, "bench", "--only", "kernels", "--only", "e2ee"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --only e2ee: no such scenario; choose from "
        "tune | kernels | resident | offload | accelerate | e2e"], out.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_scenario():
    from dejavu.bench.bench import SCENARIOS, BenchOptions, _plan

    planned = {name for name, _, _ in _plan(BenchOptions(small=True))}
    assert planned | {"e2e"} == set(SCENARIOS)
    out = subprocess.run([*CLI, "bench", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert all(name in out.stdout for name in SCENARIOS), out.stdout
