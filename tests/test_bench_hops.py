"""bench/bench_hops.py on the CPU: two real processes pass activations through the shared
ring and through the socket, get them back unchanged, and the results name each hop."""

from __future__ import annotations

import json

import pytest

from dejavu.bench import bench_hops
from dejavu.workers import data_plane


@pytest.mark.skipif(not data_plane.SHM_DIR.is_dir(), reason="no /dev/shm here")
def test_hop_bench_times_both_paths_and_writes_the_headline_keys(tmp_path):
    assert bench_hops.main(["--device", "cpu", "--shapes", "tiny", "--batch", "1,3",
                            "--iters", "6", "--warmup", "1", "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("*-hops.json")).read_text())
    rows = result["hops"]
    assert [(r["batch"], r["path"]) for r in rows] == [(1, "ring"), (1, "socket"),
                                                      (3, "ring"), (3, "socket")]
    assert all(r["median_us"] > 0 and r["p90_us"] >= r["median_us"] for r in rows)
    assert result["hop_us_tiny_batch1_shm_path"] == rows[0]["median_us"]
    assert result["hop_us_tiny_batch3_socket_path"] == rows[3]["median_us"]
    table = next(tmp_path.glob("*-hops.md")).read_text()
    assert "| tiny | 64 | 3 | 768 |" in table
