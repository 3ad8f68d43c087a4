"""POST /v1/chat/completions: the chat rendered with the base-OPT template, then generated
like a completion; streamed as ``chat.completion.chunk`` server-sent events.

The template's next-turn marker is always a stop string (see chat_template.py). The reply's
leading whitespace (the model continues "Assistant:" with a space) is not part of the
message.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from .chat_template import STOP, render_chat
from .completions import sse
from .context import Context
from .errors import choice_error
from .jobs import Choice
from .schema import ChatRequest


async def plan(ctx: Context, req: ChatRequest, request_id: str) -> list[Choice]:
    ctx.check_model(req.model)
    prompt = await ctx.encode(render_chat(req.messages), field="messages")
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    # Unset: a bounded default, or what the model's positions leave if that is less (a
    # client that forgets max_tokens must not hold a slot for the whole context).
    max_tokens = asked if asked is not None else max(
        1, min(ctx.limits.chat_max_tokens, ctx.max_len - len(prompt)))
    ctx.check_prompt(prompt, max_tokens, field="messages", tokens_field=field)
    top_k = req.top_k or 0
    top = req.top_logprobs if req.top_logprobs is not None else 0
    params = ctx.sampling(
        max_new_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if top_k < 0 else top_k,
        seed=req.seed, stop=tuple(dict.fromkeys(req.stop_strings() + STOP)),
        ignore_eos=req.ignore_eos, **req.penalties(), logprobs=top if req.logprobs else None,
    )
    return ctx.choices([prompt], req.n, params, request_id)


def _content_logprobs(ctx: Context, generated) -> list[dict[str, Any]]:
    """[(token, logprob, top)] as OpenAI's chat ``logprobs.content``."""
    def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        return {"token": ctx.token_text(token_id), "logprob": logprob,
                "bytes": ctx.token_bytes(token_id)}

    out = []
    for token, logprob, top in generated:
        item = entry(token, logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in top]
        out.append(item)
    return out


def _usage(choices: list[Choice]) -> dict[str, int]:
    prompt = len(choices[0].prompt)
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def response(ctx: Context, req: ChatRequest, request_id: str,
             choices: list[Choice]) -> dict[str, Any]:
    out = []
    for c in choices:
        logprobs = None
        if req.logprobs:
            logprobs = {"content": _content_logprobs(
                ctx, zip(c.tokens, c.logprobs, c.top, strict=True))}
        out.append({"index": c.index, "finish_reason": c.finish_reason, "logprobs": logprobs,
                    "message": {"role": "assistant", "content": c.text.lstrip()}})
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": ctx.model_name, "choices": out, "usage": _usage(choices)}


async def stream(ctx: Context, req: ChatRequest, request_id: str,
                 choices: list[Choice]) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    created = int(time.time())

    def chunk(index: int, delta: dict, finish_reason: str | None, logprobs=None) -> str:
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": ctx.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    for c in choices:  # the role comes first, as OpenAI sends it
        yield chunk(c.index, {"role": "assistant", "content": ""}, None)
    started: set[int] = set()  # choices whose non-blank content has begun
    async for choice, event in ctx.runner.merged(choices, "chat"):
        if event.finished and event.finish_reason == "error":
            yield sse(choice_error(choice.index, event.error))
            continue
        if event.token is None and not event.finished:
            continue
        text = event.text
        if choice.index not in started:
            text = text.lstrip()
            if text:
                started.add(choice.index)
        logprobs = None
        if req.logprobs and event.token is not None:
            # From the event: `choice` may already hold later tokens.
            logprobs = {"content": _content_logprobs(
                ctx, [(event.token, event.logprob, event.top or [])])}
        reason = event.finish_reason if event.finished else None
        if not text and reason is None and logprobs is None:
            continue
        yield chunk(choice.index, {"content": text} if text else {}, reason, logprobs)
    if include_usage:
        yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                   "model": ctx.model_name, "choices": [], "usage": _usage(choices)})
    yield "data: [DONE]\n\n"
