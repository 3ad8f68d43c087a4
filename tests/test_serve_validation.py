"""reliability.md's bad-input list over HTTP: each case is a 400 (413 for a body over the
limit) with an OpenAI error object naming the field, and nothing reaches the engine."""

from __future__ import annotations

import pytest
from serve_fixtures import MAX_POSITIONS, make_checkpoint, start


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with start(make_checkpoint(tmp_path_factory.mktemp("v") / "tiny"),
               max_body_bytes=64 * 1024) as s:
        yield s


OK = {"prompt": "the cat", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = list(range(10, 10 + MAX_POSITIONS - 4))  # in-vocabulary ids, 4 positions left

COMPLETION_CASES = [
    # (changes to a valid body, the field the error must name)
    ({"prompt": LONG, "max_tokens": 5}, "max_tokens"),
    ({"prompt": list(range(10, 10 + MAX_POSITIONS))}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [5, 100000]}, "prompt"),
    ({"prompt": [5, -1]}, "prompt"),
    ({"prompt": [5, 1.5]}, "prompt"),
    ({"prompt": [5, True]}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 7}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 65}, "n"),
    ({"prompt": ["a", "b", "c"], "n": 30}, "n"),
    ({"stop": ""}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": "x" * 1000}, "stop"),
    ({"logprobs": 21}, "logprobs"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 11}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"best_of": 3}, "best_of"),
    ({"model": "gpt-4"}, "model"),
    ({"tempreature": 0.5}, "tempreature"),
]


@pytest.mark.parametrize(("change", "field"), COMPLETION_CASES,
                         ids=[str(i) for i in range(len(COMPLETION_CASES))])
def test_bad_completion_is_a_400_naming_the_field(served, change, field):
    before = served.client.stats()["requests"]
    r = served.http.post("/v1/completions", json={**OK, **change})
    expected = 404 if field == "model" else 400
    assert r.status_code == expected, r.text
    error = r.json()["error"]
    assert error["param"] == field
    assert error["type"] in ("invalid_request_error", "not_found_error")
    assert (field or "best_of") in error["message"]
    assert served.client.stats()["requests"] == before  # the engine never saw it


@pytest.mark.parametrize("raw, field", [
    ('{"prompt": "a", "temperature": NaN}', "temperature"),
    ('{"prompt": "a", "temperature": Infinity}', "temperature"),
    ('{"prompt": "a", "top_p": -Infinity}', "top_p"),
    ('{"prompt": "a", "top_p": NaN}', "top_p"),
    ('{"prompt": "a", "max_tokens": NaN}', "max_tokens"),
    ('{"prompt": "a", "max_tokens": 1e400}', "max_tokens"),
    ('{"prompt": "a", "frequency_penalty": NaN}', "frequency_penalty"),
    ('{"prompt": "a", "repetition_penalty": Infinity}', "repetition_penalty"),
    ('{"prompt": "a", "min_p": NaN}', "min_p"),
])
def test_nan_and_infinity_are_refused(served, raw, field):
    r = served.http.post("/v1/completions", content=raw,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


CHAT_CASES = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x " * 200}]}, "messages"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": MAX_POSITIONS}, "max_tokens"),
    ({"max_completion_tokens": MAX_POSITIONS}, "max_completion_tokens"),
    ({"temperature": float("-1")}, "temperature"),
    ({"top_logprobs": 25}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"stop": [""]}, "stop"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"min_p": -0.5}, "min_p"),
]


@pytest.mark.parametrize(("change", "field"), CHAT_CASES,
                         ids=[str(i) for i in range(len(CHAT_CASES))])
def test_bad_chat_is_a_400_naming_the_field(served, change, field):
    r = served.http.post("/v1/chat/completions", json={**CHAT, **change})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    assert field in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", ["{", "[1, 2]", '"text"', "", "null", "\xff\xfe"])
def test_malformed_bodies_are_400s(served, raw):
    r = served.http.post("/v1/completions", content=raw.encode("latin-1"),
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_oversized_body_is_413_by_length_or_by_stream(served):
    big = {"prompt": "a" * (70 * 1024)}
    r = served.http.post("/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit must hold on the bytes that arrive
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"a" * 1024
        yield b'"}'

    r = served.http.post("/v1/completions", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    # The server is fine afterwards.
    assert served.http.post("/v1/completions", json=OK).status_code == 200


def test_unknown_route_and_method_are_openai_errors(served):
    r = served.http.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = served.http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
