"""Sparse decode attention kernels vs their PyTorch reference, and the reference vs the
model's own cached attention (runtime/model.py) when every head is selected.

Without a GPU the kernels run in Triton's interpreter (tiny shapes); GPU tests are marked.
"""

import pytest
import torch

from dejavu.kernels.sparse_attention import (  # noqa: E402
    decode_attention,
    qkv_projection,
    sparse_attention,
    sparse_attention_reference,
    split_head_rows,
)
from dejavu.runtime.model import Batch, KVCache, OPTAttention  # noqa: E402
from dejavu.runtime.opt_config import OPTConfig  # noqa: E402
from dejavu.runtime.weight_store import RecordLayout, head_rows, pack_heads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make(c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(c, c, generator=g) * c**-0.5).to(dtype) for _ in range(4)]
    bs = [(torch.randn(c, generator=g) * 0.1).to(dtype) for _ in range(4)]
    return ws, bs


def case(b, h, d, s, length, dtype, seed=0):
    c = h * d
    ws, bs = make(c, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, c, generator=g).to(dtype)
    ck = torch.randn(s, h, length, d, generator=g).to(dtype)
    cv = torch.randn(s, h, length, d, generator=g).to(dtype)
    slots = torch.randperm(s, generator=g)[:b].int()
    pos = torch.randint(0, length, (b,), generator=g).int()
    pos[0] = 0  # a row with only its own token
    pos[-1] = length - 1  # a row filling the cache
    return ws, bs, x, ck, cv, slots, pos


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,d,heads,split", [(1, 3, 16, [1], 0), (3, 5, 24, [4, 1, 2], 32),
                                               (2, 4, 8, [0, 1, 2, 3], 16)])
def test_sparse_attention_matches_reference(dtype, b, h, d, heads, split):
    ws, bs, x, ck, cv, slots, pos = case(b, h, d, 4, 37, dtype)
    sel = torch.tensor(heads, dtype=torch.int32)
    rows = split_head_rows(ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], ws[3], h)
    ck1, cv1, ck2, cv2 = ck.clone(), cv.clone(), ck.clone(), cv.clone()
    dev = [t.to(DEVICE) for t in (x, sel, ck1, cv1, slots, pos, bs[3])]
    xd, seld, ck1d, cv1d, slotsd, posd, bod = dev
    out = sparse_attention(xd, type(rows)(*(t.to(DEVICE) for t in rows)), seld, seld, ck1d,
                           cv1d, slotsd, posd, bias=bod, qkv_split_c=split, chunk=16,
                           split_h=2)
    ref = sparse_attention_reference(x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], ws[3], sel,
                                     ck2, cv2, slots, pos, bias=bs[3])
    assert rel_err(out.cpu(), ref) < TOL[dtype]
    # The selected heads' new keys/values landed in the cache, nothing else changed.
    torch.testing.assert_close(ck1d.cpu().float(), ck2.float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(cv1d.cpu().float(), cv2.float(), atol=0.05, rtol=0.02)
    untouched = [i for i in range(h) if i not in heads]
    assert torch.equal(ck1d.cpu()[:, untouched], ck[:, untouched])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_decode_attention_over_many_chunks(dtype):
    # Small chunks force several splits per row, some of them past a row's length.
    b, h, d, length = 3, 2, 16, 53
    ws, bs, x, ck, cv, slots, pos = case(b, h, d, 3, length, dtype, seed=5)
    heads = torch.tensor([1, 0], dtype=torch.int32)
    g = torch.Generator().manual_seed(9)
    q = (torch.randn(b, 2, d, generator=g) * d**-0.5).to(dtype)
    out = decode_attention(q.to(DEVICE), heads.to(DEVICE), ck.to(DEVICE), cv.to(DEVICE),
                           slots.to(DEVICE), pos.to(DEVICE), chunk=16, block_l=8)
    ref = torch.empty(b, 2, d)
    for i in range(b):
        for j, hd in enumerate(heads.tolist()):
            keys = ck[slots[i], hd, : pos[i] + 1].float()
            w = torch.softmax(keys @ q[i, j].float(), 0)
            ref[i, j] = w @ cv[slots[i], hd, : pos[i] + 1].float()
    assert rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_writes_this_steps_kv_as_the_cache_writes_would(dtype):
    """``new_kv``: the kernel writes this step's keys and values and attends over them, the
    same as two cache writes before it (bit for bit: the same values in the same sums).
    Rows at the first position, mid-chunk, at a chunk's edge and filling the cache; the
    last row repeats the first (a captured bucket's padding row); a subset of the heads."""
    b, h, d, length = 5, 4, 16, 48
    _, _, _, ck, cv, _, _ = case(b, h, d, 4, length, dtype, seed=11)
    slots = torch.tensor([2, 0, 3, 1, 2])
    pos = torch.tensor([0, 21, 31, length - 1, 0])
    heads = torch.tensor([3, 0, 2], dtype=torch.int32)
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(b, 3, d, generator=g).to(dtype) for _ in range(3))
    k[-1], v[-1], q[-1] = k[0], v[0], q[0]
    qkv = torch.stack([q, k, v], 1).to(DEVICE)  # [B, 3, Hs, D]: k, v strided as the step's
    ck_want, cv_want = ck.clone().to(DEVICE), cv.clone().to(DEVICE)
    rows, hd = slots.to(DEVICE)[:, None], heads.to(DEVICE).long()[None, :]
    ck_want[rows, hd, pos.to(DEVICE)[:, None]] = k.to(DEVICE)
    cv_want[rows, hd, pos.to(DEVICE)[:, None]] = v.to(DEVICE)
    args = (heads.to(DEVICE), slots.to(DEVICE), pos.to(DEVICE))
    want = decode_attention(qkv[:, 0], args[0], ck_want, cv_want, *args[1:], chunk=16,
                            block_l=8, scale=d**-0.5)
    ck_got, cv_got = ck.clone().to(DEVICE), cv.clone().to(DEVICE)
    got = decode_attention(qkv[:, 0], args[0], ck_got, cv_got, *args[1:], chunk=16,
                           block_l=8, scale=d**-0.5, new_kv=(qkv[:, 1], qkv[:, 2]))
    assert torch.equal(ck_got, ck_want) and torch.equal(cv_got, cv_want)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="new_kv"):
        decode_attention(qkv[:, 0], args[0], ck_got, cv_got, *args[1:],
                         new_kv=(qkv[:, 1], qkv[:, 2].contiguous()))


def test_reference_equals_model_cached_attention_with_all_heads():
    cfg = OPTConfig(hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=1,
                    vocab_size=64, max_position_embeddings=16, word_embed_proj_dim=32)
    torch.manual_seed(0)
    attn = OPTAttention(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cache = KVCache(cfg, [0], slots=3, max_len=16, dtype=torch.float32, device="cpu")
    cache.k.normal_()
    cache.v.normal_()
    k0, v0 = cache.k[0].clone(), cache.v[0].clone()
    x = torch.randn(2, 32)
    slots, pos = torch.tensor([2, 0]), torch.tensor([5, 9])
    with torch.no_grad():
        want = attn(x[:, None], 0, Batch(pos[:, None], slots, cache))[:, 0]
        got = sparse_attention_reference(
            x, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias,
            attn.v_proj.weight, attn.v_proj.bias, attn.out_proj.weight, torch.arange(4),
            k0, v0, slots, pos, bias=attn.out_proj.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(k0, cache.k[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_record_layout_with_resident_and_host_heads(dtype):
    b, h, d = 2, 5, 16
    c = h * d
    ws, bs, x, ck, cv, slots, pos = case(b, h, d, 2, 11, dtype, seed=2)
    lay = RecordLayout(hidden=c, ffn=8, heads=h)
    rec = pack_heads((ws[0], bs[0]), (ws[1], bs[1]), (ws[2], bs[2]), ws[3],
                     torch.empty(h, lay.head_len, dtype=dtype))
    hot = torch.tensor([3, 0])
    sel = torch.tensor([0, 4, 3, 1], dtype=torch.int32)
    locs = torch.tensor([1, -5, 0, -2], dtype=torch.int32)  # 0,3 resident; 4,1 on host
    ck1, cv1, ck2, cv2 = ck.clone(), cv.clone(), ck.clone(), cv.clone()
    out = sparse_attention(
        x.to(DEVICE), head_rows(rec[hot].clone().to(DEVICE), c, d), sel.to(DEVICE),
        locs.to(DEVICE), ck1.to(DEVICE), cv1.to(DEVICE), slots.to(DEVICE), pos.to(DEVICE),
        host=head_rows(rec.to(DEVICE), c, d), residual=x.to(DEVICE))
    ref = sparse_attention_reference(x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], ws[3], sel,
                                     ck2, cv2, slots, pos, residual=x)
    assert rel_err(out.cpu() - x, ref.float() - x.float()) < TOL[dtype] * 2
    # Nothing resident: an empty cache table (arbitrary strides) and every head on host.
    empty = head_rows(torch.empty(0, lay.head_len, dtype=dtype, device=DEVICE), c, d)
    out = sparse_attention(
        x.to(DEVICE), empty, sel.to(DEVICE), (-sel - 1).to(DEVICE), ck.clone().to(DEVICE),
        cv.clone().to(DEVICE), slots.to(DEVICE), pos.to(DEVICE),
        host=head_rows(rec.to(DEVICE), c, d), residual=x.to(DEVICE))
    assert rel_err(out.cpu() - x, ref.float() - x.float()) < TOL[dtype] * 2


def test_mismatched_inputs_are_refused():
    ws, bs, x, ck, cv, slots, pos = case(2, 2, 16, 2, 8, torch.float16)
    rows = split_head_rows(ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], ws[3], 2)
    sel = torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="slots and positions"):
        qkv_projection(x, rows, sel, sel, ck, cv, slots[:1], pos)
    with pytest.raises(ValueError, match="cache"):
        qkv_projection(x, rows, sel, sel, ck[..., :8], cv, slots, pos)
    with pytest.raises(ValueError, match="heads"):
        qkv_projection(x, rows, sel, torch.tensor([0, 1], dtype=torch.int32), ck, cv, slots,
                       pos)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 8])
def test_gpu_opt_like_shapes(dtype, b):
    h, d = 16, 128
    ws, bs, x, ck, cv, slots, pos = case(b, h, d, 8, 300, dtype, seed=b)
    sel = torch.tensor([0, 3, 7, 8, 15], dtype=torch.int32)
    rows = split_head_rows(ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], ws[3], h)
    ck1, cv1 = ck.cuda(), cv.cuda()
    out = sparse_attention(x.cuda(), type(rows)(*(t.cuda() for t in rows)), sel.cuda(),
                           sel.cuda(), ck1, cv1, slots.cuda(), pos.cuda(), bias=bs[3].cuda())
    ref = sparse_attention_reference(x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], ws[3], sel,
                                     ck, cv, slots, pos, bias=bs[3])
    assert rel_err(out.cpu(), ref) < TOL[dtype]
