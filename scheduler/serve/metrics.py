"""Prometheus metrics for the HTTP server, in the text exposition format (version 0.0.4).

A few dozen lines instead of a dependency: counters, gauges and histograms with labels,
all touched from the event loop's thread only (so no locks). ``render`` writes them out;
gauges that mirror the engine (worker up, densities, bytes paged, cache hit rate) are set
from ``EngineClient.health()`` / ``stats()`` right before each scrape.

What this module does not know: HTTP, or what the engine's numbers mean.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

# Seconds. Time to first token spans a queue wait; inter-token latency is a decode step.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.doc, self.label_names = name, doc, labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, doc, labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
                for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = float(value)

    def clear(self) -> None:
        self.values = {} if self.label_names else {(): 0.0}


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, doc: str, buckets: Iterable[float]) -> None:
        super().__init__(name, doc)
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            out.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum {_number(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


class ServerMetrics:
    """Every metric the server exports. Names follow Prometheus conventions (base units,
    ``_total`` for counters)."""

    def __init__(self) -> None:
        p = "dejavu_"
        self.running = Gauge(p + "requests_running", "Requests that have produced a token")
        self.waiting = Gauge(p + "requests_waiting", "Requests accepted but not yet started")
        self.requests = Counter(p + "requests_total", "Requests finished, by endpoint and "
                                "finish reason", ("endpoint", "finish_reason"))
        self.failures = Counter(p + "request_failures_total", "Requests refused or failed, "
                                "by reason", ("reason",))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens processed")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Tokens generated")
        self.ttft = Histogram(p + "time_to_first_token_seconds",
                              "Time from admission to the first generated token", TTFT_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request",
                             ITL_BUCKETS)
        self.worker_up = Gauge(p + "worker_up", "1 while the worker (or in-process engine) "
                               "is alive", ("worker",))
        self.worker_restarts = Gauge(p + "worker_restarts_total",
                                     "Times the worker was restarted", ("worker",))
        self.worker_busy = Gauge(p + "worker_busy_fraction", "Part of the last seconds of "
                                 "wall time the worker (pipeline stage) spent computing steps",
                                 ("worker",))
        self.worker_prefetch = Gauge(p + "worker_prefetch", "Lookahead selections and row "
                                     "gathers started ahead of their step, used or wasted, "
                                     "since the worker started", ("worker", "kind", "outcome"))
        self.engine_up = Gauge(p + "engine_up", "1 while the engine can serve requests")
        # Whatever numeric statistics the engine reports (densities, bytes paged per token,
        # cache hit rate, ...), one gauge per key: the front end does not interpret them.
        self.engine_stats = Gauge(p + "engine_stat", "A statistic the engine reports "
                                  "(density, bytes_paged_per_token, cache_hit_rate, ...)",
                                  ("name",))
        # The connection guard's own counts (scheduler/serve/connections.py), read at scrape.
        self.connections_idle = Gauge(p + "connections_idle", "Open connections waiting for "
                                      "a request (new, or kept alive)")
        self.connections_closed = Gauge(p + "connections_closed_total", "Connections the "
                                        "server closed or refused: evicted at "
                                        "max_connections, refused (every one busy), "
                                        "timed_out (408)", ("reason",))

    def all(self) -> list[_Metric]:
        return [self.running, self.waiting, self.requests, self.failures, self.prompt_tokens,
                self.generation_tokens, self.ttft, self.itl, self.engine_up, self.worker_up,
                self.worker_restarts, self.worker_busy, self.worker_prefetch,
                self.engine_stats, self.connections_idle, self.connections_closed]

    def observe_connections(self, stats: dict[str, int]) -> None:
        """The guard's ``stats()``: idle connections now and closes since start, by reason."""
        self.connections_idle.set(float(stats["idle"]))
        for reason in ("evicted", "refused", "timed_out"):
            self.connections_closed.set(float(stats[reason]), reason)

    def observe_engine(self, health_ok: bool, workers: list[dict], stats: dict) -> None:
        self.engine_up.set(1.0 if health_ok else 0.0)
        self.worker_up.clear()
        self.worker_restarts.clear()
        self.worker_busy.clear()
        self.worker_prefetch.clear()
        for i, worker in enumerate(workers):
            name = str(worker.get("worker", i))
            self.worker_up.set(1.0 if worker.get("alive") else 0.0, name)
            self.worker_restarts.set(float(worker.get("restarts", 0)), name)
            if "busy_fraction" in worker:
                self.worker_busy.set(float(worker["busy_fraction"]), name)
                for kind in ("ahead", "prefetch"):
                    for outcome in ("used", "wasted"):
                        self.worker_prefetch.set(float(worker[f"{kind}_{outcome}"]), name,
                                                 kind, outcome)
        self.engine_stats.clear()
        for key, value in _flatten(stats):
            self.engine_stats.set(value, key)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.all():
            lines += metric.header() + metric.lines()
        return "\n".join(lines) + "\n"


def _flatten(stats: dict, prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a (nested) stats dict as ("a_b", value), list items as ("a_0",
    value); other values are skipped."""
    out = []
    for key, value in stats.items():
        name = re.sub(r"[^a-zA-Z0-9_]", "_", f"{prefix}{key}")
        if isinstance(value, dict):
            out += _flatten(value, name + "_")
        elif isinstance(value, (list, tuple)):  # per stage / per worker: name_0, name_1, ...
            out += _flatten({str(i): v for i, v in enumerate(value)}, name + "_")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, float(value)))
    return out
