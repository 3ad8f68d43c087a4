"""Sparse generation through the in-process engine (scheduler + Stage + lazy K/V)."""

from __future__ import annotations

import torch

from dejavu.runtime.model import Batch, OPTModel, full_positions
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.predictors import PredictorSet
from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.selection import PredictorSelector, SelectionConfig
from dejavu.runtime.sparse import SparseContext
from dejavu.scheduler.engine import Engine

CFG = OPTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=3, ffn_dim=64,
                num_attention_heads=4, max_position_embeddings=48, word_embed_proj_dim=32)


def setup():
    torch.manual_seed(0)
    model = OPTModel(CFG)
    model.init_weights(std=0.2)
    model = model.double().eval()
    preds = PredictorSet.create(model, mlp_rank=8, head_rank=4)
    for m in list(preds.mlp.values()) + list(preds.heads.values()):
        torch.nn.init.normal_(m.up.weight)  # untrained but varied selections
    preds.to("cpu", torch.float64)
    return model, PredictorSelector(preds, SelectionConfig(mlp_density=0.3, head_density=0.5))


def test_sparse_decoding_equals_per_token_sparse_scoring():
    """Fed one token per step, the engine's gathered rows and lazily completed K/V give the
    same logits as whole-window scoring with each token's own selection."""
    model, selector = setup()
    prompt = [2, 17, 5, 33, 8]
    engine = Engine(model, max_batch=1, prefill_chunk=1, selector=selector)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    tokens = engine.generate(prompt, params).tokens
    seq = torch.tensor([prompt + tokens])
    ctx = SparseContext(selector, mode="mask")
    logits = model(seq, Batch(full_positions(1, seq.shape[1], "cpu"), sparse=ctx))
    greedy = logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert greedy == tokens
    dense = Engine(model, max_batch=1).generate(prompt, params).tokens
    assert dense != tokens  # the selection is not a no-op
    stats = engine.stage.sparse_stats
    assert abs(stats.head_density - 0.5) < 1e-9
    assert sum(s.kv_recomputed for s in stats.layers.values()) > 0


def test_density_one_engine_equals_dense_engine():
    model, selector = setup()
    full = PredictorSelector(selector.predictors, SelectionConfig(mlp_density=1.0,
                                                                  head_density=1.0))
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    prompts = [[2, 9, 4], [2, 40, 41, 42, 7]]
    sparse = Engine(model, max_batch=2, selector=full).run(prompts, params)
    dense = Engine(model, max_batch=2).run(prompts, params)
    assert [c.tokens for c in sparse] == [c.tokens for c in dense]
