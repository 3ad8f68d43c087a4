"""Progress bars: drawn only on a terminal, with rate and time left."""

from __future__ import annotations

import io
import re

from dejavu.tools.progress import Bar, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_shows_rate_and_time_left_on_a_terminal_and_ends_the_line(monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("dejavu.tools.progress.time.monotonic", lambda: next(clock))
    term = Terminal()
    bar = Bar("eval", 4, "batches", term)  # started at t=0
    bar.update(1)  # t=1: one batch per second, three left
    bar.update(4)  # t=2
    first, last = term.getvalue().split("\r")[1:]
    assert first == "eval [#######                       ] 1/4 1.0 batches/s 00:01<00:03"
    assert last == "eval [" + "#" * 30 + "] 4/4 2.0 batches/s 2s\n"


def test_no_bar_and_no_carriage_returns_when_stderr_is_redirected(capsys):
    assert list(progress(range(5), 5, "eval")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""
    pipe = io.StringIO()
    bar = Bar("load", 3, stream=pipe)
    for i in range(1, 4):
        bar.update(i)
    assert pipe.getvalue() == "" and not re.search("\r", pipe.getvalue())
