"""The FastAPI application: routes, the API-key and body-size gate, and error handlers that
turn every failure into an OpenAI error object.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health
(503 while the engine or a worker is dead), GET /metrics (Prometheus text).

What this module does not know: how the engine runs (in-process or a pipeline of workers:
it only sees an ``EngineClient``) or how the server is started (server.py).
"""

from __future__ import annotations

import asyncio
import functools
import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ... import __version__
from . import chat_completions, completions
from .context import Context
from .errors import ApiError, error_body, short
from .schema import ChatRequest, CompletionRequest

OPEN_PATHS = {"/health"}  # reachable without the API key


class Gate:
    """ASGI middleware in front of everything: the API key (constant-time comparison) and
    the request-body limit, enforced on the declared length and on the bytes that arrive
    (a chunked body has no length to trust)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics) -> None:
        self.app, self.api_key, self.limit, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.api_key.encode()):
                self.metrics.failures.inc(1, "unauthorized")
                return await ApiError(401, "missing or wrong API key: send 'Authorization: "
                                      "Bearer <key>'", code="invalid_api_key"
                                      ).response()(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and not declared.isdigit():
            return await ApiError(400, f"invalid Content-Length header {short(declared)}"
                                  ).response()(scope, receive, send)
        if declared is not None and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, "too large")
            return message

        await self.app(scope, limited, send)

    async def _too_large(self, scope, receive, send) -> None:
        self.metrics.failures.inc(1, "body_too_large")
        error = ApiError(413, f"request body is larger than {self.limit} bytes",
                         code="body_too_large")
        await error.response()(scope, receive, send)


def create_app(ctx: Context, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="dejavu-run", version=__version__,
                  description="OpenAI-compatible API of the dejavu-run engine")
    app.state.ctx = ctx
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=ctx.limits.max_body_bytes,
                       metrics=ctx.metrics)
    _handlers(app, ctx)

    @app.get("/health")
    async def health() -> JSONResponse:
        h = ctx.health()
        body = {"status": "ok" if h.ok else "dead", "detail": h.detail, "workers": h.workers}
        return JSONResponse(body, status_code=200 if h.ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        h = ctx.health()
        ctx.metrics.observe_engine(h.ok, h.workers, ctx.client.stats())
        ctx.metrics.observe_connections(ctx.guard.stats())
        return PlainTextResponse(ctx.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": ctx.model_name, "object": "model", "created": ctx.created,
             "owned_by": "dejavu-run", "max_model_len": ctx.max_len}]}

    @app.post("/v1/completions")
    @_guard(ctx)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        request_id = ctx.new_id("cmpl")
        choices, max_tokens = await completions.plan(ctx, body, request_id)
        if body.stream:
            events = completions.stream(ctx, body, request_id, choices, max_tokens)
            return _streaming(ctx, events, len(choices))
        await _run(ctx, request, choices, "completions")
        return JSONResponse(completions.response(ctx, body, request_id, choices, max_tokens))

    @app.post("/v1/chat/completions")
    @_guard(ctx)
    async def create_chat_completion(body: ChatRequest, request: Request) -> Response:
        request_id = ctx.new_id("chatcmpl")
        choices = await chat_completions.plan(ctx, body, request_id)
        if body.stream:
            events = chat_completions.stream(ctx, body, request_id, choices)
            return _streaming(ctx, events, len(choices))
        await _run(ctx, request, choices, "chat")
        return JSONResponse(chat_completions.response(ctx, body, request_id, choices))

    return app


def _guard(ctx: Context):
    """An unexpected exception in an endpoint becomes a 500 error object here, answered like
    any other error (Starlette's last-resort handler answers too, but then re-raises and the
    server drops the connection)."""

    def wrap(endpoint):
        @functools.wraps(endpoint)
        async def guarded(*args, **kwargs):
            try:
                return await endpoint(*args, **kwargs)
            except (ApiError, HTTPException, RequestValidationError):
                raise
            except Exception as exc:
                ctx.metrics.failures.inc(1, "internal")
                raise ApiError(500, f"internal error: {type(exc).__name__}: "
                               f"{short(str(exc), 200)}", code="internal_error") from exc

        return guarded

    return wrap


async def _run(ctx: Context, request: Request, choices, endpoint: str) -> None:
    """Generate every choice, unless the client goes away first: then cancel (the engine
    aborts the requests) and answer nobody."""
    ctx.runner.admit(len(choices))
    try:
        work = asyncio.ensure_future(ctx.runner.collect(choices, endpoint))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
            gone.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
        if not work.cancelled():
            work.result()  # raises the ApiError, if any
        else:
            raise ApiError(499, "client closed the request", code="client_closed")
        failed = next((c for c in choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, f"request failed in the engine: {failed.error}",
                           code="engine_error")
    finally:
        ctx.runner.release(len(choices))


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _streaming(ctx: Context, events, count: int) -> StreamingResponse:
    ctx.runner.admit(count)

    async def body():
        try:
            async for chunk in events:
                yield chunk
        except ApiError as exc:  # headers are out: report in-band, then end the stream
            yield completions.sse(exc.body())
            yield "data: [DONE]\n\n"
        except Exception as exc:  # a bug or an unexpected engine error: still in-band
            ctx.metrics.failures.inc(1, "internal")
            yield completions.sse(error_body(500, f"internal error: {type(exc).__name__}: "
                                                  f"{short(str(exc), 200)}"))
            yield "data: [DONE]\n\n"
        finally:
            ctx.runner.release(count)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _handlers(app: FastAPI, ctx: Context) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        if exc.status == 400:
            ctx.metrics.failures.inc(1, "invalid")
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        ctx.metrics.failures.inc(1, "invalid")
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 413:
            ctx.metrics.failures.inc(1, "body_too_large")
            return ApiError(413, f"request body is larger than {ctx.limits.max_body_bytes} "
                            "bytes", code="body_too_large").response()
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 400:
            message = "request body is not valid JSON"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        ctx.metrics.failures.inc(1, "internal")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: "
                                       f"{short(str(exc), 200)}"), status_code=500)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """Pydantic's first complaint as one line naming the field (``param`` is the top-level
    field; the message has the full path)."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    # A value that fits no member of a union gets one error per member: the member that
    # got furthest into the value (the longest path) says the most, and among those a
    # complaint about the value beats "wrong type".
    first = max(errors, key=lambda e: (len(e.get("loc", ())),
                                       not str(e.get("type", "")).endswith("_type")))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {first.get('msg', '')}")
    if not loc and first.get("type") == "missing":
        return ApiError(400, "request body is missing: send a JSON object")
    # Union members show up in the path as type names ("list[constrained-int]"): drop them.
    path = [p for p in loc if not any(ch in p for ch in "[]-") and p not in _TYPE_TAGS]
    if not path:
        return ApiError(400, "request body must be a JSON object with the request's fields: "
                        f"{first.get('msg', '')}")
    param = path[0]
    where = ".".join(path)
    message = f"{where}: {first.get('msg', 'invalid value')}"
    if first.get("type") not in ("missing", "extra_forbidden") and "input" in first:
        message += f" (got {short(first['input'])})"
    if first.get("type") == "extra_forbidden":
        message = f"{where}: unknown field"
    return ApiError(400, message, param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "TextPart", "StreamOptions",
              "ChatMessage", "function-after", "json-or-python"}
