"""bench/profile_step.py measures what the timed decode steps compute, not the prompt."""

import torch

from dejavu.bench.profile_step import profile_batch
from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig


def test_measured_density_is_the_decode_steps_own():
    # A 32-token prompt selects a union of 32 random 10% draws (about 97%: run dense);
    # averaged in, it made a 0.1 selector read as 0.6.
    config = OPTConfig(hidden_size=32, num_attention_heads=2, ffn_dim=200, num_hidden_layers=2,
                       vocab_size=1100, max_position_embeddings=256, word_embed_proj_dim=32)
    model = OPTModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval().requires_grad_(False)
    row = profile_batch(model, 1, 3, torch.device("cpu"), None, mlp_density=0.1)
    assert row["measured_mlp_density"] == 0.1
    assert row["measured_mlp_density_eager"] == 0.1


def test_calibrated_predictors_select_about_the_density():
    config = OPTConfig(hidden_size=32, num_attention_heads=2, ffn_dim=200, num_hidden_layers=2,
                       vocab_size=1100, max_position_embeddings=256, word_embed_proj_dim=32)
    model = OPTModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval().requires_grad_(False)
    row = profile_batch(model, 1, 4, torch.device("cpu"), None, mlp_density=0.1,
                        select="predictors")
    assert row["select"] == "predictors"
    assert 0.03 < row["measured_mlp_density"] < 0.3
