"""Sampling: parameter validation and the support of the top-k / top-p distributions."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from dejavu.runtime.sampling import SamplingError, SamplingParams, new_generator, sample


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
     ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("top_k", -1), ("top_k", 2.5),
     ("max_new_tokens", -1), ("seed", -3), ("logprobs", 21), ("stop", ("",))],
)
def test_out_of_range_parameters_name_the_field(field, value):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value})


def test_decoding_from_the_wire_validates_too():
    raw = msgspec.msgpack.encode({"temperature": float("nan")})
    with pytest.raises(msgspec.ValidationError, match="temperature"):
        msgspec.msgpack.decode(raw, type=SamplingParams)


def test_greedy_takes_the_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams(), new_generator(0)) == 1


def draws(logits, params, n=400):
    generator = new_generator(5)
    return {sample(logits, params, generator) for _ in range(n)}


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([1.0, 5.0, 4.0, 0.0, 3.0, 2.0])
    assert draws(logits, SamplingParams(temperature=5.0, top_k=3)) == {1, 2, 4}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.75)) == {0, 1}
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.3)) == {0}


def test_same_seed_same_tokens():
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.0)
    a = [sample(logits, params, g) for g in [new_generator(3)] for _ in range(20)]
    b = [sample(logits, params, g) for g in [new_generator(3)] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_extreme_but_valid_parameters_still_sample_the_obvious_token():
    logits = torch.tensor([0.0, 4.0, 1.0, 3.9])
    generator = new_generator(0)
    assert sample(logits, SamplingParams(temperature=1e-300), generator) == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_p=5e-324), generator) == 1
