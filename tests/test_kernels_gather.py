"""kernels/gather_rows.py against its torch twin: irregular row lengths (in 8-byte words and
not a multiple of the block), repeated and unordered ids, int32/int64 ids, both model
dtypes, a destination larger than the gather. Exact: it moves bytes."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dejavu.kernels.gather_rows import gather_rows, gather_rows_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length,ids", [(4, [0]), (36, [6, 1, 1, 4]), (1044, [2, 0, 5]),
                                        (84, list(range(7)))])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_gather_rows_equals_index_select(dtype, length, ids, id_dtype):
    g = torch.Generator().manual_seed(length)
    src = torch.randn(7, length, generator=g).to(dtype).to(DEVICE)
    idx = torch.tensor(ids, dtype=id_dtype, device=DEVICE)
    out = torch.full((9, length), 7.0, dtype=dtype, device=DEVICE)
    ref = gather_rows_reference(src, idx, out.clone())
    got = gather_rows(src, idx, out, block=16)
    assert torch.equal(got, ref)
    assert bool((out[len(ids):] == 7.0).all())  # rows past the gather untouched


def test_gather_rows_refuses_what_it_cannot_move():
    src = torch.zeros(3, 6, dtype=torch.float16, device=DEVICE)  # 12-byte rows
    with pytest.raises(ValueError, match="8-byte"):
        gather_rows(src, torch.tensor([0], device=DEVICE), torch.zeros_like(src))
    src = torch.zeros(3, 8, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        gather_rows(src, torch.tensor([0, 1, 2, 0], device=DEVICE), torch.zeros_like(src))
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="out of range"):
            gather_rows(src, torch.tensor([3]), torch.zeros_like(src))
