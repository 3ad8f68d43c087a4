"""The penalties where users set them: `generate` flags on the shipped model (its greedy text
repeats a sentence; the penalties make it repeat less), the same settings through a real
2-worker pipeline (equal to the in-process engine, mixed settings in one batch), and the
HTTP fields of /v1/completions and /v1/chat/completions (equal to the engine run directly).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from pipeline_fixtures import cluster
from serve_fixtures import make_checkpoint, start
from typer.testing import CliRunner

from dejavu.runtime.checkpoint import load_model
from dejavu.runtime.engine import Engine
from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.settings import DEFAULT_MODEL, REPO_ROOT
from dejavu.runtime.tokenizer import load_tokenizer
from dejavu.scheduler.zmq_client import PipelineConnection
from dejavu.tools.cli import app

SHIPPED = REPO_ROOT / DEFAULT_MODEL
PROMPT = "It was a dark and stormy night"


def repeats(tokens: list[int]) -> tuple[int, int]:
    """(occurrences of trigrams seen before, count of the most frequent token)."""
    trigrams = Counter(zip(tokens, tokens[1:], tokens[2:], strict=False))
    return sum(c - 1 for c in trigrams.values()), max(Counter(tokens).values())


def generate_json(*flags: str) -> dict:
    out = CliRunner().invoke(app, ["generate", "--prompt", PROMPT, "--max-new-tokens", "60",
                                   "--json", "--dense", *flags])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain():
    return generate_json()


def test_generate_flags_make_the_shipped_model_repeat_less(plain):
    trigrams, top = repeats(plain["tokens"])
    assert trigrams >= 10  # the shipped model's greedy text repeats a whole sentence
    for flags in (["--repetition-penalty", "1.3"], ["--frequency-penalty", "1.0"],
                  ["--presence-penalty", "1.0", "--frequency-penalty", "0.5"]):
        got = generate_json(*flags)
        assert got["prompt_tokens"] == plain["prompt_tokens"]
        got_trigrams, got_top = repeats(got["tokens"])
        assert got_trigrams < trigrams // 2 and got_top < top, (flags, got["text"])
    # A negative frequency penalty rewards repetition: the most frequent token gets more so.
    assert repeats(generate_json("--frequency-penalty", "-1.0")["tokens"])[1] > top


def test_generate_refuses_bad_values_naming_the_option():
    for flags, needle in ((["--repetition-penalty", "0"], "--repetition-penalty"),
                          (["--frequency-penalty", "nan"], "--frequency-penalty"),
                          (["--presence-penalty", "2.5"], "--presence-penalty"),
                          (["--min-p", "-0.1"], "--min-p")):
        out = CliRunner().invoke(app, ["generate", "--prompt", PROMPT, *flags])
        assert out.exit_code == 2 and needle in out.output and "Traceback" not in out.output


MIXED = [SamplingParams(max_new_tokens=40, ignore_eos=True),
         SamplingParams(max_new_tokens=40, ignore_eos=True, repetition_penalty=1.3),
         SamplingParams(max_new_tokens=40, ignore_eos=True, frequency_penalty=1.0),
         SamplingParams(max_new_tokens=40, ignore_eos=True, presence_penalty=1.5),
         SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.8, min_p=0.1,
                        repetition_penalty=1.2, seed=7)]


def test_two_workers_apply_the_penalties_as_the_engine_does(plain):
    """The settings cross the wire to the last worker, which counts and penalizes per slot:
    the same tokens as the in-process engine (dense, as the pipeline here), all at once."""
    prompts = [plain["prompt_tokens"], [2, 133, 44, 509, 17]] * 3
    params = (MIXED * 2)[: len(prompts)]
    engine = Engine(load_model(SHIPPED), max_batch=4, max_len=128)
    want = [c.tokens for c in engine.run(prompts, params)]
    assert want[0] == plain["tokens"][:40]
    with cluster(SHIPPED, 2, slots=4) as c, PipelineConnection(c.address) as conn:
        got = [c.tokens for c in conn.run(prompts, params)]
    assert got == want
    assert repeats(got[1])[0] < repeats(got[0])[0]
    assert repeats(got[2])[1] < repeats(got[0])[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with start(make_checkpoint(tmp_path_factory.mktemp("pen") / "tiny")) as s:
        yield s


def test_http_fields_reach_the_engine(served):
    engine = Engine(load_model(served.model_dir), load_tokenizer(served.model_dir),
                    max_batch=2)
    fields = {"repetition_penalty": 1.6, "frequency_penalty": 1.1, "presence_penalty": -0.3,
              "min_p": 0.05}
    ids = served.tokenizer.encode("the cat sat on the mat")
    for temperature, seed in ((0.0, None), (0.9, 5)):
        r = served.http.post("/v1/completions", json={
            "prompt": "the cat sat on the mat", "max_tokens": 12, "temperature": temperature,
            "ignore_eos": True, **({"seed": seed} if seed is not None else {}), **fields})
        assert r.status_code == 200, r.text
        want = engine.generate(ids, SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                   temperature=temperature, seed=seed,
                                                   **fields))
        assert r.json()["choices"][0]["text"] == want.text
    plain = engine.generate(ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert plain.text != engine.generate(ids, SamplingParams(
        max_new_tokens=12, ignore_eos=True, **fields)).text  # the fields change the text
    messages = [{"role": "user", "content": "the dog ran in the park"}]
    chat = {"messages": messages, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    with_fields = served.http.post("/v1/chat/completions", json={**chat, **fields})
    without = served.http.post("/v1/chat/completions", json=chat)
    assert with_fields.status_code == without.status_code == 200, with_fields.text
    transcript = served.tokenizer.encode("User: the dog ran in the park\nAssistant:")
    want = engine.generate(transcript, SamplingParams(max_new_tokens=10, ignore_eos=True,
                                                      stop=("\nUser:",), **fields))
    assert with_fields.json()["choices"][0]["message"]["content"] == want.text.lstrip()
    assert with_fields.json()["choices"][0]["message"]["content"] != \
        without.json()["choices"][0]["message"]["content"]
