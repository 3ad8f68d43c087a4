"""Load and chaos against a running `dejavu-run serve`: each case, then one table.

    dejavu-run serve --max-batch 8 &          # the server under test, on this host
    python -m dejavu.bench.chaos --url http://127.0.0.1:8000 --pid $!

Cases (each bounded in count and time; loopback only):
  streams      256 concurrent streamed completions
  disconnects  100 streams closed by their client after the first chunks
  hostile      bodies an attacker or a broken client sends (surrogates, non-bool flags,
               NaN, deep nesting, huge numbers, lying lengths, n beyond the queue, ...)
  huge         eight 3.9 MB prompts at once
  idle         many idle sockets (default 20,000, from child processes), held a while
  slow         connections that trickle their headers, a byte a second
  impatient    the slots held by long streams; clients that give up (1 s) while waiting

Per case: requests, answers by status code ("conn" = no HTTP answer), p50/p99 latency,
/health polled from a separate process every 0.1 s (answered 200 / polls, worst latency),
the server's RSS and open file descriptors before and after (and the most seen while
polling), from /proc/PID, what the
case added to the server's log (--log FILE), and whether
a plain completion succeeds afterwards. Not a CI test: it takes minutes and loads the host.

What this module does not know: how the server runs (it only speaks HTTP to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import socket
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

CASES = ("streams", "disconnects", "hostile", "huge", "idle", "slow", "impatient")


@dataclass
class Row:
    case: str
    requests: int = 0
    codes: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    health: str = ""
    rss: str = ""
    fds: str = ""
    log: str = ""
    after: str = ""
    note: str = ""

    def add(self, code: int | str, seconds: float | None = None) -> None:
        self.requests += 1
        self.codes[str(code)] += 1
        if seconds is not None:
            self.latencies.append(seconds)


# --- the server process, seen from /proc ---------------------------------------------------

def proc_stats(pid: int | None) -> tuple[float, int] | None:
    """(RSS in MiB, open file descriptors) of `pid`, or None without one."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


# --- /health, polled from its own process (the load's GIL and loop do not skew it) -------

def _poll_health(url: str, pid: int | None, stop, out) -> None:
    polls, ok, worst, peak_fds = 0, 0, 0.0, 0
    with httpx.Client(timeout=2.0) as http:
        while not stop.is_set():
            stats = proc_stats(pid)
            peak_fds = max(peak_fds, stats[1] if stats else 0)
            t0 = time.perf_counter()
            try:
                good = http.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                good = False
            worst = max(worst, time.perf_counter() - t0)
            polls, ok = polls + 1, ok + good
            stop.wait(0.1)
    out.put((polls, ok, worst, peak_fds))


class HealthWatch:
    def __init__(self, url: str, pid: int | None) -> None:
        self.stop, self.out = mp.Event(), mp.Queue()
        self.peak_fds = 0
        self.proc = mp.Process(target=_poll_health, args=(url, pid, self.stop, self.out),
                               daemon=True)

    def __enter__(self) -> HealthWatch:
        self.proc.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        try:
            polls, ok, worst, self.peak_fds = self.out.get(timeout=10)
            self.result = f"{ok}/{polls}, worst {worst * 1000:.0f} ms"
        except Exception:  # the poller died: say so rather than guess
            self.result = "poller lost"
        self.proc.join(5)


# --- cases -----------------------------------------------------------------------------------

def _headers(args) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


async def _stream(http: httpx.AsyncClient, body: dict, row: Row, *,
                  stop_after: int | None = None) -> None:
    t0 = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                row.add(r.status_code, time.perf_counter() - t0)
                return
            chunks, done = 0, False
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if '"error"' in line:
                        row.add("in-band error", time.perf_counter() - t0)
                        return
                    done = line == "data: [DONE]"
                if stop_after is not None and chunks >= stop_after:
                    row.add("closed by client", time.perf_counter() - t0)
                    return
            row.add(200 if done else "cut", time.perf_counter() - t0)
    except httpx.HTTPError as exc:
        row.add(f"conn:{type(exc).__name__}", time.perf_counter() - t0)


def _client(args, limit: int, timeout: float = 300.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=args.url, headers=_headers(args), timeout=timeout,
                             limits=httpx.Limits(max_connections=limit,
                                                 max_keepalive_connections=limit))


async def case_streams(args, row: Row) -> None:
    body = {"prompt": "It was a dark and stormy night", "max_tokens": 16,
            "ignore_eos": True, "temperature": 0.8}
    async with _client(args, 300) as http:
        await asyncio.gather(*(_stream(http, body, row) for _ in range(256)))


async def case_disconnects(args, row: Row) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
    async with _client(args, 120) as http:
        await asyncio.gather(*(_stream(http, body, row, stop_after=2) for _ in range(100)))


def hostile_bodies() -> list[tuple[str, bytes, dict]]:
    """(route, raw body, extra headers): what a fuzzer or a broken client sends."""
    c, chat = "/v1/completions", "/v1/chat/completions"
    js = {"content-type": "application/json"}
    deep = b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    out = [
        (c, b'{"prompt": "a\\ud800b", "max_tokens": 1}', js),
        (c, b'{"prompt": ["ok", "\\udfff"], "max_tokens": 1}', js),
        (chat, b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', js),
        (chat, b'{"messages": [{"role": "user", "content": [{"type": "text", '
               b'"text": "\\udc00"}]}]}', js),
        (c, b'{"prompt": "a", "stream": "yes"}', js),
        (c, b'{"prompt": "a", "stream": 1}', js),
        (c, b'{"prompt": "a", "echo": "true"}', js),
        (c, b'{"prompt": "a", "n": 100000}', js),
        (c, b'{"prompt": "a", "max_tokens": 1e400}', js),
        (c, b'{"prompt": "a", "temperature": NaN}', js),
        (c, b'{"prompt": "a", "temperature": Infinity}', js),
        (c, b'{"prompt": "a", "seed": 123456789012345678901234567890}', js),
        (c, b'{"prompt": [1e10]}', js),
        (c, b'{"prompt": [-5]}', js),
        (c, deep, js),
        (c, b'{"prompt": "a", "stop": ["' + b"x" * 100_000 + b'"]}', js),
        (c, b'{"prompt": {"$ne": 1}}', js),
        (c, b'{"prompt": null}', js),
        (c, b'[]', js),
        (c, b'"just a string"', js),
        (c, b'{"prompt": "a",', js),
        (c, b"\xff\xfe\x00garbage", js),
        (c, b'{"prompt": "a"}', {"content-type": "text/plain"}),
        (c, b'{"prompt": "a", "prompt": 5}', js),
        (c, b'{"prompt": "a", "logit_bias": {"50256": 100}}', js),
        (c, b'{"prompt": "a", "tempreature": 0.5}', js),
        (chat, b'{"messages": []}', js),
        (chat, b'{"messages": [{"role": "wizard", "content": "x"}]}', js),
        (chat, b'{"messages": [{"role": "user"}], "max_tokens": 0}', js),
    ]
    return out


async def case_hostile(args, row: Row) -> None:
    async with _client(args, 8, timeout=60) as http:
        for route, raw, headers in hostile_bodies():
            t0 = time.perf_counter()
            try:
                r = await http.post(route, content=raw, headers=headers)
                row.add(r.status_code, time.perf_counter() - t0)
            except httpx.HTTPError as exc:
                row.add(f"conn:{type(exc).__name__}", time.perf_counter() - t0)


async def case_huge(args, row: Row) -> None:
    text = ("It was a dark and stormy night; the rain fell in torrents. " * 66_000)
    body = json.dumps({"prompt": text[:3_900_000], "max_tokens": 1}).encode()

    async def one(http):
        t0 = time.perf_counter()
        try:
            r = await http.post("/v1/completions", content=body,
                                headers={"content-type": "application/json"})
            row.add(r.status_code, time.perf_counter() - t0)
        except httpx.HTTPError as exc:
            row.add(f"conn:{type(exc).__name__}", time.perf_counter() - t0)

    async with _client(args, 8, timeout=300) as http:
        await one(http)  # one alone, then eight at once
        await asyncio.gather(*(one(http) for _ in range(8)))


def _open_idle(host: str, port: int, count: int, open_s: float, hold_s: float, out) -> None:
    """A child process: open up to `count` sockets that never send a byte (for at most
    `open_s` seconds), then hold them `hold_s` seconds more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = min(count, hard - 64)
    socks, failed = [], 0
    deadline = time.monotonic() + open_s
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            socks.append(socket.create_connection((host, port), timeout=1.0))
        except OSError:
            failed += 1
    time.sleep(hold_s)
    closed = 0
    for s in socks:  # how many the server has closed meanwhile (recv gives EOF at once)
        s.setblocking(False)
        try:
            closed += s.recv(1024) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    out.put((len(socks), failed, closed))


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port.split("/")[0])


async def case_idle(args, row: Row) -> None:
    host, port = _host_port(args.url)
    per_child = 5_000  # several children connect in parallel, each below its file limit
    children, out = [], mp.Queue()
    left = args.idle
    while left > 0:
        n = min(per_child, left)
        children.append(mp.Process(target=_open_idle,
                                   args=(host, port, n, args.open_s, args.hold, out)))
        left -= n
    for p in children:
        p.start()
    await _requests_during(args, row, args.open_s / 2 + args.hold)
    opened = failed = closed = 0
    for _ in children:
        o, f, c = out.get(timeout=args.open_s + args.hold + 60)
        opened, failed, closed = opened + o, failed + f, closed + c
    for p in children:
        p.join(10)
    row.note = f"{opened} opened, {failed} failed to connect, {closed} closed by server"


async def _requests_during(args, row: Row, seconds: float) -> None:
    """Plain short completions, one at a time, for `seconds`: the server still serves."""
    async with _client(args, 2, timeout=10) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/completions",
                                    json={"prompt": "the cat", "max_tokens": 2})
                row.add(r.status_code, time.perf_counter() - t0)
            except httpx.HTTPError as exc:
                row.add(f"conn:{type(exc).__name__}", time.perf_counter() - t0)
            await asyncio.sleep(0.5)


async def case_slow(args, row: Row) -> None:
    host, port = _host_port(args.url)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    async def trickle() -> str:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (TimeoutError, OSError):
            return "conn:refused"
        try:
            for i in range(int(args.hold)):
                writer.write(head[i % len(head):i % len(head) + 1])
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(64), 1.0)
                except TimeoutError:
                    continue
                return data[9:12].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
            return "held"
        except OSError:
            return "closed"
        finally:
            writer.close()

    t0 = time.perf_counter()
    results = await asyncio.gather(*(trickle() for _ in range(200)))
    for code in results:
        row.add(code, time.perf_counter() - t0)


async def case_impatient(args, row: Row) -> None:
    long = {"prompt": "It was a dark and stormy night", "max_tokens": 900, "ignore_eos": True}
    async with _client(args, args.slots + 4) as http:
        holders = [asyncio.ensure_future(_stream(http, long, Row("hold"), stop_after=40))
                   for _ in range(args.slots)]
        await asyncio.sleep(2.0)  # the holders are in the slots

        async def impatient(i: int) -> None:
            t0 = time.perf_counter()
            body = {"messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 4}
            try:
                async with httpx.AsyncClient(base_url=args.url, headers=_headers(args),
                                             timeout=1.0) as one:
                    r = await one.post("/v1/chat/completions", json=body)
                row.add(r.status_code, time.perf_counter() - t0)
            except httpx.TimeoutException:
                row.add("gave up", time.perf_counter() - t0)

        await asyncio.gather(*(impatient(i) for i in range(24)))
        await asyncio.gather(*holders)


# --- the run -------------------------------------------------------------------------------

def serving(args) -> str:
    try:
        r = httpx.post(args.url + "/v1/completions", headers=_headers(args), timeout=60,
                       json={"prompt": "the cat", "max_tokens": 2})
        return "yes" if r.status_code == 200 else f"no ({r.status_code})"
    except httpx.HTTPError as exc:
        return f"no ({type(exc).__name__})"


def run_case(args, name: str) -> Row:
    row = Row(name)
    before = proc_stats(args.pid)
    log_before = _size(args.log)
    t0 = time.perf_counter()
    with HealthWatch(args.url, args.pid) as watch:
        try:
            asyncio.run(globals()[f"case_{name}"](args, row))
        except Exception as exc:  # the case itself broke: say so in its row
            row.note = f"case failed: {type(exc).__name__}: {exc}"[:120]
    row.health = watch.result
    time.sleep(1.0)  # let the server close what the case left
    after = proc_stats(args.pid)
    if before and after:
        row.rss = f"{before[0]:.0f} -> {after[0]:.0f}"
        row.fds = f"{before[1]} -> {after[1]} (peak {watch.peak_fds})"
    row.after = serving(args)
    if args.log:
        row.log = f"{(_size(args.log) - log_before) / 1024:.0f}"
    row.note = (row.note + f" ({time.perf_counter() - t0:.0f} s)").strip()
    return row


def _size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0


def percentile(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.0f}"


def table(rows: list[Row]) -> str:
    lines = ["| case | requests | answers by code | p50 ms | p99 ms | /health 200 (worst) "
             "| RSS MiB | fds | log KiB | serving after | note |", "|" + "---|" * 11]
    for r in rows:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r.codes.items()))
        p50 = f"{statistics.median(r.latencies) * 1000:.0f}" if r.latencies else "-"
        lines.append(f"| {r.case} | {r.requests} | {codes} | {p50} | "
                     f"{percentile(r.latencies, 0.99)} | {r.health} | {r.rss} | {r.fds} | "
                     f"{r.log} | {r.after} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, help="the server's pid, for its RSS and open files")
    p.add_argument("--api-key", default=os.environ.get("DEJAVU_API_KEY"))
    p.add_argument("--log", help="the server's log file, to report how much each case adds")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, in order")
    p.add_argument("--slots", type=int, default=8, help="the server's --max-batch")
    p.add_argument("--idle", type=int, default=20_000, help="idle sockets to open")
    p.add_argument("--open-s", type=float, default=60.0,
                   help="seconds at most to open the idle sockets")
    p.add_argument("--hold", type=float, default=20.0,
                   help="seconds idle sockets are held once open, and slow ones trickle")
    args = p.parse_args(argv)
    host, _ = _host_port(args.url)
    if host not in ("127.0.0.1", "localhost", "::1"):
        p.error("loopback only: this floods the server it is pointed at")
    rows = []
    for name in args.cases.split(","):
        if name not in CASES:
            p.error(f"unknown case {name!r}; known: {', '.join(CASES)}")
        rows.append(run_case(args, name))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
