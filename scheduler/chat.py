"""``dejavu-run chat``: a streaming terminal chat against a running cluster, one it starts
with ``--workers N``, or the in-process engine (scheduler/discover.py picks).

- Base OPT models have no chat format, so a chat is a transcript the model continues
  (``ChatTemplate``: "User: ...\\nAssistant: ..."), with the next user marker as a stop
  string. A TOML file with the same fields overrides it (``--template``).
- History is kept within the context window: the oldest turns are dropped until the prompt
  plus the answer's ``max_new_tokens`` fits the model's positions.
- Sampling has its own defaults (``CHAT_SAMPLING``: greedy decoding loops on small base
  models); command-line flags override them. Turn i samples with a seed derived from
  ``--seed`` and i, so turns differ while a session with the same inputs repeats exactly.
- ``/reset`` clears the history, ``/stats`` prints throughput and per-stage timings,
  ``/help`` lists the commands, ``/quit`` (or Ctrl-D) exits; any other ``/word`` is answered
  here, never sent to the model. Ctrl-C cancels the answer being written.
- On a terminal, echo is off while an answer streams (and what was typed meanwhile is
  dropped), so keystrokes never land inside the answer; restored after, Ctrl-C included.
- Without a terminal on stdin, every line is one user turn and answers go to stdout.

What this module does not know: how the engine runs; it speaks the client API only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TextIO

from ..runtime.sampling import SamplingParams
from ..runtime.settings import CHAT_SAMPLING
from .zmq_client import PipelineConnection


class ChatError(ValueError):
    """A chat option that cannot be used; names it."""


COMMANDS = {
    "/help": "this list",
    "/reset": "forget the conversation so far",
    "/stats": "tokens/s of the last answer, per-stage compute and hop latency, densities",
    "/quit": "leave (Ctrl-D too); Ctrl-C stops the answer being written",
}


def chat_params(params: SamplingParams, given: set[str]) -> SamplingParams:
    """``params`` with ``CHAT_SAMPLING`` for each key not in ``given`` (the sampling keys
    named on the command line)."""
    known = {f.name for f in fields(SamplingParams)}
    chosen = {key: value for key, value in CHAT_SAMPLING.items()
              if key in known and key not in given}
    return dataclasses.replace(params, **chosen)


def turn_seed(seed: int | None, turn: int) -> int | None:
    """Turn ``turn``'s seed: distinct per turn, the same for the same (seed, turn)
    (a splitmix64 step, kept within the 63 bits a seed may use)."""
    if seed is None:
        return None
    z = (seed + (turn + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


@dataclass(frozen=True)
class ChatTemplate:
    system: str = ("A conversation between a curious user and a helpful, concise "
                   "assistant.")
    user: str = "User: "
    assistant: str = "Assistant:"
    separator: str = "\n"
    stop: tuple[str, ...] = ("\nUser:",)

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTemplate:
        """A TOML file with any of the fields above (strings; ``stop`` a list of them)."""
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ChatError(f"--template {path}: {exc}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ChatError(f"--template {path}: unknown keys {sorted(unknown)}; known: "
                            f"{', '.join(sorted(known))}")
        for key, value in raw.items():
            ok = (isinstance(value, list) and all(isinstance(s, str) and s for s in value)
                  if key == "stop" else isinstance(value, str))
            if not ok:
                raise ChatError(f"--template {path}: {key} = {value!r} should be "
                                f"{'a list of non-empty strings' if key == 'stop' else 'a string'}")
        if "stop" in raw:
            raw["stop"] = tuple(raw["stop"])
        return cls(**raw)

    def render(self, turns: list[tuple[str, str]], user_text: str) -> str:
        lines = [self.system + self.separator] if self.system else []
        for question, answer in turns:
            lines.append(f"{self.user}{question}{self.separator}{self.assistant} {answer}")
        lines.append(f"{self.user}{user_text}{self.separator}{self.assistant}")
        return self.separator.join(lines)


@dataclass
class ChatSession:
    """History and prompt building; no I/O."""

    tokenizer: object
    template: ChatTemplate
    max_len: int
    max_new_tokens: int
    turns: list[tuple[str, str]] = field(default_factory=list)
    dropped: int = 0

    def prompt(self, user_text: str) -> list[int]:
        """Token ids of the transcript with as many recent turns as fit."""
        budget = self.max_len - self.max_new_tokens
        if budget < 1:
            raise ChatError(f"--max-new-tokens {self.max_new_tokens} leaves no room for a "
                            f"prompt in the model's {self.max_len} positions")
        while True:
            ids = self.tokenizer.encode(self.template.render(self.turns, user_text))
            if len(ids) <= budget:
                return ids
            if not self.turns:
                # Even alone this turn is too long: keep its end (BOS first).
                return ids[:1] + ids[len(ids) - budget + 1:]
            self.turns.pop(0)
            self.dropped += 1

    def answered(self, user_text: str, answer: str) -> None:
        self.turns.append((user_text, answer.strip()))

    def reset(self) -> None:
        self.turns.clear()
        self.dropped = 0


def run_chat(conn: PipelineConnection, tokenizer, *, template: ChatTemplate,
             params: SamplingParams, stdin: TextIO | None = None,
             stdout: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    interactive = stdin.isatty()
    health = conn.health()
    stop = tuple(dict.fromkeys(params.stop + template.stop))
    params = dataclasses.replace(params, stop=stop)
    session = ChatSession(tokenizer, template, health.max_len, params.max_new_tokens)
    last = {"tokens": 0, "seconds": 0.0}
    turn = 0
    if interactive:
        out.write(f"chat with {health.model} ({len(health.workers)} worker(s)); "
                  "/help for commands; Ctrl-C stops an answer, Ctrl-D exits\n")
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line:  # Ctrl-D / end of input
            if interactive:
                out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and " " not in text:
            if text == "/quit":
                return 0
            out.write(_command(text, conn, last, session) + "\n")
            continue
        turn_params = dataclasses.replace(params, seed=turn_seed(params.seed, turn))
        turn += 1
        try:
            with _no_echo(stdin if interactive else None):
                answer, n, seconds, error = _answer(conn, session.prompt(text), turn_params,
                                                    out)
        except KeyboardInterrupt:  # Ctrl-C before the answer began: nothing to keep
            out.write(" [cancelled]\n")
            continue
        last = {"tokens": n, "seconds": seconds}
        if error:
            out.write(f"\n[error: {error}]\n")
        else:
            session.answered(text, answer)
        out.flush()


def _command(text: str, conn, last: dict, session: ChatSession) -> str:
    """The reply to a /command other than /quit; nothing here reaches the model."""
    if text == "/reset":
        session.reset()
        return "(history cleared)"
    if text == "/stats":
        return format_stats(conn.health(), last, session)
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
    if text == "/help":
        return "commands:\n" + listing
    return f"unknown command {text}; commands:\n{listing}"


@contextlib.contextmanager
def _no_echo(stdin: TextIO | None) -> Iterator[None]:
    """Terminal echo off while an answer streams; restored (and what was typed meanwhile
    dropped) when it ends, however it ends. Nothing happens without a terminal."""
    try:
        import termios

        fd = stdin.fileno() if stdin is not None else -1
        saved = termios.tcgetattr(fd) if fd >= 0 else None
    except (ImportError, OSError, ValueError, AttributeError):
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHONL)  # lflags; ISIG stays: Ctrl-C still works
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


def _answer(conn: PipelineConnection, ids: list[int], params: SamplingParams,
            out: TextIO) -> tuple[str, int, float, str | None]:
    started = time.monotonic()
    answer, n, error = "", 0, None
    stream = conn.stream(ids, params)
    try:
        for event in stream:
            n += event.token is not None
            if event.text:
                out.write(event.text)
                out.flush()
                answer += event.text
            if event.error:
                error = event.error
    except KeyboardInterrupt:  # cancel this answer; closing the stream aborts the request
        stream.close()
        out.write(" [cancelled]")
    out.write("\n")
    return answer, n, time.monotonic() - started, error


def format_stats(health, last: dict, session: ChatSession) -> str:
    rate = last["tokens"] / last["seconds"] if last["seconds"] else 0.0
    lines = [f"last answer: {last['tokens']} tokens in {last['seconds']:.2f} s "
             f"({rate:.1f} tokens/s)",
             f"cluster: {health.state}, {health.tokens_out} tokens generated, "
             f"{health.tokens_per_s:.1f} tokens/s over the last 10 s, {health.running} "
             f"running, {health.waiting} waiting",
             "stage compute (ms): " + (", ".join(f"{s * 1000:.2f}" for s in health.stage_s)
                                       or "-"),
             "hop latency (ms): " + (", ".join(f"{s * 1000:.2f}" for s in health.hop_s)
                                     or "-"),
             "input wait for a busy stage (ms): " + (", ".join(
                 f"{s * 1000:.2f}" for s in health.queue_s) or "-"),
             "computed fraction per stage (MLP/heads): " + (", ".join(
                 f"{m:.2f}/{h:.2f}" for m, h in health.densities) or "dense"),
             f"history: {len(session.turns)} turn(s) kept, {session.dropped} dropped to fit "
             f"{session.max_len} positions"]
    if getattr(health, "micro_batches", 0) > 1:  # a pipeline's steps in flight
        lines.append(f"micro-batches: {health.micro_batches} (most in flight so far "
                     f"{health.in_flight_peak})")
    offloaded = [getattr(w, "offloaded_layers", 0) for w in health.workers]
    if any(offloaded):  # gpu_memory_gib: layers read row by row from host memory
        paged = sum(getattr(health, "paged_bytes", []) or [0])
        lines.append(f"offloaded layers per worker: {', '.join(map(str, offloaded))}; bytes "
                     f"paged from host memory: {paged / 2**20:.1f} MiB, "
                     f"{paged / max(health.tokens_out, 1) / 2**20:.2f} MiB per generated token "
                     "(prefill included)")
    stats = [w.stats for w in getattr(health, "workers", []) if getattr(w, "stats", None)]
    if stats:
        busy = ", ".join(f"{s.busy_fraction:.2f}" for s in stats)
        lines.append(f"busy fraction per worker (last {stats[0].window_s:g} s): {busy}")
        used = sum(s.ahead_used + s.prefetch_used for s in stats)
        wasted = sum(s.ahead_wasted + s.prefetch_wasted for s in stats)
        if used or wasted:
            lines.append(f"lookahead: {used} selections and row gathers used ahead, "
                         f"{wasted} wasted")
    return "\n".join(lines)
