"""Repetition, frequency and presence penalties and min-p, batched on the device.

The last stage keeps, per KV-cache slot, how often each vocabulary token has been fed as a
prompt token and as an output token of the request in that slot ([S, V] float32 counts on
the stage's device), and each slot's penalty settings. Counting needs no host sync and no
extra copy: the tokens a step feeds are already on the device, and the output token
sampled at step t is fed, and so counted, at step t+1, before step t+1's logits are
penalized. Both updates (``record``, ``apply``) are fixed-shape device ops, so a captured
decode graph runs them too (runtime/graphs.py).

Which fed token is a prompt token: the scheduler feeds a request's prompt (in chunks),
samples its first token after the last chunk, then feeds one output token per step. So
the position after the first sampled row is where outputs begin; the host learns it in
``sampled`` and classifies every later position by it. Positions already counted are not
counted again, so re-running a step (a worker retries a failed batch row by row) changes
nothing.

Semantics, as Hugging Face and vLLM define them (``reference`` below spells them out):
repetition_penalty divides the positive logits and multiplies the negative ones of every
token seen in the prompt or the output; frequency_penalty x count and presence_penalty x
seen (output tokens only, OpenAI's definition) are subtracted; then min-p drops tokens
whose tempered probability is below min_p x the most likely one's, which is the logit
test ``logit < max_logit + temperature x ln(min_p)`` (no softmax needed).

What this module does not know: requests, the scheduler, the random draw (runtime/sampling.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from .sampling import SamplingParams
from .step import Row

NEUTRAL = (1.0, 0.0, 0.0, float("-inf"))  # repetition, frequency, presence, min-p floor


def knobs(params: SamplingParams) -> tuple[float, float, float, float]:
    """One slot's device settings. The min-p floor is temperature x ln(min_p): the logit
    distance below the best one under which a token goes; -inf keeps every token."""
    floor = float("-inf")
    if params.min_p > 0.0 and not params.near_greedy:
        floor = params.temperature * math.log(params.min_p)
    return (params.repetition_penalty, params.frequency_penalty, params.presence_penalty,
            floor)


class SlotPenalties:
    def __init__(self, slots: int, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        # Times each token was fed as a prompt / an output token of the slot's request.
        self.prompt = torch.zeros((slots, vocab_size), dtype=torch.float32, device=device)
        self.output = torch.zeros((slots, vocab_size), dtype=torch.float32, device=device)
        self.knobs = torch.tensor([NEUTRAL] * slots, dtype=torch.float32, device=device)
        # Host bookkeeping per slot: whose counts these are, the first output position
        # (None until the request samples), and the positions counted so far.
        self.owner: list[str | None] = [None] * slots
        self.outputs_from: list[int | None] = [None] * slots
        self.counted: list[int] = [0] * slots

    def release(self, request_ids: Sequence[str]) -> None:
        gone = set(request_ids)
        for slot, owner in enumerate(self.owner):
            if owner in gone:
                self.owner[slot] = None

    def plan(self, rows: Sequence[Row], width: int) -> tuple[Tensor, Tensor, list[int]] | None:
        """Host weights [B, width] (prompt, output) of the tokens ``rows`` feed, and each
        row's counted end to ``commit`` once ``record`` has run; None when no row is
        penalized. A slot taken by a new request is reset here (device ops, no sync)."""
        if not any(row.params.penalized for row in rows):
            return None
        prompt_w = torch.zeros((len(rows), width), dtype=torch.float32)
        output_w = torch.zeros((len(rows), width), dtype=torch.float32)
        ends = []
        for b, row in enumerate(rows):
            end = row.start + len(row.tokens)
            ends.append(end)
            if not row.params.penalized:
                continue
            if self.owner[row.slot] != row.request_id:
                self._claim(row)
            first = max(row.start, self.counted[row.slot])  # later positions are new
            outputs = self.outputs_from[row.slot]
            for pos in range(first, end):
                is_output = outputs is not None and pos >= outputs
                (output_w if is_output else prompt_w)[b, pos - row.start] = 1.0
        return prompt_w, output_w, ends

    def commit(self, rows: Sequence[Row], ends: list[int]) -> None:
        for row, end in zip(rows, ends, strict=True):
            if row.params.penalized:
                self.counted[row.slot] = max(self.counted[row.slot], end)

    def sampled(self, row: Row) -> None:
        """The stage sampled after ``row``: positions from its end on are outputs."""
        if row.params.penalized and self.outputs_from[row.slot] is None:
            self.outputs_from[row.slot] = row.start + len(row.tokens)

    def _claim(self, row: Row) -> None:
        slot = row.slot
        self.owner[slot] = row.request_id
        self.outputs_from[slot] = None
        self.counted[slot] = 0
        self.prompt[slot].zero_()
        self.output[slot].zero_()
        self.knobs[slot] = torch.tensor(knobs(row.params), dtype=torch.float32)

    def record(self, slots: Tensor, ids: Tensor, prompt_w: Tensor, output_w: Tensor) -> None:
        """Count tokens ``ids`` [B, T] of rows in ``slots`` [B] with weights [B, T] (1 to
        count as a prompt / output token, 0 for padding or positions already counted)."""
        index = (slots.unsqueeze(1) * self.vocab_size + ids).reshape(-1)
        self.prompt.view(-1).scatter_add_(0, index, prompt_w.reshape(-1))
        self.output.view(-1).scatter_add_(0, index, output_w.reshape(-1))

    def apply(self, logits: Tensor, slots: Tensor) -> Tensor:
        """Logits [B, V] (float32) of rows in ``slots`` [B] with each slot's penalties and
        min-p applied (filtered tokens at -inf). Only rows of penalized requests are
        meaningful: a slot keeps its last penalized owner's settings and counts until the
        next penalized request claims it, so other rows must be read from the raw logits."""
        rep, freq, pres, floor = self.knobs[slots].unsqueeze(-1).unbind(1)  # each [B, 1]
        out = self.output[slots]
        generated = out > 0
        seen = generated | (self.prompt[slots] > 0)
        penalty = torch.where(seen, rep, 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = logits - freq * out - pres * generated.float()
        cut = logits.amax(dim=-1, keepdim=True) + floor
        return logits.masked_fill(logits < cut, float("-inf"))


def reference(logits: Tensor, prompt: Sequence[int], output: Sequence[int],
              params: SamplingParams) -> Tensor:
    """The same transformation of one row [V], one token at a time, as the definitions
    read: the slow twin that ``SlotPenalties`` is tested against."""
    out = logits.detach().double().cpu().clone()
    for token in set(prompt) | set(output):
        value = float(out[token])
        p = params.repetition_penalty
        out[token] = value / p if value > 0 else value * p
    for token, count in Counter(output).items():
        out[token] -= params.frequency_penalty * count + params.presence_penalty
    if params.min_p > 0.0 and not params.near_greedy:
        probs = torch.softmax(out / params.temperature, dim=-1)
        out[probs < params.min_p * probs.max()] = float("-inf")
    return out.float()
