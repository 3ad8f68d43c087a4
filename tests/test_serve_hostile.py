"""`dejavu-run serve` (one real process) against clients that misbehave: impatient clients
that give up while their request waits for a slot, idle and slow sockets, huge prompts,
hostile bodies. After each, the server still serves and /health is 200."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve_process import serve_process

LONG_STREAM = {"prompt": "It was a dark and stormy night", "max_tokens": 1000,
               "temperature": 0, "ignore_eos": True, "stream": True}


def test_impatient_clients_waiting_for_a_slot_do_not_kill_the_engine(tmp_path):
    # The shipped model with one KV slot: one long stream holds it, so every other request
    # waits in the scheduler's queue until its client gives up and disconnects.
    with serve_process(["--max-batch", "1"], tmp_path) as s, \
            httpx.Client(base_url=s.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=LONG_STREAM) as holder:
            assert holder.status_code == 200
            lines = holder.iter_lines()
            next(lines)  # the long request is in the slot and generating
            outcomes: list[str] = []

            def impatient(i: int) -> None:
                body = {"messages": [{"role": "user", "content": f"hello {i}"}],
                        "max_tokens": 4}
                try:
                    r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=1.0)
                    outcomes.append(str(r.status_code))
                except httpx.TimeoutException:
                    outcomes.append("timeout")

            threads = [threading.Thread(target=impatient, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert outcomes == ["timeout"] * 12, outcomes
            time.sleep(0.5)  # the server sees the disconnects and aborts the waiting requests
        # Closing the holder frees the slot: the scheduler admits from its queue next.
        r = http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 3,
                                               "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
        health = http.get("/health")
        assert health.status_code == 200, health.text
        assert "engine thread died" not in s.output()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
