"""How the union of a batch's selections grows with batch size.

A decoding batch computes the union of its rows' neurons and heads (runtime/sparse.py), so
the density it reads grows with the number of sequences in it. This runs the model over
held-out windows, takes each token's selection from the configured predictors (exactly what
a one-token decode step would select), and reports the mean union density of B tokens drawn
from B different windows, per layer and averaged over layers.

    python -m dejavu.bench.sparsity_union --model M --data heldout.jsonl.xz --out DIR

What this module does not know: timing (the union's cost depends on the backend).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..runtime.model import Batch, full_positions
from ..runtime.selection import PredictorSelector, SelectionConfig
from ..runtime.sparse import SparseContext, mlp_reads_own_input

BATCHES = (1, 2, 4, 8, 16, 32)


@torch.no_grad()
def union_densities(model, selector, windows: torch.Tensor, *, draws: int = 200,
                    seed: int = 0) -> dict[int, dict[str, list[float]]]:
    """{B: {"mlp": [per layer], "heads": [per layer]}} mean union densities."""
    masks: dict[int, dict[str, torch.Tensor]] = {}

    class Record:  # the selector's masks per layer, whichever input its MLP reads
        def __call__(self, layer_id, source):
            sel = selector(layer_id, source)
            masks[layer_id] = {"mlp": sel.neurons, "heads": sel.heads}
            return sel

        def mlp_reads_own_input(self, layer_id):
            return mlp_reads_own_input(selector, layer_id)

        def select_neurons(self, layer_id, mlp_in):
            masks[layer_id]["mlp"] = selector.select_neurons(layer_id, mlp_in)
            return masks[layer_id]["mlp"]

    ctx = SparseContext(Record(), mode="mask")
    model(windows, Batch(full_positions(*windows.shape, windows.device), sparse=ctx))
    g = torch.Generator().manual_seed(seed)
    w, t = windows.shape
    out: dict[int, dict[str, list[float]]] = {}
    for b in BATCHES:
        if b > w:
            break
        out[b] = {"mlp": [], "heads": []}
        for layer in sorted(masks):
            for kind in ("mlp", "heads"):
                m = masks[layer][kind]
                if m is None:  # that block runs dense
                    out[b][kind].append(1.0)
                    continue
                total = 0.0
                for _ in range(draws):
                    rows = torch.randperm(w, generator=g)[:b]  # b different sequences
                    cols = torch.randint(0, t, (b,), generator=g)
                    total += float(m[rows, cols].any(0).double().mean())
                out[b][kind].append(total / draws)
    return out


def main(argv: list[str] | None = None) -> None:
    from ..runtime.checkpoint import load_model, resolve_model_dir
    from ..runtime.predictors import PredictorSet, find_predictors
    from ..runtime.tokenizer import load_tokenizer
    from ..tools.collect_labels import calibration_windows, iter_texts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--mlp-recall", type=float, default=0.9)
    p.add_argument("--head-density", type=float, default=None)
    args = p.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    preds = PredictorSet.load(find_predictors(model_dir), model)
    selector = PredictorSelector(preds, SelectionConfig(
        mlp_select="threshold", mlp_recall=args.mlp_recall, head_density=args.head_density))
    # One window per document, so that the B rows of a draw are different texts.
    windows, _ = calibration_windows(iter_texts(args.data), tok.encode, window=args.window,
                                     tokens=args.windows * args.window, per_doc=args.window)
    result = union_densities(model, selector, windows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "union.json").write_text(json.dumps(
        {"model": model_dir.name, "mlp_recall": args.mlp_recall,
         "head_density": args.head_density, "windows": int(windows.shape[0]),
         "window": args.window, "union": result}, indent=1) + "\n")
    heads = "trained point" if args.head_density is None else args.head_density
    lines = [f"Union density vs batch size on {model_dir.name} (MLP threshold at recall "
             f"{args.mlp_recall}, heads {heads}; "
             f"B tokens from B different held-out windows, 200 draws):", "",
             "| batch | MLP density (mean over layers) | per layer | head density |",
             "|---|---|---|---|"]
    for b, r in result.items():
        mean = sum(r["mlp"]) / len(r["mlp"])
        heads = sum(r["heads"]) / len(r["heads"])
        per = " ".join(f"{x:.2f}" for x in r["mlp"])
        lines.append(f"| {b} | {mean:.3f} | {per} | {heads:.3f} |")
    (out / "union.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
