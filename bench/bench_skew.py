"""How skewed are MLP firing frequencies, measured on a model vs the offload bench's law.

The offload scenario draws selections from ``bench_common.SelectionLaw``; this compares
its skew with a real model's: per layer, the share of all firings taken by the 10% most
frequently firing neurons, and the host bytes per token that the placement plans for the
OPT-30B shape under each law (PCIe floor at a given in-place read rate). CPU only.

    python -m dejavu.bench.bench_skew models/opt-gutenberg-31m \
        ../shared/data/gutenberg/heldout.jsonl.xz
"""

from __future__ import annotations

import json
import lzma
import sys

import torch
from torch import Tensor

from ..runtime.checkpoint import load_model
from ..runtime.tokenizer import load_tokenizer
from ..runtime.weight_store import GIB, LayerFrequencies, RecordLayout, plan_placement
from .bench_common import SHAPES, SelectionLaw, frequencies
from .bench_offload import HEAD_LAW, PROFILE_TOKENS, reserved_bytes
from .mlp_stats import firing_counts, stream_windows


def top10_share(freq: Tensor) -> float:
    s = torch.sort(freq.double(), descending=True).values
    return float(s[: max(1, len(s) // 10)].sum() / s.sum())


def model_skew(model_dir: str, data: str, tokens: int = 32768) -> list[dict]:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    docs: list[list[int]] = []
    with lzma.open(data, "rt") as f:
        for line in f:
            docs.append(tok.encode(json.loads(line)["text"]))
            if sum(map(len, docs)) > tokens + 8192:
                break
    counts, n = firing_counts(model, stream_windows(docs, 256, tokens))
    return [{"layer": i, "density": round(float(c.double().mean() / n), 3),
             "top10_share": round(top10_share(c.double() / n), 3)} for i, c in enumerate(counts)]


def law_plan(skew: float, batch: int, read_rate: float = 45.5e9) -> dict:
    s = SHAPES["opt-30b"]
    lay = RecordLayout(s.hidden, s.ffn, s.heads)
    law, g = SelectionLaw(0.10, skew), torch.Generator().manual_seed(0)
    neurons = frequencies(law.sample(law.weights(s.ffn, g), PROFILE_TOKENS, g), s.ffn)
    heads = frequencies(HEAD_LAW.sample(HEAD_LAW.weights(s.heads, g), PROFILE_TOKENS, g),
                        s.heads)
    share = (24 * GIB - reserved_bytes(s, batch)) / s.layers
    plan = plan_placement(lay, [LayerFrequencies(neurons.float(), heads.float())], [0],
                          budget_bytes=int(share), reserved_bytes=0, element_size=2)
    host = plan.bytes_per_step(batch)["host_bytes"] * s.layers
    return {"skew": skew, "batch": batch, "law_top10_share": round(top10_share(neurons), 3),
            "planned_host_gb_per_step": round(host / 1e9, 2),
            "pcie_floor_ms": round(host / read_rate * 1e3, 1)}


def main(argv: list[str]) -> None:
    for row in model_skew(argv[0], argv[1]):
        print(row)
    for skew in (1.0, 0.5):
        for batch in (1, 8):
            print(law_plan(skew, batch))


if __name__ == "__main__":
    main(sys.argv[1:])
