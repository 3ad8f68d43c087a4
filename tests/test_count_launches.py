"""Launches per layer of a captured decode step (bench/count_launches.py): on a CPU its
estimate (aten calls that launch plus Triton kernels, in the interpreter), on a GPU the
profiler's device events. What each layer of the graph costs in kernels: the step's
overhead at batch 1 beyond its bytes.

Dense: norm, one q/k/v product, attention writing K/V (two kernels), out_proj, the
residual add with the MLP block's norm, fc1, ReLU, fc2, the residual add. Predictors
(fused selection): the same attention, then one selection kernel and one MLP kernel that
adds the residual; no memsets or density writes per layer."""

import pytest
import torch

from dejavu.bench.count_launches import count_step  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("select,most", [("dense", 10), ("predictors", 8)])
def test_captured_step_launches_per_layer(select, most):
    per_layer = count_step(2, 1, select, DEVICE) - count_step(1, 1, select, DEVICE)
    assert per_layer <= most
