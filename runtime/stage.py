"""Run one ``Step`` through a span of layers: the unit of work of the in-process engine
and of every pipeline worker.

A first stage turns the step's token ids into the residual stream, every stage runs its
layers against its own KV cache, and the last stage turns hidden states into tokens
(sampling with each request's own generator) and, when asked, prompt log-probabilities.
The last stage also keeps each slot's token counts for the penalties (runtime/penalties.py):
the logits of a step's sampled rows are computed in one batch, penalized on the device, and
only then drawn from row by row. Returned log-probabilities are the model's own (before
penalties, as vLLM returns them by default).
This module knows tensors and the model; it knows nothing of sockets or request queues.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .cpu_ops import stage_threads
from .graphs import DecodeGraphs
from .model import Batch, KVCache, OPTModel, to_device
from .penalties import SlotPenalties
from .sampling import new_generator, sample, top_logprobs
from .sparse import Lookahead, Selection, Selector, SparseContext, SparseStats
from .step import Row, Step, StepResult, TokenResult


class Stage:
    def __init__(self, model: OPTModel, cache: KVCache, selector: Selector | None = None,
                 *, cuda_graphs: bool = True, lookahead: bool = False) -> None:
        self.model = model
        self.cache = cache
        # Offloaded layers' big weights are meta tensors (runtime/offload.py): skip them.
        self.device = next(p for p in model.parameters() if not p.is_meta).device
        if self.device.type == "cpu":  # one core left to the rest (cpu_ops.stage_threads)
            torch.set_num_threads(stage_threads())
        self.generators: dict[str, torch.Generator] = {}
        # Contextual sparsity (runtime/sparse.py): None runs dense. ``carry_out`` is what the
        # next stage's first predictor reads; a later stage gets it as ``forward(carry=)``.
        self.selector = selector
        self.sparse_stats = SparseStats()
        self.carry_out: Tensor | None = None
        # Lookahead (runtime/sparse.py ``Lookahead``): offloaded layers start reading their
        # rows one layer early; ``send_ahead`` (set by a worker that is not the last) gets
        # the next stage's first selection before this stage's last MLP block runs.
        self.lookahead = lookahead and selector is not None
        self.send_ahead: Callable[[int, Selection], None] | None = None
        self.penalties = SlotPenalties(cache.slots, model.config.vocab_size, self.device) \
            if model.is_last else None
        # The graph's (raw, penalized) logits, valid for the step object they came from.
        self._graph_logits: tuple[Step, Tensor, Tensor] | None = None
        # Dense decode steps on a GPU replay captured CUDA graphs (runtime/graphs.py).
        self.graphs = DecodeGraphs(model, cache, selector, self.sparse_stats,
                                   self.penalties) if cuda_graphs else None

    def batch(self, step: Step) -> tuple[Tensor, Batch]:
        """Token ids [B, T] (padded with 0) and where each row sits. Padding positions are
        clamped into the cache; they hold garbage that a later real token overwrites
        before any query can see it (queries see only positions <= their own)."""
        width = step.width
        ids = torch.zeros((len(step.rows), width), dtype=torch.long)
        positions = torch.empty((len(step.rows), width), dtype=torch.long)
        for b, row in enumerate(step.rows):
            ids[b, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
            positions[b] = torch.arange(row.start, row.start + width).clamp_(
                max=self.cache.max_len - 1
            )
        slots = torch.tensor([row.slot for row in step.rows], dtype=torch.long)
        sparse = None
        if self.selector is not None:
            sparse = SparseContext(self.selector, stats=self.sparse_stats,
                                   ahead=self._lookahead())
        # The attended length is known here, on the host: no device sync per layer.
        dev = self.device
        return to_device(ids, dev), Batch(to_device(positions, dev), to_device(slots, dev),
                                          self.cache, sparse, length=int(positions.max()) + 1)

    def _lookahead(self) -> Lookahead | None:
        if not self.lookahead:
            return None
        nxt = self.model.layer_ids[-1] + 1
        send = nxt < self.model.config.num_hidden_layers and self.send_ahead is not None
        return Lookahead(layers={layer.layer_id: layer for layer in self.model.layers()
                                 if layer.offloaded is not None},
                         send_layer=nxt if send else None, send=self.send_ahead)

    @torch.inference_mode()
    def forward(self, step: Step, hidden: Tensor | None = None,
                carry: Tensor | None = None,
                given: dict[int, Selection] | None = None) -> Tensor:
        """Token ids in (first stage) or the previous stage's hidden [B, T, C]; returns this
        span's output hidden [B, T, C]. ``given``: selections the previous stage sent
        ahead (its first layer's), used instead of this stage's selector."""
        self.release(step.release)
        self._graph_logits = None
        plan = None if self.penalties is None else self.penalties.plan(step.rows, step.width)
        if self.graphs is not None and not given and self.graphs.accepts(step):
            out = self.graphs.forward(step, hidden, carry, None if plan is None else plan[:2])
            if out is not None:
                self.carry_out = self.graphs.carry_out
                if self.graphs.logits is not None:
                    self._graph_logits = (step, *self.graphs.logits)
                if plan is not None:
                    self.penalties.commit(step.rows, plan[2])
                return out
        ids, batch = self.batch(step)
        if plan is not None:
            weights = to_device(torch.stack(plan[:2]), self.device)
            self.penalties.record(batch.slots, ids, weights[0], weights[1])
            self.penalties.commit(step.rows, plan[2])
        if self.model.is_first:
            hidden = self.model.embed(ids, batch.positions)
        elif hidden is None:
            raise ValueError("a stage without the embeddings needs the previous hidden state")
        if batch.sparse is not None and carry is not None:
            batch.sparse = SparseContext(self.selector, stats=self.sparse_stats,
                                         carry=to_device(carry, self.device),
                                         ahead=batch.sparse.ahead)
        if batch.sparse is not None and given:
            if batch.sparse.ahead is None:
                batch.sparse.ahead = Lookahead()
            batch.sparse.ahead.given.update(given)
        out = self.model.run_layers(to_device(hidden, self.device), batch)
        self.carry_out = batch.sparse.carry_out if batch.sparse is not None else None
        return out

    @torch.inference_mode()
    def finish(self, step: Step, hidden: Tensor) -> StepResult:
        """Last stage only: tokens (and log-probabilities) from the final hidden states."""
        results, errors = [], {}
        logits = self._sampling_logits(step, hidden)
        for b, row in enumerate(step.rows):
            try:
                results.append(self._finish_row(row, hidden[b, : len(row.tokens)],
                                                logits.get(b)))
            except Exception as exc:  # one request's failure must not take the step down
                errors[row.request_id] = f"{type(exc).__name__}: {exc}"
        return StepResult(step.step_id, results, errors)

    def run(self, step: Step) -> StepResult:
        """A stage holding every layer: the whole step in one call."""
        return self.finish(step, self.forward(step))

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)
        if self.penalties is not None:
            self.penalties.release(request_ids)

    def _sampling_logits(self, step: Step, hidden: Tensor
                         ) -> dict[int, tuple[Tensor, Tensor, int] | object]:
        """For each row b that samples: (raw logits [V], the logits to draw from, their
        argmax), all rows' logits computed and penalized as one batch; or ``_GREEDY`` for a
        row that needs only the argmax (eager steps)."""
        graphed = self._graph_logits is not None and self._graph_logits[0] is step
        plain = {} if graphed else {b: _GREEDY for b, row in enumerate(step.rows)
                                    if row.sample and _plain_greedy(row.params)}
        rows = [b for b, row in enumerate(step.rows) if row.sample and b not in plain]
        if not rows:
            return plain
        if graphed:
            index = torch.tensor(rows, device=self.device)
            raw, penalized = (t.index_select(0, index) for t in self._graph_logits[1:])
        else:
            # Row by row, as a one-row step would: a row's tokens must not depend on what
            # else is batched with it (a matrix product's blocking varies with its rows).
            raw = penalized = torch.stack([
                self.model.logits(hidden[b, len(step.rows[b].tokens) - 1]).float()
                for b in rows])
            if self.penalties is not None and any(step.rows[b].params.penalized for b in rows):
                slots = torch.tensor([step.rows[b].slot for b in rows]).to(self.device)
                penalized = self.penalties.apply(raw, slots)
        # A row of a request without penalties reads its raw logits (see SlotPenalties.apply).
        use = [step.rows[b].params.penalized for b in rows]
        chosen = penalized if all(use) else raw
        if any(use) and not all(use):
            chosen = torch.where(torch.tensor(use).to(self.device).unsqueeze(1), penalized, raw)
        best = chosen.argmax(dim=-1).tolist()  # one device read for every greedy row
        return plain | {b: (raw[i], chosen[i], best[i]) for i, b in enumerate(rows)}

    def _finish_row(self, row: Row, hidden: Tensor,
                    logits: tuple[Tensor, Tensor, int] | object | None) -> TokenResult:
        params = row.params
        result = TokenResult(row.request_id)
        if row.score:
            # Position t predicts token t+1: score tokens[1:] and the chunk's successor.
            targets = row.tokens[1:] + ([row.score_next] if row.score_next is not None else [])
            logprobs = torch.log_softmax(self.model.logits(hidden).float(), dim=-1)
            index = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
            picked = logprobs[torch.arange(len(targets), device=logprobs.device), index]
            result.prompt_logprobs = picked.tolist()
            if params.logprobs:
                result.prompt_top = [top_logprobs(logprobs[t], params.logprobs)
                                     for t in range(len(targets))]
            last = logprobs[-1]
        else:
            last = None
        if not row.sample or logits is None:
            return result
        if logits is _GREEDY:  # see _plain_greedy
            # The argmax without every logit in float32 (OPTModel.greedy_tokens).
            result.token = int(self.model.greedy_tokens(hidden[-1:])[0])
            return result
        raw, chosen, best = logits
        generator = self.generators.get(row.request_id)
        if generator is None:
            generator = self.generators[row.request_id] = new_generator(params.seed or 0)
        token = best if params.near_greedy else sample(chosen, params, generator)
        if self.penalties is not None:
            self.penalties.sampled(row)
        result.token = token
        if params.logprobs is not None:
            if last is None:
                last = torch.log_softmax(raw, dim=-1)
            result.logprob = float(last[token])
            result.top = top_logprobs(last, params.logprobs)
        return result


# A row whose token is the plain argmax: greedy, no penalty, no log-probabilities. Its logits
# never need to exist in full (OPTModel.greedy_tokens reads a CPU head mostly in bfloat16).
_GREEDY = object()


def _plain_greedy(params) -> bool:
    return params.near_greedy and not params.penalized and params.logprobs is None


def allocate_cache(model: OPTModel, slots: int, max_len: int, *,
                   keep_inputs: bool = False) -> KVCache:
    """``keep_inputs``: also store attention inputs, so that sparse steps can recompute
    K/V of heads skipped earlier (runtime/sparse.py)."""
    param = next(p for p in model.parameters() if not p.is_meta)  # not an offloaded weight
    return KVCache(model.config, model.layer_ids, slots, max_len, dtype=param.dtype,
                   device=param.device, keep_inputs=keep_inputs)
