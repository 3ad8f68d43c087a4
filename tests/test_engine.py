"""The in-process engine: continuous batching, chunked prefill, slot reuse, sampling and
prompt scoring, against transformers' OPTForCausalLM and against itself run one request
at a time. Tiny random models, CPU, float32."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.sampling import SamplingParams
from dejavu.scheduler.client import LocalClient
from dejavu.scheduler.core import RequestError
from dejavu.scheduler.engine import Engine

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hc = transformers.OPTConfig(vocab_size=211, hidden_size=48, num_hidden_layers=3,
                                ffn_dim=112, num_attention_heads=3, max_position_embeddings=96,
                                dropout=0.0)
    hf = transformers.OPTForCausalLM(hc).eval()
    model = OPTModel(OPTConfig.from_hf_dict(hc.to_dict())).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return hf, model


PROMPTS = [[2, 5, 9, 100, 7, 8, 9, 10, 11, 12, 13], [2, 44], [2, 3, 4, 5, 6], [2, 199, 1, 1, 3]]


def hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_batched_chunked_greedy_equals_transformers(pair):
    hf, model = pair
    # 3 slots for 4 prompts (one waits for a slot), prompts split in chunks of 4.
    engine = Engine(model, max_batch=3, prefill_chunk=4)
    got = engine.run(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True))
    for prompt, completion in zip(PROMPTS, got, strict=True):
        assert completion.finish_reason == "length"
        assert completion.tokens == hf_greedy(hf, prompt, 16)


def test_prompt_logprobs_equal_a_direct_log_softmax(pair):
    hf, model = pair
    engine = Engine(model, max_batch=2, prefill_chunk=3)
    got = engine.run(PROMPTS, SamplingParams(max_new_tokens=1, prompt_logprobs=True))
    for prompt, completion in zip(PROMPTS, got, strict=True):
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], dim=-1)
        expected = logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert len(completion.prompt_logprobs) == len(prompt) - 1
        torch.testing.assert_close(torch.tensor(completion.prompt_logprobs), expected,
                                   atol=1e-5, rtol=0)


def test_sampling_does_not_depend_on_what_else_is_batched(pair):
    _, model = pair
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=11,
                            ignore_eos=True)
    alone = Engine(model, max_batch=4).generate([2, 8, 9], params).tokens
    crowd = Engine(model, max_batch=4).run(
        [[2, 5], [2, 8, 9], [2, 7, 7, 7]],
        [SamplingParams(max_new_tokens=5, temperature=1.0, seed=1), params,
         SamplingParams(max_new_tokens=20)])
    assert crowd[1].tokens == alone
    other_seed = Engine(model, max_batch=4).generate(
        [2, 8, 9], SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9,
                                  seed=12, ignore_eos=True)).tokens
    assert other_seed != alone


def test_a_reused_slot_does_not_see_its_previous_owner(pair):
    _, model = pair
    engine = Engine(model, max_batch=1)
    engine.generate(list(range(2, 60)), SamplingParams(max_new_tokens=4))  # fills slot 0
    reused = engine.generate([2, 44], SamplingParams(max_new_tokens=8, ignore_eos=True))
    fresh = Engine(model, max_batch=1).generate([2, 44], SamplingParams(max_new_tokens=8,
                                                                         ignore_eos=True))
    assert reused.tokens == fresh.tokens


def test_request_errors_name_the_problem(pair):
    _, model = pair
    engine = Engine(model, max_batch=1)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.generate([2, 211], SamplingParams())
    with pytest.raises(RequestError, match="exceeds the model's 96 positions"):
        engine.generate([2] * 90, SamplingParams(max_new_tokens=7))


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(pair, monkeypatch):
    _, model = pair
    engine = Engine(model, max_batch=2)
    real_run = engine.stage.run
    calls = {"n": 0}

    def flaky(step):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_run(step)

    monkeypatch.setattr(engine.stage, "run", flaky)
    got = engine.run([[2, 5, 6]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert got.finish_reason == "error" and "out of memory" in got.error
    assert engine.scheduler.free_slots and not engine.scheduler.in_flight
    again = engine.generate([2, 5, 6], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert again.finish_reason == "length" and len(again.tokens) == 4


def test_local_client_streams_concurrent_requests_and_cancels(pair):
    _, model = pair
    expected = Engine(model, max_batch=4).run(
        PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))

    async def main():
        client = LocalClient(Engine(model, max_batch=2))

        async def one(i, prompt):
            tokens = []
            async for event in client.generate(prompt, SamplingParams(max_new_tokens=10,
                                                                      ignore_eos=True), f"r{i}"):
                if event.token is not None:
                    tokens.append(event.token)
            return tokens

        got = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
        stream = client.generate([2, 3], SamplingParams(max_new_tokens=80, ignore_eos=True), "x")
        await stream.__anext__()
        await stream.aclose()  # the consumer leaves: the request must be aborted
        for _ in range(100):
            if len(client.engine.scheduler.free_slots) == 2:
                break
            await asyncio.sleep(0.02)
        free = len(client.engine.scheduler.free_slots)
        await client.close()
        return got, free

    got, free = asyncio.run(main())
    assert got == [c.tokens for c in expected]
    assert free == 2
