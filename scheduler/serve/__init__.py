"""`dejavu-run serve`: the OpenAI-compatible HTTP front end over an ``EngineClient``.

schema.py (request bodies) -> context.py (checks against the model) -> completions.py /
chat.py (requests to engine choices, responses) -> jobs.py (running choices, metrics) ->
app.py (routes, auth, limits, errors) -> server.py (uvicorn).
"""

from .app import create_app
from .context import Context, ServeLimits
from .server import (
    ServeError,
    ServeOptions,
    make_app,
    options_from_settings,
    read_api_key,
    run_server,
    serve_in_thread,
)

__all__ = ["Context", "ServeError", "ServeLimits", "ServeOptions", "create_app", "make_app",
           "options_from_settings", "read_api_key", "run_server", "serve_in_thread"]
