"""Held-out recall of firing neurons and MLP density, per layer, at a predictor file's
calibrated recall points: what "recall >= 0.95 in every layer" is measured with.

    python -m dejavu.bench.sparsity_recall --model models/opt-gutenberg-31m \
        --data ../shared/data/gutenberg/heldout.jsonl.xz --recalls 0.9,0.95,0.96

The text is the sparsity sweep's (``--docs`` documents, ``--chars`` characters of each from
a third of the way in), cut into whole windows from position 0. Labels come from the dense
model (``collect_labels.collect``: fc1 pre-activation > 0); each recall point selects the
neurons whose predicted logit exceeds that point's threshold, as the runtime's threshold
selector does. Prints a Markdown table (density / recall per layer and point, then the mean
density and the lowest recall); ``--out FILE.json`` keeps the numbers.

What this does not measure: bits per byte (bench/sparsity_sweep.py does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..runtime.checkpoint import load_model, resolve_model_dir
from ..runtime.predictors import PredictorSet, find_predictors
from ..runtime.tokenizer import load_tokenizer
from ..tools.collect_labels import collect, iter_texts, unpack_bits


@torch.no_grad()
def held_out_recall(model, predictors: PredictorSet, windows: torch.Tensor,
                    recalls: list[str]) -> dict:
    """{recall: {layer: (density, recall)}} over every token of ``windows``."""
    data = collect(model, windows)
    out: dict[str, dict[int, tuple[float, float]]] = {r: {} for r in recalls}
    for layer in predictors.layer_ids:
        table = predictors.points[layer].mlp_thresholds or {}
        source = data.mlp_source(layer, predictors.points[layer].mlp_source)
        scores = predictors.mlp[layer](source.float())
        labels = unpack_bits(data.neuron_bits[layer], data.ffn_dim)
        for r in recalls:
            if r not in table:
                raise SystemExit(f"layer {layer} has no threshold for recall {r} "
                                 f"(the file has {sorted(table)})")
            chosen = scores > table[r]
            out[r][layer] = (float(chosen.double().mean()),
                             float((chosen & labels).sum() / labels.sum().clamp_min(1)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/opt-gutenberg-31m")
    p.add_argument("--predictors", default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--chars", type=int, default=12_000)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--recalls", default="0.9,0.95,0.96")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    predictors = PredictorSet.load(args.predictors or find_predictors(model_dir), model)
    rows = []
    for i, text in enumerate(iter_texts(args.data)):
        if i >= args.docs:
            break
        ids = tok.encode(text[len(text) // 3: len(text) // 3 + args.chars])
        rows += [ids[s:s + args.window] for s in range(0, len(ids) - args.window + 1,
                                                       args.window)]
    windows = torch.tensor(rows)
    recalls = [f"{float(r):g}" for r in args.recalls.split(",")]
    res = held_out_recall(model, predictors, windows, recalls)
    print(f"{windows.numel()} held-out tokens; density / recall of firing neurons\n")
    print("| recall point | " + " | ".join(f"layer {i}" for i in predictors.layer_ids)
          + " | mean density | lowest recall |")
    print("|---|" + "---|" * (len(predictors.layer_ids) + 2))
    for r in recalls:
        cells = [f"{d:.3f} / {rc:.3f}" for d, rc in res[r].values()]
        mean = sum(d for d, _ in res[r].values()) / len(res[r])
        low = min(rc for _, rc in res[r].values())
        print(f"| {r} | " + " | ".join(cells) + f" | {mean:.3f} | {low:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"tokens": windows.numel(), "points": res},
                                             indent=1) + "\n")


if __name__ == "__main__":
    main()
