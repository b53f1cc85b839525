import pytest
import torch
import torch.nn.functional as F

import msa
from tests.helpers.brute import brute_attention, make_case, rel_err
from tests.helpers import random_topk

SHAPES = {
    # id: (q_lens, k_lens, fragment_indices, hq, hkv, block, K)
    "single-T129-G2": ((129,), (129,), None, 4, 2, 64, 3),
    "varlen-1-63-127-128": ((1, 63, 127, 128), (1, 63, 127, 128), None, 4, 1, 64, 2),
    "chunked-prefill-113x203": ((113, 7), (203, 300), None, 8, 2, 64, 4),
    "fragments-shared-kv": ((32, 32), (128, 128), (0, 0), 4, 2, 64, 2),
    "fragments-spec-3.1": ((17, 41, 73), (149, 181, 259), (0, 0, 1), 4, 4, 64, 5),
    "one-token-docs": ((33, 1, 1), (385, 1, 1), None, 4, 2, 128, 3),
}


def _run(c, topk, block, dtype=None, return_lse=True):
    q, k, v = (c[n] if dtype is None else c[n].to(dtype) for n in "qkv")
    return msa.msa_sparse_attention(q, k, v, topk, c["cu_seqlens_q"], c["cu_seqlens_k"],
                                    fragment_indices=c["fragment_indices"], block_size=block,
                                    return_lse=return_lse)


@pytest.fixture(params=[0, 4], ids=["gather", "dense-span"])
def forward_form(request, monkeypatch):
    """Run the reference forward with per-query gathers or the masked dense span."""
    import msa.ops.attention.naive as naive
    monkeypatch.setattr(naive, "DENSE_SPAN_FACTOR", request.param)
    return request.param


@pytest.mark.parametrize("shared", [False, True], ids=["Hs=Hkv", "Hs=1"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_backward_match_fp64_brute_force(name, shared, forward_form):
    q_lens, k_lens, frag, hq, hkv, block, kk = SHAPES[name]
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, fragment_indices=frag,
                  dtype=torch.float64, seed=len(name))
    topk = random_topk(c["seg"], 1 if shared else hkv, kk, block, seed=len(name))
    for n in "qkv":
        c[n].requires_grad_(True)
    out, lse = _run(c, topk, block)
    ref_out, ref_lse = brute_attention(c["q"], c["k"], c["v"], topk, c["seg"], block, 64 ** -0.5)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [c[n] for n in "qkv"], dout)
    ref_grads = torch.autograd.grad(ref_out, [c[n] for n in "qkv"], dout)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_bounded_by_reference_rounding(dtype):
    c = make_case((100, 60), (300, 200), hq=8, hkv=2, dtype=torch.float64, seed=7)
    topk = random_topk(c["seg"], 2, 4, 64, seed=7)
    for n in "qkv":
        c[n].requires_grad_(True)
    ref, _ = _run(c, topk, 64)
    # the same inputs rounded to dtype, computed in fp64: the error any dtype kernel carries
    rounded = {n: c[n].detach().to(dtype).double() for n in "qkv"}
    low_ref, _ = brute_attention(rounded["q"], rounded["k"], rounded["v"], topk, c["seg"], 64,
                                 64 ** -0.5)
    lp = {n: c[n].detach().to(dtype).requires_grad_(True) for n in "qkv"}
    out, lse = msa.msa_sparse_attention(lp["q"], lp["k"], lp["v"], topk, c["cu_seqlens_q"],
                                        c["cu_seqlens_k"], block_size=64, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    bound = 2 * (low_ref.to(dtype).double() - ref).abs().max() + 1e-6
    assert (out.double() - ref).abs().max() <= bound
    dout = torch.randn_like(ref)
    g64 = torch.autograd.grad(ref, [c[n] for n in "qkv"], dout)
    glp = torch.autograd.grad(out, [lp[n] for n in "qkv"], dout.to(dtype))
    for a, r in zip(glp, g64):
        assert a.dtype == dtype and rel_err(a, r) < 1e-2


@pytest.mark.parametrize("tq,tk", [(256, 256), (100, 300)], ids=["prefill", "chunked"])
def test_dense_equivalence_with_sdpa_when_everything_is_selected(tq, tk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, tq, 8, 64, generator=g)
    k, v = torch.randn(2, tk, 2, 64, generator=g), torch.randn(2, tk, 2, 64, generator=g)
    nb = -(-tk // 64)
    topk = torch.arange(nb, dtype=torch.int32).expand(2, 2, tq, nb).contiguous()
    out = msa.msa_sparse_attention(q, k, v, topk, block_size=64)
    from torch.nn.attention.bias import causal_lower_right
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=causal_lower_right(tq, tk),
                                         enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_varlen_equals_loop_over_sequences():
    c = make_case((50, 1, 90), (120, 64, 200), hq=4, hkv=2, seed=11)
    topk = random_topk(c["seg"], 2, 3, 64, seed=11)
    out, lse = _run(c, topk, 64)
    seg = c["seg"]
    for b in range(3):
        s0, n, base, kl = seg.q_start[b], seg.q_len[b], seg.k_base[b], seg.k_len[b]
        cu_q = torch.tensor([0, n], dtype=torch.int32)
        cu_k = torch.tensor([0, kl], dtype=torch.int32)
        o, o_lse = msa.msa_sparse_attention(c["q"][s0:s0 + n], c["k"][base:base + kl],
                                            c["v"][base:base + kl], topk[:, s0:s0 + n], cu_q,
                                            cu_k, block_size=64, return_lse=True)
        torch.testing.assert_close(o, out[s0:s0 + n], rtol=0, atol=0)
        torch.testing.assert_close(o_lse, lse[s0:s0 + n], rtol=0, atol=0)


def test_empty_rows_and_unselected_blocks_get_zeros():
    c = make_case((7,), (300,), hq=4, hkv=2, seed=2)
    topk = torch.full((2, 7, 4), -1, dtype=torch.int32)
    topk[0, 3, 0] = 1                         # one query of head-group 0 selects block 1
    for n in "qkv":
        c[n].requires_grad_(True)
    out, lse = _run(c, topk, 64)
    empty = torch.ones(7, 4, dtype=torch.bool)
    empty[3, :2] = False
    assert torch.all(out[empty] == 0) and torch.all(torch.isneginf(lse[empty]))
    assert torch.isfinite(lse[3, :2]).all()
    out.sum().backward()
    dk, dv = c["k"].grad, c["v"].grad
    used = torch.zeros(300, 2, dtype=torch.bool)
    used[64:128, 0] = True
    assert torch.all(dk[~used] == 0) and torch.all(dv[~used] == 0)
    assert dv[used].abs().sum() > 0
    assert torch.all(c["q"].grad[empty] == 0)


def test_future_blocks_are_masked_causally():
    c = make_case((4,), (256,), hq=2, hkv=1, seed=4)   # queries at positions 252..255
    topk = torch.tensor([[[0, 3], [0, 3], [0, 3], [0, 3]]], dtype=torch.int32)
    out, _ = _run(c, topk, 64)
    c2 = dict(c, k=c["k"].clone(), v=c["v"].clone())
    c2["k"][255] = 1e3                      # the last key is in the future of queries 252..254
    c2["v"][255] = 1e3
    out2, _ = _run(c2, topk, 64)
    torch.testing.assert_close(out[:3], out2[:3], rtol=0, atol=0)
    assert (out[3] - out2[3]).abs().max() > 1


def test_batched_equals_packed():
    c = make_case((80, 80), (150, 150), hq=4, hkv=2, seed=9)
    topk = random_topk(c["seg"], 2, 2, 64, seed=9)
    out, lse = _run(c, topk, 64)
    qb = c["q"].view(2, 80, 4, 64)
    kb, vb = c["k"].view(2, 150, 2, 64), c["v"].view(2, 150, 2, 64)
    tb = topk.view(2, 2, 80, 2).transpose(0, 1)
    ob, lb = msa.msa_sparse_attention(qb, kb, vb, tb, block_size=64, return_lse=True)
    torch.testing.assert_close(ob.reshape(160, 4, 64), out, rtol=0, atol=0)
    torch.testing.assert_close(lb.reshape(160, 4), lse, rtol=0, atol=0)


def test_slot_order_does_not_matter():
    c = make_case((40,), (400,), hq=4, hkv=2, seed=5)
    topk = random_topk(c["seg"], 2, 5, 64, seed=5)
    perm = topk[..., torch.randperm(5)]
    o1, l1 = _run(c, topk, 64)
    o2, l2 = _run(c, perm, 64)
    torch.testing.assert_close(o1, o2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
