"""``dejavu-run eval``: perplexity / bits per byte of text files and zero-shot tasks.

One entry point, ``evaluate``, runs a list of zero-shot tasks (``eval_tasks``) and text
files (``eval_text``) against a loaded model and returns one result per item,
``{"task": name, "metrics": {...}, "n": rows}``; ``markdown_table`` and JSON print them.

The seam for sparse execution is ``logits_fn``: every score goes through it (token ids
[B, T] -> logits [B, T, V]); it defaults to the dense forward pass of ``model``.

What this module does not know: how weights are loaded beyond ``checkpoint.load_model``,
or which rows a sparse forward skips.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..runtime.model import OPTModel
from ..runtime.settings import REPO_ROOT
from .eval_tasks import ZERO_SHOT, canonical, evaluate_task
from .eval_text import (
    EvalDataError,
    LogitsFn,
    TextScore,
    dense_logits_fn,
    read_documents,
    score_token_ids,
    wikitext_documents,
)

TEXT_TASKS = {"wikitext2": "wikitext2_test.txt"}
# Beside the repository (its ../shared/data/eval), wherever the command runs from.
DEFAULT_EVAL_DIR = str(REPO_ROOT.parent / "shared" / "data" / "eval")


@dataclass
class EvalOptions:
    tasks: Sequence[str] = ()
    data: Sequence[str] = ()
    eval_dir: str = DEFAULT_EVAL_DIR
    limit: int | None = None  # rows per task; lines of a .txt; documents of a .jsonl
    batch_size: int = 8
    window: int = 1024
    stride: int = 512
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.tasks and not self.data:
            raise EvalDataError("nothing to evaluate: give --task NAME and/or --data FILE")
        if self.limit is not None and self.limit <= 0:
            raise EvalDataError(f"--limit {self.limit}: expected a positive number of rows")
        if self.batch_size <= 0:
            raise EvalDataError(f"--batch-size {self.batch_size}: expected a positive number")
        if not 0 < self.stride <= self.window:
            raise EvalDataError(f"--stride {self.stride} must be in [1, --window {self.window}]")


def expand_tasks(names: Sequence[str]) -> list[str]:
    """'all' -> every zero-shot task and wikitext2; 'zero-shot' -> the zero-shot tasks."""
    out: list[str] = []
    for name in names:
        if name == "all":
            out += [*ZERO_SHOT, *TEXT_TASKS]
        elif name == "zero-shot":
            out += ZERO_SHOT
        elif name in TEXT_TASKS:
            out.append(name)
        else:
            out.append(canonical(name))
    return list(dict.fromkeys(out))


def _encoder(tokenizer):
    """Batch encoding without BOS: the tokenizers backend on all cores when there is one."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        def encode_many(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        def encode_many(texts: list[str]) -> list[list[int]]:
            return [tokenizer.encode(t, add_bos=False) for t in texts]
    return encode_many


def score_text(name: str, documents: list[str], logits_fn: LogitsFn, tokenizer,
               opts: EvalOptions, device, n: int) -> dict:
    ids = [[tokenizer.bos_id, *d] for d in _encoder(tokenizer)(documents)]
    ids = [d for d in ids if len(d) > 1]
    if not ids:
        raise EvalDataError(f"{name}: no text to score")
    nll, tokens = score_token_ids(logits_fn, ids, window=opts.window, stride=opts.stride,
                                  batch_size=opts.batch_size, device=device,
                                  show_progress=opts.show_progress, desc=name)
    score = TextScore(nll, tokens, sum(len(d.encode("utf-8")) for d in documents))
    metrics = {**score.metrics(), "window": opts.window, "stride": opts.stride}
    return {"task": name, "metrics": metrics, "n": n}


def _text_file(path: str, limit: int | None) -> list[str]:
    docs = read_documents(path)
    if limit is None:
        return docs
    if path.removesuffix(".xz").endswith(".txt"):  # a .txt is one document: cut lines
        return ["".join(docs[0].splitlines(keepends=True)[:limit])]
    return docs[:limit]


def evaluate(model: OPTModel, tokenizer, opts: EvalOptions, *,
             logits_fn: LogitsFn | None = None) -> list[dict]:
    """Run every task and data file of ``opts``; one result dict per item, in order."""
    logits_fn = logits_fn or dense_logits_fn(model)
    device = next(model.parameters()).device
    max_len = model.config.max_position_embeddings
    window = min(opts.window, max_len)
    opts = EvalOptions(**{**opts.__dict__, "window": window,
                          "stride": min(opts.stride, window)})
    results = []
    encode_one = _encoder(tokenizer)
    for name in expand_tasks(opts.tasks):
        start = time.perf_counter()
        if name in TEXT_TASKS:
            path = Path(opts.eval_dir) / TEXT_TASKS[name]
            doc = wikitext_documents(path, opts.limit)
            rows = doc[0].count("\n\n") + 1
            result = score_text(name, doc, logits_fn, tokenizer, opts, device, n=rows)
        else:
            result = evaluate_task(name, logits_fn, lambda t: encode_one([t])[0],
                                   bos_id=tokenizer.bos_id, eval_dir=opts.eval_dir,
                                   max_len=max_len, batch_size=opts.batch_size, device=device,
                                   limit=opts.limit, show_progress=opts.show_progress)
        result["seconds"] = round(time.perf_counter() - start, 2)
        results.append(result)
    for path in opts.data:
        start = time.perf_counter()
        docs = _text_file(path, opts.limit)
        result = score_text(Path(path).name, docs, logits_fn, tokenizer, opts, device,
                            n=len(docs))
        result["seconds"] = round(time.perf_counter() - start, 2)
        results.append(result)
    return results


COLUMNS = ("acc", "acc_norm", "perplexity", "bits_per_byte")


def markdown_table(results: list[dict]) -> str:
    lines = ["| task | n | " + " | ".join(COLUMNS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |"]
    for r in results:
        cells = []
        for c in COLUMNS:
            v = r["metrics"].get(c)
            cells.append("" if v is None else f"{v:.4f}" if c != "perplexity" else f"{v:.2f}")
        lines.append(f"| {r['task']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(results: list[dict]) -> str:
    """One object for one item, a list for several (the CLI's --json)."""
    clean = [{"task": r["task"], "metrics": r["metrics"], "n": r["n"]} for r in results]
    return json.dumps(clean[0] if len(clean) == 1 else clean)


def run_cli(model_path: str, dtype: str, device: str, opts: EvalOptions,
            as_json: bool) -> str:
    """Load the checkpoint and its tokenizer, evaluate, return what the CLI prints."""
    from ..runtime.checkpoint import load_model, resolve_model_dir
    from ..runtime.tokenizer import load_tokenizer

    if device == "cuda" and not torch.cuda.is_available():
        raise EvalDataError("--device cuda: no CUDA device is available")
    model_dir = resolve_model_dir(model_path)
    model = load_model(model_dir, dtype=dtype, device=device)
    tokenizer = load_tokenizer(model_dir)
    results = evaluate(model, tokenizer, opts)
    return to_json(results) if as_json else markdown_table(results)
