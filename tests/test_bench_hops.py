"""bench/bench_hops.py on the CPU: two real processes pass activations through the shared
ring and through the socket, get them back unchanged, and the results name each hop."""

from __future__ import annotations

import json

import pytest

from dejavu.bench import bench_hops
from dejavu.workers import data_plane


@pytest.mark.skipif(not data_plane.SHM_DIR.is_dir(), reason="no /dev/shm here")
def test_hop_bench_times_every_path_and_writes_the_headline_keys(tmp_path):
    """With a spin long enough for the peer's turn (50 ms), answers are taken from the ring
    before their doorbells; without one, none is; every answer equals what was sent (the
    bench checks each)."""
    assert bench_hops.main(["--device", "cpu", "--shapes", "tiny", "--batch", "1,3",
                            "--iters", "12", "--warmup", "1", "--spin-us", "50000",
                            "--label", "t1", "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("*-hops-t1.json")).read_text())
    rows = result["hops"]
    paths = ["ring+spin", "ring", "socket"]
    assert [(r["batch"], r["path"]) for r in rows] == [(b, p) for b in (1, 3) for p in paths]
    assert all(r["median_us"] > 0 and r["p90_us"] >= r["median_us"] for r in rows)
    assert all(r["label"] == "t1" for r in rows)
    assert [r["picked"] > 0 for r in rows] == [True, False, False] * 2
    assert result["hop_us_tiny_batch1_shm_path_t1"] == rows[0]["median_us"]
    assert result["hop_us_tiny_batch1_shm_nospin_path_t1"] == rows[1]["median_us"]
    assert result["hop_us_tiny_batch3_socket_path_t1"] == rows[5]["median_us"]
    table = next(tmp_path.glob("*-hops-t1.md")).read_text()
    assert "| tiny | 64 | 3 | 768 | ring+spin |" in table and "[t1]" in table
