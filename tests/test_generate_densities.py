"""`generate --json` in one process: "decode_sparsity" holds the densities of the decode
steps alone, "sparsity" those of every token (the prompt's prefill too). Checked by
arithmetic against two runs that share a prompt: one token (prefill only) and N tokens."""

from __future__ import annotations

import io
import math

import pytest

from dejavu.runtime.settings import REPO_ROOT, load_settings
from dejavu.tools.generate import GenerateRequest, run_generate

SHIPPED = REPO_ROOT / "models" / "opt-gutenberg-31m"
PROMPT = "It was a dark and stormy night, and the rain fell in torrents"

pytestmark = pytest.mark.skipif(not (SHIPPED / "predictors").is_dir(),
                                reason="the shipped model's predictors are not here")


def generate(new_tokens: int) -> dict:
    settings = load_settings(None, {"model.path": str(SHIPPED), "model.device": "cpu",
                                    "generation.max_new_tokens": new_tokens,
                                    "generation.temperature": 0.0})
    return run_generate(settings, GenerateRequest(PROMPT, None, ()), as_json=True,
                        out=io.StringIO(), err=io.StringIO(), sparse=True)


def test_decode_densities_leave_the_prompt_out():
    prefill = generate(1)
    assert prefill["decode_sparsity"] is None  # one token: no decode step ran
    full = generate(12)
    decode = full["decode_sparsity"]
    prompt, steps = len(full["prompt_tokens"]), len(full["tokens"]) - 1
    assert steps > 0 and decode["decode_steps"] == steps
    layers = full["sparsity"]["layers"]
    assert sorted(decode["layers"]) == sorted(layers) == sorted(prefill["sparsity"]["layers"])
    differs = False
    for lid, every in layers.items():
        for key in ("mlp_density", "head_density"):
            # every token's mean = (prompt tokens' sum + decode steps' sum) / all tokens
            want = (every[key] * (prompt + steps)
                    - prefill["sparsity"]["layers"][lid][key] * prompt) / steps
            got = decode["layers"][lid][key]
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (lid, key, got, want)
            differs |= not math.isclose(got, every[key], rel_tol=1e-6)
    assert differs, "prefill and decode densities agree here: the test cannot tell them apart"
    means = [v["mlp_density"] for v in decode["layers"].values()]
    assert math.isclose(decode["mlp_density"], sum(means) / len(means), rel_tol=1e-12)
