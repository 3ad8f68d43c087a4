"""``dejavu-run chat``: a streaming terminal chat against a running cluster (or one it
starts with ``--workers N``).

- Base OPT models have no chat format, so a chat is a transcript the model continues
  (``ChatTemplate``: "User: ...\\nAssistant: ..."), with the next user marker as a stop
  string. A TOML file with the same fields overrides it (``--template``).
- History is kept within the context window: the oldest turns are dropped until the prompt
  plus the answer's ``max_new_tokens`` fits the model's positions.
- ``/reset`` clears the history, ``/stats`` prints throughput and per-stage timings,
  ``/quit`` (or Ctrl-D) exits; Ctrl-C cancels the answer being written.
- Without a terminal on stdin, every line is one user turn and answers go to stdout.

What this module does not know: how the cluster runs; it speaks the client API only.
"""

from __future__ import annotations

import sys
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TextIO

from ..runtime.sampling import SamplingParams
from .zmq_client import PipelineConnection


class ChatError(ValueError):
    """A chat option that cannot be used; names it."""


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
    params = SamplingParams(**{**params.__dict__, "stop": stop})
    session = ChatSession(tokenizer, template, health.max_len, params.max_new_tokens)
    last = {"tokens": 0, "seconds": 0.0}
    if interactive:
        out.write(f"chat with {health.model} ({len(health.workers)} worker(s)); "
                  "/reset, /stats, /quit; Ctrl-C stops an answer, Ctrl-D exits\n")
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
        if text == "/quit":
            return 0
        if text == "/reset":
            session.reset()
            out.write("(history cleared)\n")
            continue
        if text == "/stats":
            out.write(format_stats(conn.health(), last, session) + "\n")
            continue
        answer, n, seconds, error = _answer(conn, session.prompt(text), params, out)
        last = {"tokens": n, "seconds": seconds}
        if error:
            out.write(f"\n[error: {error}]\n")
        else:
            session.answered(text, answer)
        out.flush()


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
             "computed fraction per stage (MLP/heads): " + (", ".join(
                 f"{m:.2f}/{h:.2f}" for m, h in health.densities) or "dense"),
             f"history: {len(session.turns)} turn(s) kept, {session.dropped} dropped to fit "
             f"{session.max_len} positions"]
    offloaded = [getattr(w, "offloaded_layers", 0) for w in health.workers]
    if any(offloaded):  # gpu_memory_gib: layers read row by row from host memory
        paged = sum(getattr(health, "paged_bytes", []) or [0])
        lines.append(f"offloaded layers per worker: {', '.join(map(str, offloaded))}; bytes "
                     f"paged from host memory: {paged / 2**20:.1f} MiB, "
                     f"{paged / max(health.tokens_out, 1) / 2**20:.2f} MiB per generated token "
                     "(prefill included)")
    return "\n".join(lines)
