"""`dejavu-run bench --small` as a user runs it: results go to a temporary directory (never
the working tree), and a failure is one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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
