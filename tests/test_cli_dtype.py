"""--dtype on every command that builds or starts an engine (generate, eval, chat, serve):
the same option, the same [model] dtype setting, the same one-line error for a bad value."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dejavu.tools.cli import app


def cli(*args: str, stdin: str | None = None):
    return CliRunner().invoke(app, list(args), input=stdin)


@pytest.mark.parametrize("command", [["generate", "--prompt-ids", "2"], ["chat"], ["serve"],
                                     ["eval", "--task", "piqa"]])
def test_a_bad_dtype_is_one_line_naming_it(command):
    out = cli(*command, "--dtype", "int8", stdin="")
    assert out.exit_code == 2, out.output
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and "dtype = 'int8'" in err, err
    assert "Traceback" not in out.output


def test_chat_dtype_sets_the_model_dtype(monkeypatch):
    from dejavu.tools import pipeline_generate

    seen = {}

    def fake_chat(settings, **_):
        seen["dtype"] = settings.model.dtype
        seen["source"] = settings.sources.get("model.dtype")
        return 0

    monkeypatch.setattr(pipeline_generate, "start_chat", fake_chat)
    out = cli("chat", "--dtype", "bfloat16", stdin="")
    assert out.exit_code == 0, out.output
    assert seen == {"dtype": "bfloat16", "source": "command line"}


def test_serve_dtype_sets_the_model_dtype(monkeypatch):
    pytest.importorskip("fastapi")
    from dejavu.scheduler import serve

    seen = {}

    def fake_server(settings, options):
        seen["dtype"] = settings.model.dtype
        seen["source"] = settings.sources.get("model.dtype")

    monkeypatch.setattr(serve, "run_server", fake_server)
    out = cli("serve", "--dtype", "float16", "--workers", "1")
    assert out.exit_code == 0, out.output
    assert seen == {"dtype": "float16", "source": "command line"}


def test_a_budget_with_float32_names_the_dtype_flag():
    out = cli("serve", "--dtype", "float32", "--gpu-memory-gib", "2", "--workers", "1")
    assert out.exit_code == 2, out.output
    err = out.stderr.strip()
    assert "(from command line --dtype)" in err and "pass --dtype float16" in err, err
