"""Parity with transformers' OPTForCausalLM on tiny random checkpoints written by
``save_pretrained``: our loader + model give the same logits (float32, 1e-4) for a prompt
and for 32 decode steps through the KV cache, and the same greedy continuation."""

from __future__ import annotations

import pytest
import torch
from opt_fixtures import CONFIGS, save_hf_model

from dejavu.runtime.checkpoint import load_model
from dejavu.runtime.model import Batch, KVCache, full_positions

ATOL = 1e-4
STEPS = 32


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, path)
    assert (path / "model.safetensors").is_file()
    return hf, load_model(path)


def prompt(vocab: int, length: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_prompt_logits_match(pair):
    hf, ours = pair
    ids = prompt(ours.config.vocab_size)
    ref = hf(ids).logits
    got = ours(ids, Batch(full_positions(2, ids.shape[1], "cpu")))
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


@torch.no_grad()
def test_decode_through_kv_cache_matches_and_greedy_agrees(pair):
    hf, ours = pair
    config = ours.config
    ids = prompt(config.vocab_size, length=9)
    b, t = ids.shape
    cache = KVCache(config, ours.layer_ids, slots=4, max_len=t + STEPS, dtype=torch.float32,
                    device="cpu")
    # Use slots 3 and 1: a sequence's slot must not matter.
    slots = torch.tensor([3, 1])
    # transformers' greedy continuation (its own cache), then one forward over the whole
    # sequence without a cache: the reference logits for every position.
    full = hf.generate(ids, do_sample=False, max_new_tokens=STEPS, min_new_tokens=STEPS,
                       pad_token_id=1)
    ref = hf(full).logits
    logits = ours(ids, Batch(full_positions(b, t, "cpu"), slots, cache))
    torch.testing.assert_close(logits, ref[:, :t], rtol=0, atol=ATOL)
    logits = logits[:, -1]
    for step in range(STEPS):
        torch.testing.assert_close(logits, ref[:, t - 1 + step], rtol=0, atol=ATOL)
        # Our greedy choice is transformers' next token.
        assert torch.equal(logits.argmax(-1), full[:, t + step]), f"greedy differs at {step}"
        positions = torch.full((b, 1), t + step)
        logits = ours(full[:, t + step, None], Batch(positions, slots, cache))[:, -1]


@torch.no_grad()
def test_greedy_generate_matches_transformers(pair):
    """The engine's greedy continuation equals transformers' generate token for token."""
    from dejavu.runtime.sampling import SamplingParams
    from dejavu.scheduler.engine import Engine

    hf, ours = pair
    ids = prompt(ours.config.vocab_size, length=7, seed=5)[0]
    ref = hf.generate(ids[None], do_sample=False, max_new_tokens=20, min_new_tokens=20,
                      pad_token_id=1)[0, ids.numel():].tolist()
    engine = Engine(ours, None, max_batch=2)
    params = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    assert engine.generate(ids.tolist(), params).tokens == ref
