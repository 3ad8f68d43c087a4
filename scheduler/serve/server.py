"""Starting the HTTP server: build the engine client from settings, wrap it in the app,
run uvicorn; and ``serve_in_thread`` for tests and embedding (a real socket on a free
loopback port, always stopped).

``--workers 1`` runs the in-process engine (``LocalClient``); ``--workers N`` starts a
pipeline of N worker processes and serves through its ``PipelineClient``; ``--connect``
serves a ``launch`` that is already running. The app sees only the ``EngineClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from .app import create_app
from .connections import Guard, fit_file_limit, guarded_protocol, install_repeat_filter
from .context import Context, ServeLimits


class ServeError(ValueError):
    """A serve option that cannot work; one line naming it."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    workers: int = 1
    max_batch: int = 8
    model_name: str | None = None  # as clients name it; default: [model] path as given
    connect: str | None = None  # client address of a running `launch` (instead of workers)
    limits: ServeLimits = field(default_factory=ServeLimits)


def options_from_settings(settings, *, api_key: str | None = None,
                          max_batch: int | None = None, model_name: str | None = None,
                          connect: str | None = None,
                          workers: int | None = None) -> ServeOptions:
    """ServeOptions from dejavu.toml's [serve] and [pipeline] (already merged with the
    command line) plus the options that only the command line has (None: not given)."""
    if max_batch is None:
        max_batch = ServeOptions.max_batch
    if max_batch < 1:
        raise ServeError(f"--max-batch {max_batch}: expected at least 1")
    if api_key is not None and not api_key.strip():
        raise ServeError("the API key is empty (--api-key, --api-key-file or DEJAVU_API_KEY): "
                         "give a key, or none of them to serve without authentication")
    serve = settings.serve
    limits = ServeLimits(
        max_pending=serve.max_pending, max_body_bytes=serve.max_body_kib * 1024,
        chat_max_tokens=serve.chat_max_tokens, max_connections=serve.max_connections,
        idle_timeout_s=serve.idle_timeout_s, header_timeout_s=serve.header_timeout_s,
        body_timeout_s=serve.body_timeout_s, tokenize_threads=serve.tokenize_threads,
        tokenize_queue=serve.tokenize_queue)
    return ServeOptions(host=serve.host, port=serve.port, api_key=api_key,
                        workers=workers or settings.pipeline.workers, max_batch=max_batch,
                        model_name=model_name, connect=connect, limits=limits)


API_KEY_ENV = "DEJAVU_API_KEY"


def read_api_key(api_key: str | None, api_key_file: str | None,
                 environ=os.environ) -> str | None:
    """The key from --api-key, from --api-key-file (its first line), or from DEJAVU_API_KEY
    when neither is given; a file or the variable keeps the key out of `ps`. Both options at
    once is an error (which one wins would be a guess). A variable that is set but empty is
    returned as it is, for options_from_settings to refuse: it must not mean "no key"."""
    if api_key is None and api_key_file is None:
        return environ.get(API_KEY_ENV)
    if api_key_file is None:
        return api_key
    if api_key is not None:
        raise ServeError("--api-key-file and --api-key are both given: keep one")
    try:
        with open(api_key_file, encoding="utf-8") as f:
            key = f.readline(4096).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeError(f"--api-key-file {api_key_file}: cannot read it: {exc}") from None
    if not key:
        raise ServeError(f"--api-key-file {api_key_file}: the file holds no key (its first "
                         "line is empty)")
    return key


def build_client(settings, options: ServeOptions):
    """(client, tokenizer) for the configured model: the in-process engine for one worker
    (built by runtime/build.py, as every worker's is), else a pipeline of `workers`
    processes started here (stopped with the client), or a running `launch` at `connect`.
    The tokenizer is always loaded here: the HTTP layer turns text into ids and ids into
    token text itself."""
    from ...runtime.build import BuildError, build_stage, resolve
    from ...runtime.checkpoint import resolve_model_dir
    from ...runtime.selection import SelectionError
    from ...runtime.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(settings.model_path())
    tokenizer = load_tokenizer(model_dir)
    if options.connect:
        from ..discover import JoinError, describe, join
        from ..zmq_client import PipelineClient

        keys = settings.pipeline.keys_dir or None
        run_dir = settings.pipeline.run_dir or None
        try:
            with join(options.connect, keys_dir=keys, run_dir=run_dir) as probe:
                print(describe(probe.health(), options.connect), file=sys.stderr)
            return PipelineClient(options.connect, keys_dir=keys, run_dir=run_dir), tokenizer
        except JoinError as exc:  # no socket there, or no answer: at once, naming it
            raise ServeError(str(exc)) from None
        except TimeoutError as exc:
            raise ServeError(f"--connect {options.connect}: no answer ({exc})") from None
    if options.workers > 1:
        from ..config import PipelineConfigError, from_settings
        from ..launch import LaunchError

        try:
            config = from_settings(settings, workers=options.workers, slots=options.max_batch)
            return launch_client(config), tokenizer
        except (PipelineConfigError, LaunchError, TimeoutError) as exc:
            raise ServeError(f"--workers {options.workers}: {exc}") from None
    from ..client import LocalClient
    from ..engine import Engine

    try:
        built = build_stage(resolve(settings), slots=options.max_batch)
    except (BuildError, SelectionError) as exc:
        raise ServeError(str(exc)) from None
    return LocalClient(Engine.from_stage(built.stage, tokenizer)), tokenizer


def launch_client(config, *, timeout_s: float = 600.0):
    """A pipeline started here for ``config`` and its ``PipelineClient``, which stops it on
    ``close``."""
    from ..launch import Cluster
    from ..zmq_client import PipelineClient

    cluster = Cluster(config).start(timeout_s=timeout_s)
    try:
        return PipelineClient(cluster.address, keys_dir=config.keys_dir or None,
                              run_dir=str(cluster.run_dir), cluster=cluster)
    except BaseException:
        cluster.stop()
        raise


def make_app(client, tokenizer, options: ServeOptions, model_name: str, *,
             close_client: bool = False):
    ctx = Context(client, tokenizer, model_name, options.limits)
    app = create_app(ctx, api_key=options.api_key)
    @asynccontextmanager
    async def lifespan(_app):
        # The pipeline client learns the cluster's health from a reader task that otherwise
        # starts with the first request: start it now, so that /health follows the workers
        # while no request is open.
        start_reader = getattr(client, "_ensure_reader", None)
        if callable(start_reader):
            start_reader()
        yield
        ctx.close()
        if close_client:
            await client.close()

    app.router.lifespan_context = lifespan
    return app


def run_server(settings, options: ServeOptions) -> None:
    import uvicorn

    if options.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
        print(f"warning: serving on {options.host} without --api-key: anyone who can reach "
              "this address can use the model", file=sys.stderr)
    # Ctrl-C / SIGTERM mean "stop": uvicorn drains and shuts down, then re-raises the
    # signal it caught; this handler turns that (or a signal during loading) into exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    limits = options.limits
    fitted = fit_file_limit(limits.max_connections)
    if fitted != limits.max_connections:
        options = replace(options, limits=replace(limits, max_connections=fitted))
    sock = bind(options.host, options.port)  # a taken port fails before any loading
    try:
        client, tokenizer = build_client(settings, options)
        name = options.model_name or settings.model.path
        app = make_app(client, tokenizer, options, name, close_client=True)
        print(f"serving {name} on http://{options.host}:{sock.getsockname()[1]}",
              file=sys.stderr)
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10,
                                **uvicorn_options(options.limits, app.state.ctx.guard))
        # After uvicorn.Config, which sets up its loggers: the connection guard's lines go
        # out like uvicorn's own, and no logger repeats one line without bound.
        guard_log = logging.getLogger("dejavu.serve")
        guard_log.handlers = list(logging.getLogger("uvicorn").handlers)
        guard_log.setLevel(logging.INFO)
        guard_log.propagate = False
        install_repeat_filter()
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def uvicorn_options(limits: ServeLimits, guard: Guard | None = None) -> dict:
    """uvicorn.Config arguments for the connection limits: the guarded protocol (cap,
    header and body deadlines; ``guard``, the app's, else a new one) and the keep-alive
    timeout."""
    guard = guard or Guard(limits.max_connections, limits.header_timeout_s,
                           limits.body_timeout_s)
    return {"http": guarded_protocol(guard),
            "timeout_keep_alive": limits.idle_timeout_s}


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket with TCP_NODELAY, which accepted connections inherit: without
    it a keep-alive client waits ~40 ms per response (Nagle against delayed ACKs), because
    the response goes out as two writes (headers, then body)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: cannot resolve it: {exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServeError(f"--host {host} --port {port}: cannot bind: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", timeout: float = 10.0) -> Iterator[str]:
    """Run `app` with uvicorn on a thread, on a free port of `host`; yields the base URL
    (``http://host:port``) once the server accepts connections, and stops it on exit."""
    import uvicorn

    sock = bind(host, 0)
    port = sock.getsockname()[1]
    ctx = getattr(app.state, "ctx", None)
    limits = ctx.limits if ctx is not None else ServeLimits()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2,
                            lifespan="on", **uvicorn_options(
                                limits, ctx.guard if ctx is not None else None))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
