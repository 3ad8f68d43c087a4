"""bench/bench_cpu.py end to end at a tiny size: every row runs on the shipped model, the
results name the machine, and dense decoding gives transformers' greedy tokens."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_bench_cpu_writes_results_with_the_machine(tmp_path):
    from dejavu.bench.bench_cpu import main

    report = main(["--new-tokens", "3", "--rounds", "1", "--out", str(tmp_path),
                   "--rows", "dejavu dense,dejavu sparse,transformers"])
    (json_file,) = tmp_path.glob("*-cpu-*core.json")
    (md_file,) = tmp_path.glob("*-cpu-*core.md")
    saved = json.loads(json_file.read_text())
    assert saved["machine"]["cores"] and saved["machine"]["load_before"]
    assert set(saved["rows"]) == {"dejavu dense", "dejavu sparse", "transformers"}
    for row in saved["rows"].values():
        assert row["tokens_per_s"]["best"] > 0 and len(row["rounds"]) == 1
    assert report["same_tokens_as_transformers"]["dejavu dense"]
    assert "| dejavu sparse |" in md_file.read_text()
