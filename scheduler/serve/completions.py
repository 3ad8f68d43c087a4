"""POST /v1/completions: text or token-id prompts, single or batched, streamed or not.

``echo`` with ``logprobs`` returns the prompt's tokens with their log-probabilities given
the prefix, aligned to positions, as lm-evaluation-harness's ``local-completions`` reads
them: ``choices[i].logprobs.token_logprobs[t]`` is log p(prompt[t] | prompt[:t]), null for
t = 0, followed by the generated tokens; ``top_logprobs[t]`` holds the ``logprobs`` most
likely tokens at t (text -> logprob). Token-id prompts are used verbatim (no BOS added);
text prompts are tokenized with BOS in front, as OPT was trained.

``max_tokens: 0`` scores without generating: the engine still samples one token (a prefill
always ends in a sample) and it is left out of the response.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from .context import Context, Offsets
from .errors import ApiError, choice_error
from .jobs import Choice
from .schema import CompletionRequest

Generated = tuple[int, float | None, list[tuple[int, float]]]  # token, logprob, top


async def prompts_of(ctx: Context, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [await ctx.encode(p)]
    if not p:
        return [[]]  # an empty token list: check_prompt names it
    if isinstance(p[0], int):
        return [list(p)]
    if isinstance(p[0], str):
        return [await ctx.encode(s) for s in p]
    return [list(ids) for ids in p]


async def plan(ctx: Context, req: CompletionRequest,
               request_id: str) -> tuple[list[Choice], int]:
    """Validate against the model and build the engine requests; returns (choices,
    max_tokens as asked)."""
    ctx.check_model(req.model)
    prompts = await prompts_of(ctx, req)
    if len(prompts) * req.n > 64:
        raise ApiError(400, f"{len(prompts)} prompts x n={req.n} = {len(prompts) * req.n} "
                       "choices; at most 64 per request", param="n")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    engine_tokens = max(1, max_tokens)
    for ids in prompts:
        ctx.check_prompt(ids, engine_tokens)
    top_k = req.top_k or 0
    params = ctx.sampling(
        max_new_tokens=engine_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if top_k < 0 else top_k,
        seed=req.seed, stop=req.stop_strings(), ignore_eos=req.ignore_eos,
        **req.penalties(),
        logprobs=req.logprobs,
        prompt_logprobs=req.echo and req.logprobs is not None,
    )
    return ctx.choices(prompts, req.n, params, request_id), max_tokens


def _logprobs_block(ctx: Context, choice: Choice, *, echo: bool, generated: list[Generated],
                    where: Offsets) -> dict[str, Any]:
    """Log-probabilities of the prompt (when echoed) and of `generated` tokens; `where`
    carries text offsets across calls (streaming)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    if echo:
        for t, token in enumerate(choice.prompt):
            tokens.append(ctx.token_text(token))
            offsets.append(where.push(token))
            if t == 0:  # nothing predicts the first token
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                token_logprobs.append(_get(choice.prompt_logprobs, t - 1))
                top_logprobs.append(ctx.top_dict(_get(choice.prompt_top, t - 1) or []))
    for token, logprob, top in generated:
        tokens.append(ctx.token_text(token))
        offsets.append(where.push(token))
        token_logprobs.append(logprob)
        top_logprobs.append(ctx.top_dict(top))
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}


def _get(values: list, i: int):
    return values[i] if i < len(values) else None


def _usage(prompts: list[list[int]], completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _distinct_prompts(choices: list[Choice], n: int) -> list[list[int]]:
    return [c.prompt for c in choices[::n]]


def response(ctx: Context, req: CompletionRequest, request_id: str, choices: list[Choice],
             max_tokens: int) -> dict[str, Any]:
    out = []
    generated = 0
    for choice in choices:
        keep = len(choice.tokens) if max_tokens > 0 else 0
        generated += keep
        prefix = ctx.tokenizer.decode(choice.prompt) if req.echo else ""
        text = prefix + (choice.text if max_tokens > 0 else "")
        logprobs = None
        if req.logprobs is not None:
            generated_tokens = list(zip(choice.tokens, choice.logprobs, choice.top,
                                        strict=True))[:keep]
            logprobs = _logprobs_block(ctx, choice, echo=req.echo, generated=generated_tokens,
                                       where=Offsets(ctx.tokenizer))
        out.append({"index": choice.index, "text": text, "logprobs": logprobs,
                    "finish_reason": choice.finish_reason if max_tokens > 0 else "length"})
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": ctx.model_name, "choices": out,
            "usage": _usage(_distinct_prompts(choices, req.n), generated)}


async def stream(ctx: Context, req: CompletionRequest, request_id: str, choices: list[Choice],
                 max_tokens: int) -> AsyncIterator[str]:
    """Server-sent events: one chunk per event that carries text or a token. An echoed
    prompt (and its log-probabilities, complete by then) comes with the first token."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    created = int(time.time())
    keep = max_tokens > 0
    where: dict[int, Offsets] = {}  # per choice, once its first chunk is out
    generated = 0
    async for choice, event in ctx.runner.merged(choices, "completions"):
        if event.finished and event.finish_reason == "error":
            yield sse(choice_error(choice.index, event.error))
            continue
        if event.token is None and not event.finished:
            continue  # a prompt chunk was scored: nothing to send yet
        first = choice.index not in where
        offsets = where.setdefault(choice.index, Offsets(ctx.tokenizer))
        echo = first and req.echo
        text = ctx.tokenizer.decode(choice.prompt) if echo else ""
        # From the event, not from `choice`: the choice may already hold later tokens.
        new = [(event.token, event.logprob, event.top or [])] if (
            keep and event.token is not None) else []
        generated += len(new)
        if keep:
            text += event.text
        logprobs = None
        if req.logprobs is not None:
            logprobs = _logprobs_block(ctx, choice, echo=echo, generated=new, where=offsets)
        reason = (event.finish_reason if keep else "length") if event.finished else None
        body = {"id": request_id, "object": "text_completion", "created": created,
                "model": ctx.model_name,
                "choices": [{"index": choice.index, "text": text, "logprobs": logprobs,
                             "finish_reason": reason}]}
        if include_usage:
            body["usage"] = None
        yield sse(body)
    if include_usage:
        yield sse({"id": request_id, "object": "text_completion", "created": created,
                   "model": ctx.model_name, "choices": [],
                   "usage": _usage(_distinct_prompts(choices, req.n), generated)})
    yield "data: [DONE]\n\n"


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
