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


@pytest.mark.parametrize("count", [0, 1, 3, 5])
def test_gather_rows_with_a_device_count_moves_only_the_counted_rows(count):
    """A padded union: ids past the device count (here out of range, as padding may be) are
    never read, and the destination's rows past the count stay as they were."""
    g = torch.Generator().manual_seed(count)
    src = torch.randn(7, 36, generator=g).to(torch.float16).to(DEVICE)
    ids = torch.tensor([6, 1, 1, 4, 0, 99, 99], dtype=torch.int32, device=DEVICE)
    ids[count:] = 99  # padding: would fault or raise if it were read
    n = torch.tensor([count], dtype=torch.int32, device=DEVICE)
    out = torch.full((9, 36), 7.0, dtype=torch.float16, device=DEVICE)
    ref = gather_rows_reference(src, ids, out.clone(), count=n)
    got = gather_rows(src, ids, out, count=n, block=16)
    assert torch.equal(got, ref)
    assert torch.equal(out[:count], src[ids[:count].long()])
    assert bool((out[count:] == 7.0).all())
    with pytest.raises(ValueError, match="count"):
        gather_rows(src, ids, out, count=n.long())
