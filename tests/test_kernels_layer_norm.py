"""The residual add + LayerNorm kernel (kernels/layer_norm.py) vs its PyTorch twin: the sum
exactly as the model's add rounds it, the norm within each dtype's tolerance.

Without a GPU the kernel runs in Triton's interpreter; shapes are irregular (one value per
row, odd and prime hidden sizes)."""

import pytest
import torch

from dejavu.kernels.layer_norm import add_layer_norm, add_layer_norm_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 7), (1, 1, 131), (2, 5, 64), (1, 1, 1000)])
@pytest.mark.parametrize("affine", [True, False])
def test_add_layer_norm_matches_reference(dtype, shape, affine):
    g = torch.Generator().manual_seed(sum(shape))
    c = shape[-1]
    h = (torch.randn(shape, generator=g) * 3 + 1).to(DEVICE, dtype)
    delta = torch.randn(shape, generator=g).to(DEVICE, dtype)
    weight = bias = None
    if affine:
        weight = (1 + 0.3 * torch.randn(c, generator=g)).to(DEVICE, dtype)
        bias = (0.2 * torch.randn(c, generator=g)).to(DEVICE, dtype)
    s, y = add_layer_norm(h, delta, weight, bias, 1e-5)
    s_ref, y_ref = add_layer_norm_reference(h, delta, weight, bias, 1e-5)
    assert s.shape == y.shape == h.shape and s.dtype == y.dtype == dtype
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter rounds float32 to bfloat16 toward zero (a GPU to nearest):
        # one bfloat16 step apart at most.
        torch.testing.assert_close(s.float(), s_ref.float(), atol=0, rtol=2**-7)
    else:
        assert torch.equal(s, s_ref)  # the residual stream is bit for bit the model's
    scale = max(1.0, float(y_ref.float().abs().max()))
    torch.testing.assert_close(y.float(), y_ref.float(), atol=TOL[dtype] * scale,
                               rtol=TOL[dtype])


def test_add_layer_norm_equals_the_modules_norm():
    """Against nn.LayerNorm itself (the model's final_layer_norm), on an OPT-like row."""
    g = torch.Generator().manual_seed(4)
    norm = torch.nn.LayerNorm(320).to(DEVICE, torch.float16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.1)
    h = torch.randn(2, 1, 320, generator=g).to(DEVICE, torch.float16)
    delta = torch.randn(2, 1, 320, generator=g).to(DEVICE, torch.float16)
    with torch.inference_mode():
        s, y = add_layer_norm(h, delta, norm.weight, norm.bias, norm.eps)
        want = norm(h + delta)
    assert torch.equal(s, h + delta)
    torch.testing.assert_close(y.float(), want.float(), atol=4e-3, rtol=2e-3)


def test_bad_arguments():
    h = torch.zeros(2, 8, device=DEVICE, dtype=torch.float16)
    w = torch.ones(8, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="must match"):
        add_layer_norm(h, h.float(), w, w, 1e-5)
    with pytest.raises(ValueError, match="both or neither"):
        add_layer_norm(h, h, w, None, 1e-5)
    with pytest.raises(ValueError, match=r"expected \[8\]"):
        add_layer_norm(h, h, w[:4], w[:4], 1e-5)
