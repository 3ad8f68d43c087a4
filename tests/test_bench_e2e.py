"""`dejavu-run bench --only e2e` in its dry run: tiny shapes on the CPU (kernels through
Triton's interpreter), every row of the real run measured or failing with its reason, the
host bytes counted per decode token equal to what the engine expected, and the files
written with the issue's headline keys."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dejavu.bench.bench_e2e import E2EOptions, headline, main  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for CPUs")
def test_e2e_dry_run_measures_every_row(tmp_path):
    opts = E2EOptions.dry_run(tmp_path / "results")
    opts.checkpoint_dir = tmp_path / "ckpt"
    opts.tokens = 2
    jpath, mpath = main(opts)
    res = json.loads(jpath.read_text())
    assert jpath.name.endswith("-e2e-small.json") and mpath.read_text().startswith("# End")
    # Engine rows read their MLP rows staged (the default); random:0.1 also in place.
    rows = {(r["path"], r.get("select")): r for r in res["rows"]
            if r.get("mlp_cold_rows") != "in place"}
    in_place = [r for r in res["rows"] if r.get("mlp_cold_rows") == "in place"]
    assert len(in_place) == 1 and in_place[0]["b1"]["host_bytes_per_token"] == \
        rows[("engine", "random:0.1")]["b1"]["host_bytes_per_token"]  # the same rows, once
    for select in ("random:0.1", "random:0.1:0.5"):
        eng = rows[("engine", select)]
        assert eng["offloaded_layers"] >= 0.6 * 8  # at least 60% of the layers on the host
        for key in ("ttft8_s", "ttft24_s", "ttft_bound_s"):
            assert eng[key] > 0
        b1, batched = eng["b1"], eng["batched"]
        assert b1["tokens_per_s"] > 0 and batched["streams"] == 2
        # Batch 1, every decode step reads what the report expected, exactly: the selected
        # rows once (no K/V re-reads, no second copy).
        assert b1["host_bytes_per_token"] == eng["expected_host_bytes_per_token"] or \
            select.endswith("0.5")
        assert 0 < batched["host_bytes_per_token"] < b1["host_bytes_per_token"]
    launch = rows[("launch", "random:0.1")]
    assert launch["b1"]["tokens_per_s"] > 0 and launch["ttft24_s"] > 0
    assert launch["b1"]["host_bytes_per_token"] == rows[("engine", "random:0.1")]["b1"][
        "host_bytes_per_token"]  # the worker reads what the in-process engine reads
    assert "needs a GPU" in rows[("accelerate", None)]["error"]
    assert "flexgen" in rows[("flexgen", "dense")]["error"]
    assert rows[("resident", None)]["sparse_speedup_vs_dense"] > 0
    for key in headline(res, opts):
        assert key in res
