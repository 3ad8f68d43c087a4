"""Train the small default OPT-architecture model on one GPU (or, tiny, on CPU for tests).

The model is ``runtime.model.OPTModel`` itself (pre-LN, ReLU, learned positions, tied LM
head), initialised by ``init_weights`` from a seeded generator and written with
``checkpoint.save_model``, so transformers' OPTForCausalLM and our loader read the result.
Training: bf16 autocast on CUDA, optional ``torch.compile``, fused AdamW, linear warmup
then cosine decay, gradient clipping, seeded random windows (``train_data``).

``--time-budget S`` measures the step time over the first steps (after compilation) and
then fixes the total number of steps so that training, saving and evaluation end within S
seconds of the process start. The schedule's warmup is a fixed step count longer than the
measurement, so the steps taken before the decision do not depend on it, and rerunning with
``--steps N`` (the printed N) replays the same run: same init, same windows, same learning
rates. (GPU kernels such as attention backward may still differ in the last bits.)

After training: held-out bits per byte and perplexity (``eval_text``, sliding window),
WikiText-2, and MLP activation sparsity (``mlp_stats``), all on the saved float16
checkpoint as ``load_model`` reads it; everything lands in ``metrics.json`` beside it.

What this module does not know: serving, sparsity predictors, zero-shot tasks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ..runtime.model import Batch, OPTModel, full_positions
from ..runtime.opt_config import OPTConfig
from .head_training import HeadPolicy, attach, detach

_T0 = time.perf_counter()  # process start (near enough), for --time-budget
BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s, the vendors' figures


@dataclass
class TrainConfig:
    corpus: str
    tokenizer: str
    out: str
    layers: int = 7
    hidden: int = 512
    heads: int = 8
    ffn: int = 2048  # 4 x hidden, OPT's ratio (sparsity is studied on it)
    positions: int = 1024
    seq_len: int = 1024
    batch_size: int = 256  # sequences per optimiser step
    micro_batch: int = 64
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    steps: int | None = None
    time_budget: float | None = None  # seconds from process start to the end of evaluation
    reserve: float = 75.0  # seconds kept for saving and evaluation under --time-budget
    measure_from: int = 10
    measure_to: int = 40
    compile: bool = True
    device: str = "cuda"
    max_corpus_bytes: int | None = None
    unwrap_fraction: float = 0.5  # share of books with paragraphs on one line (train_data)
    log_every: int = 25
    val_every: int = 200
    heldout: str | None = None
    wikitext: str | None = None
    eval_window: int = 1024
    eval_stride: int = 512
    eval_batch: int = 32
    stats_tokens: int = 2_000_000
    eval_dir: str | None = None  # zero-shot tasks (tools/eval_tasks) after training
    zero_shot_limit: int | None = None
    # Training that makes heads selectable (tools/head_training.py); the saved model is OPT.
    head_policy: str = "none"  # "none" | "drop" (random heads) | "gate" (learned, top-k)
    head_fraction: float = 0.5  # share of a chosen token's heads skipped
    head_tokens: float = 0.5  # share of tokens the policy applies to
    head_rescale: bool = False  # drop: kept heads x H / kept

    def head_policy_config(self) -> HeadPolicy:
        return HeadPolicy(self.head_policy, self.head_fraction, self.head_tokens,
                          self.head_rescale)

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batch:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of "
                             f"micro_batch={self.micro_batch}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}")
        self.head_policy_config()  # validates the head-policy fields
        if self.seq_len > self.positions:
            raise ValueError(f"seq_len={self.seq_len} exceeds positions={self.positions}")
        if (self.steps is None) == (self.time_budget is None):
            raise ValueError("give exactly one of --steps and --time-budget")
        if self.time_budget is not None and self.warmup <= self.measure_to:
            raise ValueError(f"warmup={self.warmup} must exceed measure_to={self.measure_to} "
                             "so the step count chosen later does not change earlier steps")


# `dejavu-run train-model --help`: one line per TrainConfig field (parse_args fails on a
# field without one). The "[default: ...]" of a field with a value is appended there.
HELP = {
    "corpus": "training text: .txt (one document), .jsonl or .jsonl.xz (a document per "
              'line, its "text" field)',
    "tokenizer": "tokenizer.json of the tokenizers library; copied beside the checkpoint",
    "out": "directory for the float16 checkpoint, tokenizer.json and metrics.json",
    "layers": "decoder layers",
    "hidden": "hidden size (also the embedding size)",
    "heads": "attention heads per layer (--hidden must be a multiple)",
    "ffn": "MLP inner size (OPT's ratio: 4 x --hidden)",
    "positions": "learned positions: the model's longest sequence",
    "seq-len": "tokens per training window (at most --positions)",
    "batch-size": "sequences per optimiser step (a multiple of --micro-batch)",
    "micro-batch": "sequences per forward and backward pass; gradients accumulate up to "
                   "--batch-size",
    "lr": "peak learning rate (AdamW)",
    "min-lr-ratio": "the cosine decay ends at this x --lr",
    "warmup": "steps of linear warmup (with --time-budget: more than --measure-to)",
    "weight-decay": "AdamW weight decay of weight matrices and embeddings (not of biases "
                    "or layer-norm gains)",
    "beta2": "AdamW beta2 (beta1 is 0.9)",
    "grad-clip": "clip the gradients' global norm to this",
    "seed": "seeds the initial weights, the training windows, the documents unwrapped and "
            "the head policy's draws",
    "steps": "optimiser steps (give this or --time-budget)",
    "time-budget": "seconds from the process start to the end of evaluation: the step time "
                   "over steps --measure-from..--measure-to fixes the step count, printed "
                   "for --steps to replay the run",
    "reserve": "--time-budget: seconds kept for saving and evaluation",
    "measure-from": "--time-budget: first step of the step-time measurement (after "
                    "compilation)",
    "measure-to": "--time-budget: the step at which the step count is fixed",
    "compile": "torch.compile the forward pass and loss (a failed compilation falls back "
               "to eager)",
    "device": "cuda | cpu (cpu: tiny models, for tests); bfloat16 autocast on cuda",
    "max-corpus-bytes": "stop reading the corpus once this many bytes of text were read "
                        "(whole documents; a .txt file is read whole) [default: all]",
    "unwrap-fraction": "share of documents whose hard-wrapped lines are joined into "
                       "paragraphs on one line",
    "log-every": "print a log line every N steps",
    "val-every": "loss on a fixed --heldout batch at logged steps (--log-every) that are "
                 "multiples of N, and at the last",
    "heldout": "held-out text (.txt, .jsonl, .jsonl.xz): validation loss while training; "
               "bits per byte, perplexity and MLP activation statistics after",
    "wikitext": "WikiText-2 raw test file, scored after training",
    "eval-window": "tokens per window when scoring text after training",
    "eval-stride": "new tokens scored per window after training",
    "eval-batch": "sequences per forward pass when evaluating",
    "stats-tokens": "held-out tokens for the MLP activation statistics",
    "eval-dir": "folder of the zero-shot task files; given, the tasks run after training",
    "zero-shot-limit": "first N rows of each zero-shot task [default: all]",
    "head-policy": "none | drop (random heads) | gate (learned, top-k): training that makes "
                   "heads skippable; the saved model is plain OPT",
    "head-fraction": "share of a chosen token's heads skipped by --head-policy",
    "head-tokens": "share of tokens --head-policy applies to (the rest keep every head)",
    "head-rescale": "--head-policy drop: scale the kept heads by heads / kept",
}


def model_config(cfg: TrainConfig, vocab_size: int) -> OPTConfig:
    return OPTConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                     ffn_dim=cfg.ffn, num_attention_heads=cfg.heads,
                     max_position_embeddings=cfg.positions, word_embed_proj_dim=cfg.hidden,
                     torch_dtype="float16")


def flops_per_token(config: OPTConfig, seq_len: int) -> tuple[int, int]:
    """(matmul parameters N, training FLOPs per token = 6N + 12 L T C) with PaLM's
    convention: every weight matmul including the tied LM head, attention scores and
    values counted at full (non-causal) T."""
    c, f, L = config.hidden_size, config.ffn_dim, config.num_hidden_layers
    n = L * (4 * c * c + 2 * c * f) + config.vocab_size * config.word_embed_proj_dim
    return n, 6 * n + 12 * L * seq_len * c


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over cfg.warmup steps, then cosine down to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: OPTModel, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    # Decay matrices (weights, embeddings); not biases or layer-norm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=fused)


def train_loss(model: OPTModel, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(ids, Batch(full_positions(ids.shape[0], ids.shape[1], ids.device)))
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def train(cfg: TrainConfig, t0: float | None = None,
          corpus: tuple | None = None) -> dict:
    """Train, save and evaluate. ``t0`` is when the time budget started (perf_counter;
    default: now; the command line passes the process start). ``corpus``: the (stream,
    summary) of ``tokenize_corpus`` for this config, when the caller tokenised it already
    (several runs over one corpus)."""
    from ..runtime.checkpoint import save_model
    from .train_data import WindowSampler, tokenize_corpus

    t0 = time.perf_counter() if t0 is None else t0
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    torch.set_float32_matmul_precision("high")
    tokenizer = Tokenizer.from_file(cfg.tokenizer)
    eos = tokenizer.token_to_id("</s>")
    stream, data = corpus or tokenize_corpus(cfg.corpus, tokenizer, separator_id=eos,
                                             max_bytes=cfg.max_corpus_bytes,
                                             unwrap_fraction=cfg.unwrap_fraction,
                                             seed=cfg.seed + 2)
    log(f"corpus: {data}")
    sampler = WindowSampler(stream, cfg.seq_len, seed=cfg.seed + 1, device=device)

    config = model_config(cfg, tokenizer.get_vocab_size())
    model = OPTModel(config)
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul, fpt = flops_per_token(config, cfg.seq_len)
    log(f"model: {n_params:,} parameters ({n_matmul:,} in matmuls), {fpt / 1e6:.1f} MFLOP/token")
    policy = cfg.head_policy_config()
    torch.manual_seed(cfg.seed + 3)  # the head policy's random draws
    attach(model, policy)  # before the optimiser: a gate's weights train too
    model.to(device)
    if policy.active:
        log(f"head policy: {policy} ({policy.kept(cfg.heads)} of {cfg.heads} heads kept)")
    opt = make_optimizer(model, cfg, fused=cuda)
    loss_fn = torch.compile(train_loss) if cfg.compile else train_loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    accum = cfg.batch_size // cfg.micro_batch
    tokens_per_step = cfg.batch_size * cfg.seq_len
    val_ids, val_labels = _validation_batch(cfg, tokenizer, eos, device)

    total = cfg.steps
    t_start = time.perf_counter()
    history: list[dict] = []
    t_measure = t_train = None
    step = 0
    while total is None or step < total:
        if step == cfg.measure_from:
            if cuda:
                torch.cuda.synchronize()
            t_measure = time.perf_counter()
        lr = lr_at(step, total or cfg.warmup + 1, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        rng_state = sampler.generator.get_state()
        try:
            loss_sum = _accumulate(model, loss_fn, sampler, cfg, accum, autocast, device)
        except Exception as exc:  # compilation failed: say so and fall back to eager
            if step != 0 or loss_fn is train_loss:
                raise
            log(f"torch.compile failed ({type(exc).__name__}: {exc}); continuing eagerly")
            opt.zero_grad(set_to_none=True)
            sampler.generator.set_state(rng_state)  # same windows as a compiled run
            loss_fn = train_loss
            loss_sum = _accumulate(model, loss_fn, sampler, cfg, accum, autocast, device)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == 1:
            t_train = time.perf_counter()  # compilation happened in step 1
        if total is None and step == cfg.measure_to:
            total = _fix_steps(cfg, step, t_measure, cuda, t0)
        if (cfg.time_budget is not None and total is not None and step < total
                and time.perf_counter() - t0 > cfg.time_budget - cfg.reserve / 2):
            # A safety net only (steps slowed down after the measurement): the run is then
            # no longer the one --steps reproduces, and the log says so.
            log(f"deadline: stopping early at step {step} of {total}")
            total = step
        if step % cfg.log_every == 0 or step == total or step == 1:
            entry = {"step": step, "loss": float(loss_sum) / accum, "lr": lr,
                     "grad_norm": float(norm), "elapsed": time.perf_counter() - _T0}
            if step % cfg.val_every == 0 or step == total:
                entry["val_loss"] = _val_loss(model, val_ids, val_labels, autocast)
            history.append(entry)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in entry.items()))
    if cuda:
        torch.cuda.synchronize()
    t_end = time.perf_counter()
    steady = (total - 1) * tokens_per_step / (t_end - t_train) if total > 1 else float("nan")
    peak = next((v for k, v in BF16_PEAK.items() if cuda and k in torch.cuda.get_device_name()),
                None)
    perf = {"tokens_per_second": steady, "flops_per_token": fpt,
            "mfu": steady * fpt / peak if peak else None,
            "train_seconds": t_end - t_train + 0.0,
            "first_step_seconds": t_train - t_start,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "peak_flops": peak}
    log(f"trained {total} steps, {total * tokens_per_step:,} tokens, "
        f"{steady:,.0f} tokens/s after step 1, MFU {perf['mfu']}")

    out = Path(cfg.out)
    detach(model)  # exactly OPT's modules again: the checkpoint holds no gate
    save_model(model, out, dtype=torch.float16)
    shutil.copyfile(cfg.tokenizer, out / "tokenizer.json")
    metrics = {
        "config": asdict(cfg), "steps": total, "tokens_seen": total * tokens_per_step,
        "tokens_per_step": tokens_per_step, "parameters": n_params, "data": data,
        "final_loss": history[-1]["loss"], "final_val_loss": history[-1].get("val_loss"),
        "performance": perf, "history": history,
        "torch": torch.__version__,
    }
    path = out / "metrics.json"
    # Written before and after evaluation: a failed evaluation must not lose the run.
    path.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    try:
        metrics["eval"] = evaluate_checkpoint(out, tokenizer, cfg)
    except Exception as exc:  # report, keep the trained checkpoint
        log(f"evaluation failed: {type(exc).__name__}: {exc}")
        metrics["eval"] = {"error": f"{type(exc).__name__}: {exc}", "summary": {}}
    path.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    log(f"done: {json.dumps(metrics['eval'].get('summary', {}))}")
    return metrics


def _accumulate(model, loss_fn, sampler, cfg: TrainConfig, accum: int, autocast, device):
    """Forward and backward over ``accum`` micro-batches; returns the summed loss."""
    loss_sum = torch.zeros((), device=device)
    for _ in range(accum):
        ids, labels = sampler.sample(cfg.micro_batch)
        with autocast:
            loss = loss_fn(model, ids, labels)
        (loss / accum).backward()
        loss_sum += loss.detach()
    return loss_sum


def _fix_steps(cfg: TrainConfig, step: int, t_measure: float | None, cuda: bool,
               t0: float) -> int:
    if cuda:
        torch.cuda.synchronize()
    now = time.perf_counter()
    per_step = (now - t_measure) / (step - cfg.measure_from)
    left = cfg.time_budget - (now - t0) - cfg.reserve
    total = step + max(0, int(left / per_step))
    total = max(total, cfg.warmup + 1)
    log(f"time budget: {per_step:.3f} s/step measured over steps {cfg.measure_from}-{step}; "
        f"total steps fixed at {total} (reproduce with --steps {total})")
    return total


def _validation_batch(cfg: TrainConfig, tokenizer: Tokenizer, eos: int, device):
    """A fixed held-out batch (8 windows) for a cheap loss curve during training."""
    if not cfg.heldout:
        return None, None
    from .train_data import tokenize_corpus

    stream, _ = tokenize_corpus(cfg.heldout, tokenizer, separator_id=eos, max_bytes=400_000)
    n = min(8, (stream.size - 1) // cfg.seq_len)
    if n == 0:
        return None, None
    t = torch.from_numpy(stream[: n * cfg.seq_len + 1].astype("int64"))
    ids = t[:-1].view(n, cfg.seq_len)
    labels = t[1:].view(n, cfg.seq_len)
    return ids.to(device), labels.to(device)


@torch.no_grad()
def _val_loss(model, ids, labels, autocast) -> float | None:
    if ids is None:
        return None
    model.eval()
    with autocast:
        loss = float(train_loss(model, ids, labels))
    model.train()
    return loss


def evaluate_checkpoint(model_dir: Path, tokenizer: Tokenizer, cfg: TrainConfig) -> dict:
    """Held-out bits per byte, WikiText-2 and MLP activation statistics of the saved
    float16 checkpoint (read back through the project's loader)."""
    from ..runtime.checkpoint import load_model
    from .eval_text import (
        TextScore,
        dense_logits_fn,
        read_documents,
        score_token_ids,
        wikitext_documents,
    )
    from .mlp_stats import firing_counts, stream_windows, summarize

    device = torch.device(cfg.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = load_model(model_dir, dtype=dtype, device=device).eval()
    bos = tokenizer.token_to_id("</s>")

    def encode_all(texts: list[str]) -> list[list[int]]:
        # All cores at once: the held-out set is ~2M tokens.
        return [[bos, *e.ids] for e in tokenizer.encode_batch_fast(texts,
                                                                  add_special_tokens=False)]

    result: dict = {"window": cfg.eval_window, "stride": cfg.eval_stride,
                    "dtype": str(dtype).removeprefix("torch."), "summary": {}}
    logits_fn = dense_logits_fn(model)
    heldout_ids = None
    for name, path in (("heldout", cfg.heldout), ("wikitext2", cfg.wikitext)):
        if not path:
            continue
        t = time.perf_counter()
        texts = wikitext_documents(path) if name == "wikitext2" else read_documents(path)
        ids = encode_all(texts)
        if name == "heldout":
            heldout_ids = ids
        nll, tokens = score_token_ids(logits_fn, ids, window=cfg.eval_window,
                                      stride=cfg.eval_stride, batch_size=cfg.eval_batch,
                                      device=device)
        score = TextScore(nll=nll, tokens=tokens,
                          bytes=sum(len(x.encode("utf-8")) for x in texts))
        result[name] = {**score.metrics(), "seconds": time.perf_counter() - t, "file": path}
        result["summary"][f"{name}_bpb"] = round(score.bits_per_byte, 4)
        result["summary"][f"{name}_ppl"] = round(score.perplexity, 3)
        log(f"{name}: {score.metrics()}")
    if heldout_ids is not None:
        t = time.perf_counter()
        windows = stream_windows(heldout_ids, cfg.eval_window, cfg.stats_tokens)
        counts, tokens = firing_counts(model, windows, batch_size=cfg.eval_batch)
        layers = summarize(counts, tokens)
        result["mlp_activation"] = {
            "tokens": tokens, "seconds": time.perf_counter() - t, "layers": layers,
            "firing_frequency": [[round(f, 6) for f in row]
                                 for row in (counts.double() / tokens).tolist()]}
        result["summary"]["mlp_zero_fraction"] = [round(r["zero_fraction"], 4) for r in layers]
        result["summary"]["top10_share"] = [round(r["top10_share"], 4) for r in layers]
        log(f"mlp activation: {result['summary']}")
    if cfg.eval_dir:
        from ..runtime.tokenizer import load_tokenizer
        from .eval import EvalOptions, evaluate, markdown_table

        t = time.perf_counter()
        opts = EvalOptions(tasks=["zero-shot"], eval_dir=cfg.eval_dir,
                           limit=cfg.zero_shot_limit, batch_size=cfg.eval_batch,
                           show_progress=False)
        try:  # a task that fails must not take the metrics above with it
            zero_shot = evaluate(model, load_tokenizer(model_dir), opts, logits_fn=logits_fn)
        except Exception as exc:
            log(f"zero-shot failed: {type(exc).__name__}: {exc}")
            result["zero_shot_error"] = f"{type(exc).__name__}: {exc}"
        else:
            result["zero_shot"] = zero_shot
            result["zero_shot_seconds"] = time.perf_counter() - t
            log("zero-shot:\n" + markdown_table(zero_shot))
    return result


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    import argparse

    p = argparse.ArgumentParser(prog="dejavu-run train-model",
                                description=__doc__.splitlines()[0])
    defaults = TrainConfig.__dataclass_fields__
    for name, f in defaults.items():
        option = name.replace("_", "-")
        flag, help_text = "--" + option, HELP[option]
        if f.type == "bool" or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f"{help_text} [default: {'on' if f.default else 'off'}]")
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(
            str(f.type), str)
        required = f.default is dataclasses.MISSING
        if not required and f.default is not None:
            help_text += f" [default: {f.default}]"
        p.add_argument(flag, type=kind, required=required,
                       default=None if required else f.default, help=help_text)
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv), t0=_T0)


if __name__ == "__main__":
    main()
