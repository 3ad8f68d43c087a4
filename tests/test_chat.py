"""`dejavu-run launch`, `chat`, `generate --connect/--workers` as a user runs them: real
commands in subprocesses against a tiny model with a real tokenizer; plus the chat's
history and template logic, and the asyncio client the HTTP server uses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from pipeline_fixtures import short_dir, wait_until
from serve_fixtures import make_checkpoint

from dejavu.runtime.checkpoint import load_model
from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.tokenizer import load_tokenizer
from dejavu.scheduler.chat import ChatError, ChatSession, ChatTemplate
from dejavu.scheduler.core import RequestError
from dejavu.scheduler.engine import Engine
from dejavu.scheduler.zmq_client import PipelineClient, PipelineConnection

CLI = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180, **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("chatmodel"))


@pytest.fixture(scope="module")
def engine(model):
    return Engine(load_model(model), load_tokenizer(model), max_batch=2)


@pytest.fixture(scope="module")
def launched(model):
    """`dejavu-run launch --workers 2` in the foreground of a subprocess."""
    base = short_dir()
    run_dir = base / "run"
    log = open(base / "launch.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*CLI, "launch", "--workers", "2", "--model", str(model),
                             "--run-dir", str(run_dir)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    address = f"ipc://{run_dir}/client.sock"

    def ready():
        if proc.poll() is not None:
            raise AssertionError((base / "launch.log").read_text())
        if not (run_dir / "client.sock").exists():
            return False
        with PipelineConnection(address) as conn:
            try:
                return conn.health(timeout_s=0.5).state == "ready"
            except TimeoutError:
                return False

    try:
        assert wait_until(ready, 120, 0.2) is not None
        yield proc, address, base / "launch.log", run_dir
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def test_generate_connect_equals_in_process_generate(launched, model):
    _, address, _, _ = launched
    common = ["--model", str(model), "--prompt", "the cat", "--max-new-tokens", "8", "--json"]
    local = cli("generate", *common, "--dense")
    remote = cli("generate", *common, "--connect", address)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    streamed = cli("generate", "--model", str(model), "--prompt", "the cat",
                   "--max-new-tokens", "8", "--connect", address)
    assert streamed.stdout == json.loads(local.stdout)["text"] + "\n"
    bad = cli("generate", "--model", str(model), "--prompt-ids", "2,99999", "--connect", address)
    assert bad.returncode == 2 and "vocabulary" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_over_a_pipe_streams_answers_and_keeps_history(launched, model, engine):
    _, address, _, _ = launched
    script = "the cat sat\n/stats\na dog ran\n/reset\n/quit\nnever read\n"
    out = cli("chat", "--connect", address, "--model", str(model), "--max-new-tokens", "6",
              "--temperature", "0", "--repetition-penalty", "1", input=script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # The first answer is what the engine writes for the same transcript, greedy.
    template = ChatTemplate()
    session = ChatSession(load_tokenizer(model), template, max_len=96, max_new_tokens=6)
    params = SamplingParams(max_new_tokens=6, stop=template.stop)
    first = engine.generate(session.prompt("the cat sat"), params).text
    assert out.stdout.startswith(first + "\n")
    assert any(re.match(r"last answer: \d+ tokens in [\d.]+ s", ln) for ln in lines)
    assert any(ln.startswith("stage compute (ms): ") and ln.count(",") == 1 for ln in lines)
    assert "history: 1 turn(s) kept, 0 dropped to fit 96 positions" in lines
    # The second prompt is built from the history (as much as fits in 96 positions).
    session.answered("the cat sat", first)
    second = engine.generate(session.prompt("a dog ran"), params).text
    assert "\n" + second + "\n" in out.stdout
    assert "(history cleared)" in lines
    assert "never read" not in out.stdout


def test_async_engine_client_protocol(launched, engine, model):
    _, address, _, _ = launched
    tok = load_tokenizer(model)
    ids = tok.encode("a dog ran in")
    params = SamplingParams(max_new_tokens=7, ignore_eos=True)
    want = engine.generate(ids, params).tokens

    async def main():
        client = PipelineClient(address)
        try:
            assert client.max_len == 96 and client.vocab_size == tok.vocab_size
            tokens = [e.token async for e in client.generate(ids, params, "a1")
                      if e.token is not None]
            with pytest.raises(RequestError, match="vocabulary"):
                async for _ in client.generate([10**6], params, "a2"):
                    pass
            # Two at once, one abandoned half-way (the consumer goes away: aborted).
            async def take(rid, n):
                got = []
                async for e in client.generate(ids, SamplingParams(max_new_tokens=50,
                                                                   ignore_eos=True), rid):
                    got.append(e)
                    if len(got) == n:
                        break
                return got

            short, long = await asyncio.gather(take("b1", 3), take("b2", 60))
            health = client.health()
            stats = client.stats()
            return tokens, short, long, health, stats
        finally:
            await client.close()

    tokens, short, long, health, stats = asyncio.run(main())
    assert tokens == want
    assert len(short) == 3 and long[-1].finished and len(long) == 50
    assert health.ok and [w["alive"] for w in health.workers] == [True, True]
    assert stats["requests"] == 3 and len(stats["stage_ms"]) == 2


def test_ctrl_c_cancels_the_answer_being_written_and_the_chat_goes_on(launched, model):
    """Ctrl-C arrives while an answer streams (here: raised from the terminal's write, as
    SIGINT would raise it there): the answer stops, the request is aborted in the cluster,
    and the next question is answered."""
    import io

    from dejavu.scheduler.chat import run_chat

    _, address, _, _ = launched

    class Terminal(io.StringIO):
        def __init__(self):
            super().__init__()
            self.armed = True

        def write(self, text):
            if self.armed and text.strip() and not text.startswith(("(", "\n>")):
                self.armed = False
                super().write(text)
                raise KeyboardInterrupt
            return super().write(text)

    out = Terminal()
    stdin = io.StringIO("first question\n/stats\nsecond question\n")
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    with PipelineConnection(address) as conn:
        assert run_chat(conn, load_tokenizer(model), template=ChatTemplate(system=""),
                        params=params, stdin=stdin, stdout=out) == 0
        assert wait_until(lambda: conn.health().running == 0, 5) is not None
    text = out.getvalue()
    assert " [cancelled]" in text
    first, rest = text.split(" [cancelled]", 1)
    assert re.search(r"last answer: (\d+) tokens", rest).group(1) != "60"  # stopped early
    after_stats = rest.split("history: ", 1)[1].split("\n", 1)[1]
    assert after_stats.strip()  # the second question got an answer


def test_zz_launch_logs_role_and_pid_and_stops_cleanly_on_ctrl_c(launched):
    """Runs last in this module: it stops the shared launch."""
    proc, address, log, run_dir = launched
    with PipelineConnection(address) as conn:
        pids = [w.pid for w in conn.health().workers]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert f"scheduler[{proc.pid}] INFO plan: 2 layers over 2 worker(s)" in text
    for i, pid in enumerate(pids):
        assert f"worker{i}[{pid}] INFO worker {i} loading layers" in text
    assert not list(run_dir.glob("*.sock"))
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 5)


def test_chat_workers_starts_its_own_cluster_and_dies_with_it(model):
    out = cli("chat", "--workers", "2", "--model", str(model), "--max-new-tokens", "4",
              "--temperature", "0", "--repetition-penalty", "1", input="hello\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1
    # Nothing left behind: no launch or worker process of this test still runs.
    time.sleep(0.5)
    leftover = subprocess.run(["pgrep", "-f", f"dejavu.*{model}"], capture_output=True,
                              text=True).stdout.split()
    assert leftover == []


def test_chat_device_sets_where_the_in_process_chat_runs(model, tmp_path):
    # dejavu.toml asks for cuda; --device cpu on the command line wins, as for generate.
    config = tmp_path / "dejavu.toml"
    config.write_text('[model]\ndevice = "cuda"\n')
    run_dir = short_dir()  # empty: no launch to join
    try:
        # Greedy: a sampled reply from the random model may hold a character that
        # splitlines() breaks on (a CI run drew "\x0b\x0e").
        out = cli("chat", "--model", str(model), "--config", str(config), "--device", "cpu",
                  "--run-dir", str(run_dir), "--max-new-tokens", "2", "--temperature", "0",
                  "--repetition-penalty", "1", input="hello\n")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    assert f"chatting with {model} in this process (cpu)" in out.stderr
    assert len(out.stdout.splitlines()) == 1


# --- history and templates, no processes -------------------------------------------------------


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [2] + [ord(c) % 200 for c in text]


def test_history_drops_oldest_turns_to_fit_the_context_window():
    session = ChatSession(CharTokenizer(), ChatTemplate(system=""), max_len=120,
                          max_new_tokens=20)
    for i in range(5):
        session.answered(f"question {i}", f"answer {i}")
    ids = session.prompt("last one")
    assert len(ids) <= 100
    assert session.turns[-1] == ("question 4", "answer 4")
    assert session.dropped >= 1 and len(session.turns) + session.dropped == 5
    # A single turn longer than the window keeps its end.
    ids = session.prompt("x" * 200)
    assert len(ids) == 100 and ids[0] == 2 and session.turns == []


def test_a_template_file_overrides_fields_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "t.toml"
    good.write_text('system = ""\nuser = "Q: "\nassistant = "A:"\nstop = ["\\nQ:"]\n')
    t = ChatTemplate.from_file(good)
    assert t.render([("hi", "hello")], "bye") == "Q: hi\nA: hello\nQ: bye\nA:"
    assert t.stop == ("\nQ:",)
    bad = tmp_path / "bad.toml"
    bad.write_text('usr = "Q: "\n')
    with pytest.raises(ChatError, match="unknown keys.*usr"):
        ChatTemplate.from_file(bad)
    bad.write_text("stop = [1]\n")
    with pytest.raises(ChatError, match="stop"):
        ChatTemplate.from_file(bad)


def test_a_client_without_a_scheduler_fails_fast_instead_of_hanging():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no health answer"):
        PipelineClient(f"ipc://{short_dir()}/nobody.sock", timeout_s=0.3)
    assert time.monotonic() - started < 2
