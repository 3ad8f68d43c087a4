"""The HTTP server against a live socket: completions (text and token prompts, batched, n,
seeds, stop strings, echo + logprobs), chat, streaming, the model list and metrics.
Results are compared with the in-process engine run directly and with a plain forward pass.
"""

from __future__ import annotations

import json

import httpx
import pytest
from serve_fixtures import make_checkpoint, reference_logprobs, start

from dejavu.runtime.checkpoint import load_model
from dejavu.runtime.sampling import SamplingParams
from dejavu.scheduler.engine import Engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def served(model_dir):
    with start(model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def engine(served):
    """A second engine over the same weights: what the server should reproduce."""
    return Engine(load_model(served.model_dir), served.tokenizer, max_batch=2)


def post(served, path: str, body: dict, **kw) -> httpx.Response:
    return served.http.post(path, json=body, **kw)


def sse_events(response: httpx.Response) -> list:
    """The JSON objects of an SSE body, and the literal [DONE] last."""
    out = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_lists_the_served_model(served):
    r = served.http.get("/v1/models")
    assert r.status_code == 200
    [model] = r.json()["data"]
    assert model["id"] == "tiny-opt" and model["max_model_len"] == 96


def test_greedy_completion_matches_the_engine(served, engine):
    r = post(served, "/v1/completions", {"prompt": "the cat sat", "max_tokens": 8,
                                         "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = served.tokenizer.encode("the cat sat")
    want = engine.generate(ids, SamplingParams(max_new_tokens=8, ignore_eos=True))
    [choice] = body["choices"]
    assert choice["text"] == want.text and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8,
                             "total_tokens": len(ids) + 8}


def test_echo_logprobs_are_the_prompt_scores_aligned_to_positions(served):
    ids = served.tokenizer.encode("a dog ran in the park")
    r = post(served, "/v1/completions", {"prompt": ids, "max_tokens": 1, "temperature": 0,
                                         "echo": True, "logprobs": 3})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1  # the prompt, then the generated token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = reference_logprobs(served.model_dir, ids)
    got = lp["token_logprobs"][1:len(ids)]
    assert got == pytest.approx(want, abs=1e-4)
    for t in range(1, len(ids) + 1):
        top = lp["top_logprobs"][t]
        assert 1 <= len(top) <= 3
        # The most likely alternative is at least as likely as the actual token.
        assert max(top.values()) >= lp["token_logprobs"][t] - 1e-6
    # The generated (greedy) token is the top alternative at its position.
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()))
    # text_offset points into the echoed text (BOS renders as nothing).
    text = r.json()["choices"][0]["text"]
    assert text.startswith("a dog ran in the park")
    for token, at in zip(lp["tokens"][1:], lp["text_offset"][1:], strict=True):
        if not token.startswith("bytes:"):
            assert text[at:at + len(token)] == token


def test_echo_scores_a_prompt_split_into_prefill_chunks(model_dir):
    """A prompt longer than the prefill chunk is scored across steps; the scores still
    line up with the whole-window reference."""
    with start(model_dir, prefill_chunk=7) as s:
        ids = s.tokenizer.encode("the cat sat on the mat and looked at the dog in the park")
        assert len(ids) > 14
        r = s.http.post("/v1/completions", json={
            "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}, timeout=30)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids)  # max_tokens 0: the prompt only
    assert lp["token_logprobs"][1:] == pytest.approx(reference_logprobs(model_dir, ids),
                                                     abs=1e-4)


def test_batched_prompts_and_n_match_single_requests(served):
    prompts = ["the cat", "a dog ran"]
    r = post(served, "/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 5,
                                         "temperature": 0.8, "seed": 11, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        prompt, j = prompts[c["index"] // 2], c["index"] % 2
        single = post(served, "/v1/completions", {"prompt": prompt, "max_tokens": 5,
                                                  "temperature": 0.8, "seed": 11 + j,
                                                  "ignore_eos": True}).json()
        assert c["text"] == single["choices"][0]["text"]
    # Choice j of a prompt uses seed + j: the two samples of one prompt differ.
    assert choices[0]["text"] != choices[1]["text"]


def test_token_prompts_batched_equal_text_prompts(served):
    ids = [served.tokenizer.encode(p) for p in ("the cat", "numbers like")]
    body = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    by_ids = post(served, "/v1/completions", {**body, "prompt": ids}).json()
    by_text = post(served, "/v1/completions", {**body, "prompt": ["the cat", "numbers like"]})
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in
                                                      by_text.json()["choices"]]


def test_same_seed_same_sample(served):
    body = {"prompt": "the", "max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "top_k": 50,
            "seed": 5, "ignore_eos": True}
    a = post(served, "/v1/completions", body).json()["choices"][0]["text"]
    b = post(served, "/v1/completions", body).json()["choices"][0]["text"]
    c = post(served, "/v1/completions", {**body, "seed": 6}).json()["choices"][0]["text"]
    assert a == b and a != c


def test_stop_string_cuts_the_text(served):
    body = {"prompt": "the cat", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = post(served, "/v1/completions", body).json()["choices"][0]["text"]
    stop = full[4:6]
    assert stop and full.find(stop) == 4, full
    cut = post(served, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[:4] and cut["finish_reason"] == "stop"


def test_streamed_completion_equals_the_whole_one(served):
    body = {"prompt": "a dog", "max_tokens": 7, "temperature": 0, "ignore_eos": True,
            "logprobs": 1}
    whole = post(served, "/v1/completions", body).json()
    r = post(served, "/v1/completions", {**body, "stream": True,
                                         "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    chunks = events[:-2]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    streamed_lp = [x for c in chunks for x in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed_lp == pytest.approx(whole["choices"][0]["logprobs"]["token_logprobs"])


def test_chat_completion_and_its_stream_agree(served):
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "hello there"}],
            "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    whole = post(served, "/v1/chat/completions", body)
    assert whole.status_code == 200, whole.text
    message = whole.json()["choices"][0]["message"]
    assert message["role"] == "assistant"
    events = sse_events(post(served, "/v1/chat/completions", {**body, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.json()["choices"][0][
        "finish_reason"]


def test_chat_prompt_is_the_base_model_transcript(served, engine):
    """The chat template renders a transcript ending in 'Assistant:'; the reply is the
    engine's continuation of exactly that text."""
    from dejavu.scheduler.serve.chat_template import render_chat
    from dejavu.scheduler.serve.schema import ChatMessage

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "how are you"}]
    text = render_chat([ChatMessage(**m) for m in messages])
    assert text == "User: hi\nAssistant: hello\nUser: how are you\nAssistant:"
    r = post(served, "/v1/chat/completions", {"messages": messages, "max_tokens": 5,
                                              "temperature": 0, "ignore_eos": True})
    want = engine.generate(served.tokenizer.encode(text),
                           SamplingParams(max_new_tokens=5, ignore_eos=True,
                                          stop=("\nUser:",)))
    assert r.json()["choices"][0]["message"]["content"] == want.text.lstrip()
    assert r.json()["usage"]["prompt_tokens"] == len(served.tokenizer.encode(text))


def test_chat_logprobs(served):
    r = post(served, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
        "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for item in content:
        assert len(item["top_logprobs"]) == 2
        assert item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"])
        assert isinstance(item["bytes"], list)


def test_metrics_count_what_happened(served):
    before = parse_metrics(served.http.get("/metrics").text)
    post(served, "/v1/completions", {"prompt": "the", "max_tokens": 4, "temperature": 0,
                                     "ignore_eos": True})
    post(served, "/v1/completions", {"prompt": "the", "temperature": -1})
    after = parse_metrics(served.http.get("/metrics").text)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("dejavu_generation_tokens_total") == 4
    assert delta("dejavu_time_to_first_token_seconds_count") == 1
    assert delta("dejavu_inter_token_latency_seconds_count") == 3
    assert delta('dejavu_requests_total{endpoint="completions",finish_reason="length"}') == 1
    assert delta('dejavu_request_failures_total{reason="invalid"}') == 1
    assert after['dejavu_worker_up{worker="0"}'] == 1 and after["dejavu_engine_up"] == 1
    assert after["dejavu_requests_running"] == 0 and after["dejavu_requests_waiting"] == 0


def test_metrics_export_what_the_engine_reports(model_dir):
    class Reporting:  # the real client, plus the statistics a sparse engine reports
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def stats(self):
            return {**self.inner.stats(), "mlp_density": 0.125,
                    "bytes_paged_per_token": 4096, "cache_hit_rate": 0.75,
                    "stage_ms": [1.5, 2.5], "note": "not a number"}

    with start(model_dir, wrap=Reporting) as s:
        m = parse_metrics(s.http.get("/metrics").text)
    assert m['dejavu_engine_stat{name="mlp_density"}'] == 0.125
    assert m['dejavu_engine_stat{name="bytes_paged_per_token"}'] == 4096
    assert m['dejavu_engine_stat{name="cache_hit_rate"}'] == 0.75
    assert m['dejavu_engine_stat{name="stage_ms_1"}'] == 2.5
    assert not any("note" in key for key in m)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format, strictly: every sample belongs to a declared family."""
    import re

    families, out = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            families[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)', line)
        assert m, line
        name = m.group(1)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in families or base in families, f"undeclared sample {line}"
        out[name + (m.group(2) or "")] = float(m.group(3))
    return out


def test_streamed_choices_interleave_but_each_equals_its_whole(served):
    body = {"prompt": ["the cat", "a dog"], "n": 2, "max_tokens": 6, "temperature": 0.7,
            "seed": 3, "ignore_eos": True, "logprobs": 0}
    whole = post(served, "/v1/completions", body).json()["choices"]
    events = sse_events(post(served, "/v1/completions", {**body, "stream": True}))
    texts, lps = {}, {}
    for e in events[:-1]:
        c = e["choices"][0]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        lps.setdefault(c["index"], []).extend(c["logprobs"]["token_logprobs"])
    for c in whole:
        assert texts[c["index"]] == c["text"]
        assert lps[c["index"]] == pytest.approx(c["logprobs"]["token_logprobs"])
