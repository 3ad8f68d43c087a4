"""Sampling parameters and the sampler that turns one row of logits into a token.

Randomness is per request: each request owns a CPU ``torch.Generator`` seeded from its
``seed`` (the scheduler fills in a seed when the user gave none), and every draw happens on
the CPU in float32. So a request samples the same tokens whether the last layer runs
in-process or in the last worker of a pipeline, on any device, whatever else is batched
with it.

The penalties and min-p are applied before ``sample`` sees a row, batched on the device
(runtime/penalties.py); ``sample`` does temperature, top-k, top-p and the draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


class SamplingError(ValueError):
    """A sampling parameter out of range; the message names the field, the value and the
    accepted range."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Return the log-probability of each sampled token and the `logprobs` most likely ones.
    logprobs: int | None = None
    # Return, for every prompt token after the first, its log-probability given the prefix
    # (and the top `logprobs` alternatives): what lm-evaluation-harness needs.
    prompt_logprobs: bool = False
    # Hugging Face / vLLM: a token seen in the prompt or the output has its logit divided
    # by this when positive, multiplied when negative (1 = off).
    repetition_penalty: float = 1.0
    # OpenAI: subtract frequency_penalty x (times the token was generated) and
    # presence_penalty x (whether it was) from its logit; prompt tokens do not count.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # vLLM: drop tokens whose probability (after temperature) is below min_p x the most
    # likely one's (0 = off). Greedy decoding ignores it: the most likely token always stays.
    min_p: float = 0.0

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 0, None)
        _check_float("temperature", self.temperature, 0.0, 100.0)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("top_k", self.top_k, 0, None)
        # [1/10, 10]: a boost as strong as the strongest penalty. Far smaller divisors send
        # logits to infinity and the probabilities to NaN.
        _check_float("repetition_penalty", self.repetition_penalty, 0.1, 10.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, 20)
        if not isinstance(self.stop, tuple) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise SamplingError(f"stop={self.stop!r}: expected a tuple of non-empty strings")
        if len(self.stop) > 16:
            raise SamplingError(f"stop has {len(self.stop)} strings: at most 16 are accepted")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the logits need runtime/penalties.py before ``sample``."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0 or (self.min_p > 0.0 and not self.near_greedy))

    @property
    def near_greedy(self) -> bool:
        # Below 1e-5 the tempered distribution is the argmax to float32 precision, and
        # dividing by such a temperature would overflow (inf/NaN probabilities).
        return self.temperature < 1e-5


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SamplingError(f"{name}={value!r}: expected an integer")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise SamplingError(f"{name}={value}: out of range, expected {bound}")


def _check_float(name: str, value: object, low: float, high: float, *,
                 low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingError(f"{name}={value!r}: expected a number")
    if not math.isfinite(value):
        raise SamplingError(f"{name}={value}: expected a finite number")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise SamplingError(f"{name}={value}: out of range, expected {bracket}{low}, {high}]")


def new_generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row of logits [V]."""
    if params.near_greedy:  # the limit: see SamplingParams.near_greedy
        return int(torch.argmax(logits))
    logits = logits.detach().float().cpu()
    logits = (logits - logits.max()) / params.temperature  # shifted: nothing overflows up
    if params.top_k:
        k = min(params.top_k, logits.numel())
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        cut = before >= params.top_p
        cut[0] = False  # a top_p that rounds to 0 in float32 must still leave one token
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logprobs: Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token, logprob) pairs of one row of log-probabilities [V]."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, k)
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
