"""Zero-shot tasks scored by continuation log-likelihood (../shared/data/eval, README there).

Every task becomes a list of (context, continuation) requests. The context is BOS plus the
context text's tokens, the continuation is tokenised on its own (it starts with its space,
so byte-level BPE spells the answer the usual way); only continuation tokens are scored.

- LAMBADA: continuation ``" " + last word``; ``acc`` = greedy decoding reproduces every
  target token; ``perplexity`` = exp(-mean per-passage summed log-likelihood) (the
  lm-eval-harness definition).
- Multiple choice (piqa, copa, arc_easy, arc_challenge, openbook_qa, boolq): context
  ``(query.strip() + delimiter).rstrip()``, continuation ``" " + choice.strip()``;
  ``acc`` = argmax summed log-likelihood, ``acc_norm`` = argmax of it divided by the
  continuation's UTF-8 byte length. Delimiter ``"\\nAnswer: "`` for piqa, arc_*, boolq and
  ``" "`` for copa, openbook_qa (llm-foundry's tasks_v0.3).
- WinoGrande (partial scoring): each option is the context, ``" " + continuation`` is
  scored; ``acc`` (= acc_norm, the continuation is shared).

A request longer than the model's positions keeps its last positions (the context is cut
from the left). What this module does not know: how logits are computed (a ``LogitsFn``,
see ``eval_text``), the model file, the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .eval_text import EvalDataError, LogitsFn
from .progress import progress
from .textdata import json_lines

# task name -> (file stem in the eval directory, kind, continuation delimiter)
TASKS: dict[str, tuple[str, str, str]] = {
    "lambada": ("lambada_openai", "lambada", ""),
    "piqa": ("piqa", "choice", "\nAnswer: "),
    "winogrande": ("winogrande", "winogrande", ""),
    "copa": ("copa", "choice", " "),
    "arc_easy": ("arc_easy", "choice", "\nAnswer: "),
    "arc_challenge": ("arc_challenge", "choice", "\nAnswer: "),
    "openbook_qa": ("openbook_qa", "choice", " "),
    "boolq": ("boolq", "choice", "\nAnswer: "),
}
ALIASES = {"lambada_openai": "lambada", "openbookqa": "openbook_qa", "arc-easy": "arc_easy",
           "arc-challenge": "arc_challenge"}
ZERO_SHOT = list(TASKS)


@dataclass(frozen=True)
class Request:
    """Score ``continuation`` given ``context`` (context starts with BOS)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Scored:
    loglik: float  # summed log-likelihood of the continuation, nats
    greedy: bool  # argmax decoding reproduces every continuation token
    tokens: int


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise EvalDataError(f"unknown task {name!r}; known: {', '.join(TASKS)}, wikitext2")
    return name


def task_file(eval_dir: str | Path, name: str) -> Path:
    """The task's .jsonl (or .jsonl.xz) in ``eval_dir``."""
    stem = TASKS[canonical(name)][0]
    for suffix in (".jsonl", ".jsonl.xz"):
        path = Path(eval_dir) / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise EvalDataError(f"{Path(eval_dir) / (stem + '.jsonl')}: no such file; --eval-dir "
                        "names the folder that holds the task files (lambada_openai.jsonl, "
                        "piqa.jsonl, ...: its README lists them)")


def read_rows(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    for lineno, row in json_lines(path):
        if limit is not None and len(rows) >= limit:
            break
        if not isinstance(row, dict):
            raise EvalDataError(f"{path}:{lineno}: expected a JSON object")
        rows.append(row)
    return rows


def _field(row: dict, key: str, kind: type, where: str):
    value = row.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise EvalDataError(f"{where}: field {key!r} missing or not {kind.__name__}")
    return value


def build_requests(name: str, rows: Sequence[dict], encode: Callable[[str], list[int]],
                   bos_id: int) -> tuple[list[list[Request]], list[dict]]:
    """Per row, the requests to score (one per choice; one for LAMBADA) and what the
    metrics need (gold index, byte lengths of the continuations)."""
    _stem, kind, delim = TASKS[canonical(name)]
    groups, info = [], []
    for i, row in enumerate(rows):
        where = f"{name} row {i + 1}"
        if kind == "lambada":
            ctx = _field(row, "context", str, where)
            cont = " " + _field(row, "continuation", str, where)
            groups.append([Request((bos_id, *encode(ctx)), tuple(encode(cont)))])
            info.append({})
            continue
        if kind == "winogrande":
            options = _field(row, "context_options", list, where)
            cont = " " + _field(row, "continuation", str, where).strip()
            pairs = [(str(opt).rstrip(), cont) for opt in options]
        else:
            query = _field(row, "query", str, where)
            choices = _field(row, "choices", list, where)
            ctx = (query.strip() + delim).rstrip()
            pairs = [(ctx, " " + str(c).strip()) for c in choices]
        gold = _field(row, "gold", int, where)
        if not 0 <= gold < len(pairs):
            raise EvalDataError(f"{where}: gold={gold} outside its {len(pairs)} choices")
        groups.append([Request((bos_id, *encode(c)), tuple(encode(x))) for c, x in pairs])
        info.append({"gold": gold, "bytes": [len(x.encode("utf-8")) for _, x in pairs]})
    return groups, info


@torch.no_grad()
def score_requests(logits_fn: LogitsFn, requests: Sequence[Request], *, max_len: int,
                   batch_size: int, device: torch.device | str, show_progress: bool = False,
                   desc: str = "score") -> list[Scored]:
    """Summed log-likelihood and greedy match of every request's continuation."""
    for r in requests:
        if not r.continuation or len(r.continuation) >= max_len:
            raise EvalDataError(f"a continuation of {len(r.continuation)} tokens cannot be "
                                f"scored in {max_len} positions")
    # Longest first: batches of similar length waste little padding.
    order = sorted(range(len(requests)),
                   key=lambda i: -(len(requests[i].context) + len(requests[i].continuation)))
    out: list[Scored | None] = [None] * len(requests)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for group in progress(batches, len(batches), desc, show_progress):
        seqs = []
        for i in group:
            r = requests[i]
            # Inputs are every token but the last; keep the last max_len of them.
            seqs.append(list(r.context + r.continuation)[:-1][-max_len:])
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
        logp = torch.log_softmax(logits_fn(ids.to(device)).float(), dim=-1)
        for row, i in enumerate(group):
            cont = requests[i].continuation
            n, end = len(cont), len(seqs[row])
            # Position p predicts token p+1: the continuation is predicted by the last n.
            lp = logp[row, end - n:end]
            target = torch.tensor(cont, device=lp.device)
            loglik = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            out[i] = Scored(loglik, greedy, n)
    return out  # type: ignore[return-value]


def row_correct(name: str, groups: list[list[Request]], info: list[dict],
                scores: list[Scored]) -> list[bool]:
    """Per row, whether ``acc`` counts it correct (paired comparisons of two runs)."""
    kind = TASKS[canonical(name)][1]
    it = iter(scores)
    per_row = [[next(it) for _ in g] for g in groups]
    if kind == "lambada":
        return [row[0].greedy for row in per_row]
    return [max(range(len(row)), key=lambda j, row=row: row[j].loglik) == meta["gold"]
            for row, meta in zip(per_row, info, strict=True)]


def task_metrics(name: str, groups: list[list[Request]], info: list[dict],
                 scores: list[Scored]) -> dict[str, float]:
    """Metrics of one task from the scores of its flattened requests (row order)."""
    kind = TASKS[canonical(name)][1]
    it = iter(scores)
    per_row = [[next(it) for _ in g] for g in groups]
    if kind == "lambada":
        lls = [row[0].loglik for row in per_row]
        return {"acc": sum(row[0].greedy for row in per_row) / len(per_row),
                "perplexity": math.exp(-sum(lls) / len(lls))}
    acc = acc_norm = 0
    for row, meta in zip(per_row, info, strict=True):
        ll = [s.loglik for s in row]
        norm = [x / b for x, b in zip(ll, meta["bytes"], strict=True)]
        acc += max(range(len(ll)), key=ll.__getitem__) == meta["gold"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == meta["gold"]
    return {"acc": acc / len(per_row), "acc_norm": acc_norm / len(per_row)}


def evaluate_task(name: str, logits_fn: LogitsFn, encode: Callable[[str], list[int]], *,
                  bos_id: int, eval_dir: str | Path, max_len: int, batch_size: int,
                  device: torch.device | str, limit: int | None = None,
                  show_progress: bool = False) -> dict:
    """One zero-shot task: {"task", "metrics", "n"}."""
    name = canonical(name)
    rows = read_rows(task_file(eval_dir, name), limit)
    if not rows:
        raise EvalDataError(f"{name}: no rows to score")
    groups, info = build_requests(name, rows, encode, bos_id)
    flat = [r for g in groups for r in g]
    scores = score_requests(logits_fn, flat, max_len=max_len, batch_size=batch_size,
                            device=device, show_progress=show_progress, desc=name)
    return {"task": name, "metrics": task_metrics(name, groups, info, scores), "n": len(rows)}
