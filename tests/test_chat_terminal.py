"""`dejavu-run chat` as a person at a terminal meets it: a real pseudo-terminal, the
in-process engine on a tiny model. Commands are answered locally, keystrokes typed while
an answer streams never reach the screen or the model, Ctrl-C stops the answer and gives
the terminal back as it was; and sampled turns differ while a seeded session replays."""

from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import sys
import termios
import time

import pytest
from pipeline_fixtures import short_dir
from serve_fixtures import make_checkpoint

CLI = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ttymodel"), max_positions=1024)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    # A stop string the model never writes: answers run to --max-new-tokens (or EOS).
    path = tmp_path_factory.mktemp("tpl") / "t.toml"
    path.write_text('system = ""\nstop = ["@@@@@@"]\n')
    return path


def env() -> dict:
    return {**os.environ, "XDG_RUNTIME_DIR": str(short_dir()), "COLUMNS": "200"}


class Terminal:
    """A child process on a pty that is its controlling terminal."""

    def __init__(self, args: list[str]) -> None:
        self.master, self.slave = os.openpty()

        def controlling_tty():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(args, stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, preexec_fn=controlling_tty,
                                     env=env())
        self.seen = ""

    def echo_on(self) -> bool:
        return bool(termios.tcgetattr(self.slave)[3] & termios.ECHO)

    def read(self, timeout: float = 0.05) -> str:
        got = ""
        while select.select([self.master], [], [], timeout)[0]:
            try:
                chunk = os.read(self.master, 4096).decode(errors="replace")
            except OSError:
                break
            if not chunk:
                break
            got += chunk.replace("\r\n", "\n")  # the terminal's output mapping
            timeout = 0.0
        self.seen += got
        return got

    def until(self, pattern: str, timeout: float = 60.0, *, start: int = 0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read(0.1)
            if re.search(pattern, self.seen[start:]):
                return True
            if self.proc.poll() is not None:
                self.read(0.1)
                return bool(re.search(pattern, self.seen[start:]))
        return False

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)
        os.close(self.slave)


def test_commands_no_echo_while_streaming_and_ctrl_c(model, template):
    term = Terminal([*CLI, "chat", "--model", str(model), "--template", str(template),
                     "--max-new-tokens", "900"])
    try:
        assert term.until(r"\n> $"), term.seen
        assert "/help for commands" in term.seen
        mark = len(term.seen)
        term.type("/help\n")
        assert term.until(r"/stats\s+tokens/s.*\n\s+/quit\s+leave.*\n\n> $", start=mark), term.seen
        mark = len(term.seen)
        term.type("/frobnicate\n")
        assert term.until(r"unknown command /frobnicate; commands:", start=mark), term.seen
        assert term.until(r"\n> $", start=mark)

        # An answer streams: echo goes off; what is typed meanwhile is neither shown nor
        # sent to the model.
        mark = len(term.seen)
        term.type("tell me a long story\n")
        deadline = time.monotonic() + 60
        while term.echo_on() and time.monotonic() < deadline:
            term.read(0.005)
        assert not term.echo_on(), "echo stayed on while the answer streamed"
        term.type("zzzz typed while streaming\n")
        shown = len(term.seen)
        assert term.until(r"\S{20}", start=shown)  # more of the answer arrives, then:
        term.type("\x03")  # Ctrl-C: stop this answer
        assert term.until(r"\[cancelled\]\n\n> $", start=mark), term.seen[mark:]
        assert term.echo_on()  # the terminal is as it was
        assert "zzzz" not in term.seen
        mark = len(term.seen)
        term.type("/stats\n")
        assert term.until(r"history: \d+ turn", start=mark), term.seen[mark:]
        # The hidden line never became a turn (the cancelled one keeps its partial answer).
        assert "history: 1 turn(s) kept" in term.seen[mark:]
        assert not re.search(r"last answer: 0 tokens", term.seen[mark:])
        mark = len(term.seen)
        term.type("visible\n")
        assert term.until(r"visible", start=mark)  # echo is back: typed text shows
        deadline = time.monotonic() + 60
        while term.echo_on() and time.monotonic() < deadline:  # its answer streams
            term.read(0.005)
        term.type("\x03")
        assert term.until(r"\n> $", start=mark), term.seen[mark:]
        term.type("\x04")  # Ctrl-D: leave
        assert term.proc.wait(30) == 0
        assert term.echo_on()
    finally:
        term.close()


def test_turns_get_different_seeds_and_a_seeded_session_replays(model):
    def session(*flags: str) -> list[str]:
        out = subprocess.run([*CLI, "chat", "--model", str(model), "--max-new-tokens", "12",
                              *flags], input="/reset\nthe cat\n/reset\nthe cat\n",
                             capture_output=True, text=True, timeout=180, env=env())
        assert out.returncode == 0, out.stderr
        # Answers of a random tiny model hold any character: split on the command replies.
        parts = out.stdout.split("(history cleared)\n")
        assert len(parts) == 3 and parts[0] == ""
        return parts[1:]

    first = session("--seed", "7")
    assert len(first) == 2 and first[0] != first[1]  # same prompt, turn seeds differ
    assert session("--seed", "7") == first
    assert session("--seed", "8") != first
    # --temperature 0 is greedy: the same prompt, the same answer, every turn.
    greedy = session("--temperature", "0")
    assert greedy[0] == greedy[1]


def test_chat_sampling_fills_only_what_the_command_line_left_out():
    from dejavu.runtime.sampling import SamplingParams
    from dejavu.runtime.settings import CHAT_SAMPLING
    from dejavu.scheduler.chat import chat_params

    chosen = chat_params(SamplingParams(temperature=0.0, top_k=5, seed=4), {"top_k"})
    assert chosen.top_k == 5 and chosen.seed == 4  # given on the command line: kept
    for key, value in CHAT_SAMPLING.items():
        if key != "top_k" and hasattr(chosen, key):  # keys the engine has: the chat's own
            assert getattr(chosen, key) == value, key
    assert chosen.temperature > 0  # never greedy by default
