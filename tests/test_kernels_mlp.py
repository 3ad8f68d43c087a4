"""Sparse MLP kernel vs its PyTorch reference (and the reference vs the model's dense MLP).

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported); shapes stay tiny there. GPU tests (marked) use OPT-like sizes and read
rows from mapped pinned host memory too.
"""

import pytest
import torch

from dejavu.kernels.mlp_chained import mlp_workspace, workspace_numel  # noqa: E402
from dejavu.kernels.sparse_mlp import NeuronRows, sparse_mlp, sparse_mlp_reference  # noqa: E402
from dejavu.runtime.weight_store import RecordLayout, neuron_rows, pack_neurons  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error ||out - ref|| / ||ref||: the kernel rounds the same intermediates as the
# reference, so the difference is accumulation order plus one final rounding.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make(b, c, f, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, generator=g).to(dtype)
    w1 = (torch.randn(f, c, generator=g) * c**-0.5).to(dtype)
    b1 = (torch.randn(f, generator=g) * 0.1).to(dtype)
    w2t = (torch.randn(f, c, generator=g) * f**-0.5).to(dtype)
    b2 = (torch.randn(c, generator=g) * 0.1).to(dtype)
    return [t.to(device) for t in (x, w1, b1, w2t, b2)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c,f,k", [(1, 16, 7, 1), (3, 67, 53, 19), (5, 40, 31, 31)])
def test_split_layout_matches_reference(dtype, b, c, f, k):
    x, w1, b1, w2t, b2 = make(b, c, f, dtype)
    idx = torch.randperm(f, generator=torch.Generator().manual_seed(1))[:k].int().to(DEVICE)
    res = torch.randn(b, c).to(dtype).to(DEVICE)
    out = sparse_mlp(x, NeuronRows(w1, w2t, b1), idx, bias2=b2, residual=res, block_c=32)
    ref = sparse_mlp_reference(x, w1, b1, w2t, idx, b2, res)
    assert out.shape == (b, c) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_n", [4, 8])
def test_batch_one_multiply_reduce_path(dtype, block_n):
    x, w1, b1, w2t, b2 = make(1, 37, 23, dtype, seed=7)
    idx = torch.tensor([22, 0, 5, 13, 7, 19, 2, 11, 3], dtype=torch.int64, device=DEVICE)
    out = sparse_mlp(x, NeuronRows(w1, w2t, b1), idx, bias2=b2, block_n=block_n, block_c=16)
    assert rel_err(out, sparse_mlp_reference(x, w1, b1, w2t, idx, b2)) < TOL[dtype]
    with pytest.raises(ValueError, match="batch 1"):
        sparse_mlp(torch.cat([x, x]), NeuronRows(w1, w2t, b1), idx, block_n=block_n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c,f,k", [(1, 40, 23, 9), (4, 67, 53, 37)])
def test_split_kernels_match_reference(dtype, b, c, f, k):
    x, w1, b1, w2t, b2 = make(b, c, f, dtype, seed=11)
    idx = torch.randperm(f, generator=torch.Generator().manual_seed(2))[:k].int().to(DEVICE)
    res = torch.randn(b, c).to(dtype).to(DEVICE)
    out = sparse_mlp(x, NeuronRows(w1, w2t, b1), idx, bias2=b2, residual=res, split_c=32)
    assert rel_err(out, sparse_mlp_reference(x, w1, b1, w2t, idx, b2, res)) < TOL[dtype]


def test_split_kernels_with_device_count_and_host_table():
    # Only the first `count` locs are valid (a compacted selection); the rest is garbage
    # that must be ignored. Half the rows come from the host table.
    dtype = torch.float16
    b, c, f = 2, 48, 31
    x, w1, b1, w2t, b2 = make(b, c, f, dtype, device="cpu", seed=4)
    lay = RecordLayout(hidden=c, ffn=f, heads=4)
    rec = pack_neurons(w1, b1, w2t.T, torch.empty(f, lay.neuron_len, dtype=dtype))
    hot = torch.tensor([1, 8, 30])
    sel = torch.tensor([8, 2, 30, 17, 5])
    locs = torch.tensor([1, -3, 2, -18, -6, 0, 2, -1], dtype=torch.int32)  # 3 garbage
    count = torch.tensor([5], dtype=torch.int32)
    out = sparse_mlp(x.to(DEVICE), neuron_rows(rec[hot].clone().to(DEVICE), c),
                     locs.to(DEVICE), host=neuron_rows(rec.to(DEVICE), c), split_c=16,
                     count=count.to(DEVICE))
    assert rel_err(out.cpu(), sparse_mlp_reference(x, w1, b1, w2t, sel)) < TOL[dtype]
    with pytest.raises(ValueError, match="split"):
        sparse_mlp(x.to(DEVICE), neuron_rows(rec.to(DEVICE), c), locs.to(DEVICE),
                   count=count.to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c,f,k,n2,c2,pf", [(1, 40, 23, 9, 16, 16, True),
                                              (1, 131, 97, 61, 32, 64, False),
                                              (3, 67, 53, 37, 32, 16, True),
                                              (16, 48, 64, 64, 16, 32, False)])
def test_chained_kernel_matches_reference(dtype, b, c, f, k, n2, c2, pf):
    # One launch: fc1 tiles, fc2 tiles waiting on device counters, the epilogue by the last
    # fc2 tile of each column chunk. Irregular C and K leave partial tiles on both axes.
    x, w1, b1, w2t, b2 = make(b, c, f, dtype, seed=5 + b)
    idx = torch.randperm(f, generator=torch.Generator().manual_seed(k))[:k].int().to(DEVICE)
    res = torch.randn(b, c).to(dtype).to(DEVICE)
    out = sparse_mlp(x, NeuronRows(w1, w2t, b1), idx, bias2=b2, residual=res, chained=True,
                     block_n=16, split_c=32, block_n2=n2, split_c2=c2, prefetch=pf)
    assert out.shape == (b, c) and out.dtype == dtype
    assert rel_err(out, sparse_mlp_reference(x, w1, b1, w2t, idx, b2, res)) < TOL[dtype]


@pytest.mark.parametrize("b", [1, 3])
def test_chained_kernel_in_a_workspace_the_caller_zeroes(b):
    # clean=False: the kernel skips the reset (a captured step zeroes every layer's
    # workspace in one memset); the result is the clean kernel's, with a count on the device.
    dtype = torch.float16
    c, f = 72, 90
    x, w1, b1, w2t, b2 = make(b, c, f, dtype, seed=3)
    rows = NeuronRows(w1, w2t, b1)
    res = torch.randn(b, c, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    idx = torch.randperm(f, generator=torch.Generator().manual_seed(5)).int().to(DEVICE)
    count = torch.tensor([41], dtype=torch.int32, device=DEVICE)
    kw = dict(bias2=b2, residual=res, count=count, chained=True, block_n=16, split_c=16,
              block_n2=32, split_c2=16)
    ws = torch.zeros((2, workspace_numel(b, c, f)), dtype=torch.int32, device=DEVICE)
    out = sparse_mlp(x, rows, idx, workspace=ws[0], clean=False, **kw)
    want = sparse_mlp_reference(x, w1, b1, w2t, idx[:41], b2, res)
    assert rel_err(out, want) < TOL[dtype]
    assert ws[0].any() and not ws[1].any()  # used as it was left, its neighbour untouched


def test_chained_kernel_workspace_is_left_zero_and_reused():
    # A caller-owned workspace saves the per-call memset only if every call leaves it zero:
    # reuse one across calls of different batch, selection size and block shapes.
    dtype = torch.float16
    c, f = 72, 90
    x, w1, b1, w2t, b2 = make(16, c, f, dtype, seed=9)
    rows = NeuronRows(w1, w2t, b1)
    ws = mlp_workspace(16, c, f, DEVICE)
    for b, k, n1, n2, c2 in [(1, 50, 16, 32, 16), (5, 90, 16, 16, 64), (1, 7, 32, 64, 32),
                             (16, 33, 16, 16, 16)]:
        idx = torch.randperm(f, generator=torch.Generator().manual_seed(b + k))[:k]
        idx = idx.int().to(DEVICE)
        out = sparse_mlp(x[:b], rows, idx, bias2=b2, chained=True, block_n=n1, split_c=16,
                         block_n2=n2, split_c2=c2, workspace=ws)
        assert rel_err(out, sparse_mlp_reference(x[:b], w1, b1, w2t, idx, b2)) < TOL[dtype]
        assert int(torch.count_nonzero(ws)) == 0, f"workspace dirty after b={b} k={k}"
    with pytest.raises(ValueError, match="workspace"):
        sparse_mlp(x, rows, idx, chained=True, workspace=ws[:10])
    with pytest.raises(ValueError, match="workspace"):
        sparse_mlp(x, rows, idx, split_c=16, workspace=ws)
    with pytest.raises(ValueError, match="block_n2"):
        sparse_mlp(x, rows, idx, chained=True, block_n=32, block_n2=16)
    with pytest.raises(ValueError, match="power of two"):
        sparse_mlp(x, rows, idx, chained=True, block_n=24)


@pytest.mark.parametrize("b", [1, 2])
def test_chained_kernel_with_device_count_and_host_table(b):
    # Only the first `count` locs are valid; half the rows come from the host table. A
    # count of zero leaves residual + bias2.
    dtype = torch.float16
    c, f = 48, 31
    x, w1, b1, w2t, b2 = make(b, c, f, dtype, device="cpu", seed=4)
    lay = RecordLayout(hidden=c, ffn=f, heads=4)
    rec = pack_neurons(w1, b1, w2t.T, torch.empty(f, lay.neuron_len, dtype=dtype))
    hot = torch.tensor([1, 8, 30])
    sel = torch.tensor([8, 2, 30, 17, 5])
    locs = torch.tensor([1, -3, 2, -18, -6, 0, 2, -1], dtype=torch.int32)  # 3 garbage
    res = torch.randn(b, c).to(dtype)
    args = (x.to(DEVICE), neuron_rows(rec[hot].clone().to(DEVICE), c), locs.to(DEVICE))
    kw = dict(host=neuron_rows(rec.to(DEVICE), c), bias2=b2.to(DEVICE),
              residual=res.to(DEVICE), chained=True, block_n=16, split_c=16)
    ws = mlp_workspace(b, c, locs.numel(), DEVICE) if b > 1 else None
    out = sparse_mlp(*args, count=torch.tensor([5], dtype=torch.int32, device=DEVICE),
                     workspace=ws, **kw)
    ref = sparse_mlp_reference(x, w1, b1, w2t, sel, b2, res)
    assert rel_err(out.cpu(), ref) < TOL[dtype]
    assert ws is None or int(torch.count_nonzero(ws)) == 0
    out = sparse_mlp(*args, count=torch.zeros(1, dtype=torch.int32, device=DEVICE), **kw)
    torch.testing.assert_close(out.cpu(), (res.float() + b2.float()).to(dtype))


@pytest.mark.parametrize("b", [1, 3])
def test_chained_kernel_count_far_below_capacity(b):
    # A buffer with room for every neuron (as a captured sparse step compacts into) and a
    # few selected: tiles past the count return at once, the result and the clean
    # workspace are as with a buffer sized to the selection. Counts 0..k exercise the
    # boundary blocks and groups.
    dtype = torch.float16
    c, f = 40, 150
    x, w1, b1, w2t, b2 = make(b, c, f, dtype, device="cpu", seed=9)
    sel = torch.tensor([149, 3, 77, 20, 64, 101, 5, 33, 120, 90, 11, 140, 58, 2, 99, 130, 17,
                        45])
    locs = torch.full((f,), 7, dtype=torch.int32)  # garbage past the count
    locs[: sel.numel()] = sel.to(torch.int32)
    table = neuron_rows(pack_neurons(w1, b1, w2t.T, torch.empty(f, RecordLayout(
        hidden=c, ffn=f, heads=4).neuron_len, dtype=dtype)).to(DEVICE), c)
    ws = mlp_workspace(b, c, f, DEVICE)
    for k in (0, 1, 16, 17, sel.numel()):
        out = sparse_mlp(x.to(DEVICE), table, locs.to(DEVICE), bias2=b2.to(DEVICE),
                         chained=True, block_n=16, split_c=16, block_n2=32, split_c2=16,
                         count=torch.tensor([k], dtype=torch.int32, device=DEVICE),
                         workspace=ws)
        ref = sparse_mlp_reference(x, w1, b1, w2t, sel[:k], b2)
        assert rel_err(out.cpu(), ref) < TOL[dtype], k
        assert int(torch.count_nonzero(ws)) == 0, f"workspace dirty after k={k}"


def test_reference_equals_dense_mlp_when_all_neurons_selected():
    # The reference is checked against the model's own math (fc2(relu(fc1(x)))), not
    # against another fast path.
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(24, 40), torch.nn.Linear(40, 24)
    x = torch.randn(3, 24)
    ref = sparse_mlp_reference(x, fc1.weight, fc1.bias, fc2.weight.T, torch.arange(40),
                               fc2.bias)
    torch.testing.assert_close(ref, fc2(torch.relu(fc1(x))), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_record_layout_with_resident_and_host_tables(dtype):
    # Neurons split between a "resident" cache table and a "host" table in the record
    # layout; locs >= 0 index the cache, locs < 0 the host records.
    b, c, f = 2, 48, 29
    x, w1, b1, w2t, b2 = make(b, c, f, dtype, device="cpu", seed=3)
    lay = RecordLayout(hidden=c, ffn=f, heads=4)
    rec = pack_neurons(w1, b1, w2t.T, torch.empty(f, lay.neuron_len, dtype=dtype))
    hot = torch.tensor([3, 11, 20, 28])
    cache = rec[hot].clone().to(DEVICE)
    host = rec.to(DEVICE)
    sel = torch.tensor([20, 5, 3, 17, 28, 0, 9])  # some hot, some cold
    pos = {int(n): i for i, n in enumerate(hot)}
    locs = torch.tensor([pos.get(int(n), -int(n) - 1) for n in sel], dtype=torch.int32)
    out = sparse_mlp(x.to(DEVICE), neuron_rows(cache, c), locs.to(DEVICE),
                     host=neuron_rows(host, c), bias2=b2.to(DEVICE), block_c=16)
    ref = sparse_mlp_reference(x, w1, b1, w2t, sel, b2)
    assert rel_err(out.cpu(), ref) < TOL[dtype]
    # A wrong sign convention would read other rows: prove the test can tell.
    wrong = sparse_mlp_reference(x, w1, b1, w2t, torch.tensor([20, 4, 3, 16, 28, 1, 8]), b2)
    assert rel_err(wrong, ref) > 10 * TOL[dtype]


def test_empty_selection_returns_residual_plus_bias():
    x, w1, b1, w2t, b2 = make(2, 16, 8, torch.float16)
    res = torch.randn(2, 16).half().to(DEVICE)
    out = sparse_mlp(x, NeuronRows(w1, w2t, b1), torch.empty(0, dtype=torch.int32,
                                                              device=DEVICE),
                     bias2=b2, residual=res)
    torch.testing.assert_close(out, (res.float() + b2.float()).half())


def test_bad_inputs_are_refused_with_a_reason():
    x, w1, b1, w2t, _ = make(2, 16, 8, torch.float16)
    rows = NeuronRows(w1, w2t, b1)
    idx = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        sparse_mlp(x.float(), rows, idx)
    with pytest.raises(ValueError, match="B <= 16"):
        sparse_mlp(torch.zeros(17, 16, dtype=torch.float16, device=DEVICE), rows, idx)
    with pytest.raises(ValueError, match="locs"):
        sparse_mlp(x, rows, idx.float())
    with pytest.raises(ValueError, match="w1"):
        sparse_mlp(x, NeuronRows(w1[:, :8], w2t, b1), idx)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="out of range"):
            sparse_mlp(x, rows, torch.tensor([0, 8], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 8, 16])
def test_gpu_opt_shapes_and_mapped_host_rows(dtype, b):
    from dejavu.kernels.host_memory import device_view
    c, f, k = 1024, 4099, 411
    x, w1, b1, w2t, b2 = make(b, c, f, dtype, seed=b)
    idx = torch.randperm(f, device="cuda")[:k].int()
    out = sparse_mlp(x, NeuronRows(w1, w2t, b1), idx, bias2=b2)
    ref = sparse_mlp_reference(x, w1, b1, w2t, idx, b2)
    assert rel_err(out, ref) < TOL[dtype]
    lay = RecordLayout(hidden=c, ffn=f, heads=8)
    rec = torch.empty(f, lay.neuron_len, dtype=dtype, pin_memory=True)
    pack_neurons(w1.cpu(), b1.cpu(), w2t.T.cpu(), rec)
    mapped = neuron_rows(device_view(rec), c)
    empty = neuron_rows(torch.empty(0, lay.neuron_len, dtype=dtype, device="cuda"), c)
    out = sparse_mlp(x, empty, -idx - 1, host=mapped, bias2=b2)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 3, 16])
def test_gpu_chained_kernel_repeats_exactly_enough(dtype, b):
    # The chained kernel orders programs through device counters: a missing acquire or
    # release shows as an error that moves between runs or a dirty workspace. Run it many
    # times on OPT-like sizes, resident and mapped host rows, with and without a workspace.
    from dejavu.kernels.host_memory import device_view
    c, f, k = 1040, 4099, 411
    x, w1, b1, w2t, b2 = make(b, c, f, dtype, seed=b)
    res = torch.randn(b, c, device="cuda").to(dtype)
    idx = torch.randperm(f, device="cuda")[:k].int()
    ref = sparse_mlp_reference(x, w1, b1, w2t, idx, b2, res)
    ws = mlp_workspace(16, c, f, "cuda")
    lay = RecordLayout(hidden=c, ffn=f, heads=8)
    rec = torch.empty(f, lay.neuron_len, dtype=dtype, pin_memory=True)
    pack_neurons(w1.cpu(), b1.cpu(), w2t.T.cpu(), rec)
    mapped = neuron_rows(device_view(rec), c)
    empty = neuron_rows(torch.empty(0, lay.neuron_len, dtype=dtype, device="cuda"), c)
    for cfg in ({"block_n": 32, "split_c": 256, "num_warps": 2},
                {"block_n": 16, "split_c": 128, "block_n2": 64, "split_c2": 64,
                 "prefetch": False}):
        errs = []
        for i in range(20):
            out = sparse_mlp(x, NeuronRows(w1, w2t, b1), idx, bias2=b2, residual=res,
                             chained=True, workspace=ws if i % 2 else None, **cfg)
            errs.append(rel_err(out, ref))
        assert max(errs) < TOL[dtype], errs
        assert max(errs) - min(errs) < 0.1 * TOL[dtype], errs
        torch.cuda.synchronize()
        assert int(torch.count_nonzero(ws)) == 0
        out = sparse_mlp(x, empty, -idx - 1, host=mapped, bias2=b2, residual=res,
                         chained=True, workspace=ws, **cfg)
        assert rel_err(out, ref) < TOL[dtype]
