"""Settings: precedence defaults < dejavu.toml < command line, errors that name key, value and
fix, invalid TOML as path:line:col, the shipped dejavu.toml, and `dejavu-run config show`."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dejavu.runtime.settings import (
    REPO_ROOT,
    Settings,
    SettingsError,
    load_settings,
    render,
)
from dejavu.tools.cli import app


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dejavu.toml"
    path.write_text(text)
    return path


def test_precedence_and_sources(tmp_path):
    path = write(tmp_path,
                 "[generation]\ntemperature = 0.7\ntop_k = 5\n[model]\ndtype = 'float16'\n")
    s = load_settings(path, {"generation.top_k": 9, "generation.top_p": None})
    assert s.generation.temperature == 0.7 and s.sources["generation.temperature"] == str(path)
    assert s.generation.top_k == 9 and s.sources["generation.top_k"] == "command line"
    assert s.generation.top_p == 1.0 and s.sources["generation.top_p"] == "default"
    assert s.model.dtype == "float16"
    assert isinstance(load_settings(write(tmp_path, "[generation]\ntemperature = 1\n"))
                      .generation.temperature, float)


@pytest.mark.parametrize("text, needles", [
    ("[generation]\ntemprature = 1.0\n", ["unknown key [generation] temprature", "temperature"]),
    ("[genration]\n", ["unknown section [genration]", "generation"]),
    ("[generation]\ntop_k = '5'\n", ["top_k = '5'", "wrong type", "an integer"]),
    ("[generation]\ntop_k = true\n", ["top_k = True", "wrong type"]),
    ("[generation]\ntemperature = -0.5\n", ["temperature = -0.5", "out of range", "[0.0, 100.0]"]),
    ("[generation]\ntemperature = nan\n", ["temperature = nan", "finite"]),
    ("[generation]\ntop_p = inf\n", ["top_p = inf", "finite"]),
    ("[generation]\ntop_p = 0.0\n", ["top_p = 0.0", "out of range", "(0.0, 1.0]"]),
    ("[serve]\nport = 70000\n", ["port = 70000", "[1, 65535]"]),
    ("[generation]\nfrequency_penalty = 2.5\n", ["frequency_penalty = 2.5", "[-2.0, 2.0]"]),
    ("[generation]\npresence_penalty = nan\n", ["presence_penalty = nan", "finite"]),
    ("[generation]\nrepetition_penalty = 0\n", ["repetition_penalty = 0", "[0.1, 10.0]"]),
    ("[generation]\nmin_p = 1.5\n", ["min_p = 1.5", "[0.0, 1.0]"]),
    ("[model]\ndtype = 'fp8'\n", ["dtype = 'fp8'", "'float32', 'float16', 'bfloat16'"]),
    ("generation = 3\n", ["should be a section [generation]"]),
])
def test_bad_values_name_key_value_and_fix(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_bad_command_line_value():
    with pytest.raises(SettingsError,
                       match=r"command line --top-k: \[generation\] top_k = -1"):
        load_settings(None, {"generation.top_k": -1})


@pytest.mark.parametrize("text, line, col", [
    ("[model]\npath = 'x'\ndtype = \n", 3, 9),
    ("[model]\npath = \"unterminated\n", 2, 21),
    ("[model]\n[model]\n", 2, 7),
])
def test_invalid_toml_reports_path_line_col(tmp_path, text, line, col):
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert re.match(rf"{re.escape(str(path))}:{line}:{col}: invalid TOML: ", str(info.value)), \
        str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(SettingsError, match="no such config file"):
        load_settings(tmp_path / "absent.toml")


def test_shipped_dejavu_toml_is_complete_and_commented():
    path = REPO_ROOT / "dejavu.toml"
    s = load_settings(path)
    assert s == Settings()  # the file documents the defaults
    lines = path.read_text().splitlines()
    for name, section in s.sections().items():
        assert f"[{name}]" in lines
        for f in fields(section):
            # Every key appears (commented out when it has no value by default) ...
            at = next(i for i, ln in enumerate(lines)
                      if re.match(rf"(# )?{f.name} = ", ln))
            # ... right below a comment that explains it.
            assert lines[at - 1].startswith("#"), f"{name}.{f.name} has no comment"


def test_model_path_relative_to_config_file(tmp_path):
    (tmp_path / "weights").mkdir()
    s = load_settings(write(tmp_path, "[model]\npath = 'weights'\n"))
    assert s.model_path() == str(tmp_path / "weights")
    s = load_settings(write(tmp_path, "[model]\npath = 'facebook/opt-125m'\n"))
    assert s.model_path() == "facebook/opt-125m"
    assert Settings().model_path() == str(REPO_ROOT / "models" / "opt-gutenberg-31m")


def test_render_round_trips(tmp_path):
    s = load_settings(write(tmp_path, "[generation]\nseed = 7\ntop_k = 3\n"))
    again = load_settings(write(tmp_path, render(s)))
    assert again == s


def test_config_show_cli(tmp_path):
    path = write(tmp_path, "[pipeline]\nworkers = 3\n")
    result = CliRunner().invoke(app, ["config", "show", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert re.search(rf"workers = 3\s+# from {re.escape(str(path))}", result.output)
    assert re.search(r'dtype = "float32"\s+# from default', result.output)

    bad = write(tmp_path, "[pipeline]\nworkers = 0\n")
    result = CliRunner().invoke(app, ["config", "show", "--config", str(bad)])
    assert result.exit_code == 2
    assert "workers = 0" in result.output and "Traceback" not in result.output
