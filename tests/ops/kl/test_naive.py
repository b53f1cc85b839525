import pytest
import torch

import msa
from tests.helpers.brute import brute_kl, make_case
from tests.helpers import random_topk

CASES = {
    "varlen-chunked": ((20, 1, 33), (200, 64, 97), None, 4, 2, 2, 1),
    "fragments": ((17, 41, 73), (149, 181, 259), (0, 0, 1), 4, 2, 2, 2),
    "Hi1-G4": ((40,), (300,), None, 8, 2, 1, 1),
}


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense-warmup"])
@pytest.mark.parametrize("name", list(CASES))
def test_kl_value_and_grads_match_explicit_fp64_loss(name, dense):
    q_lens, k_lens, frag, hq, hkv, hi, hki = CASES[name]
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, hi=hi, hki=hki, fragment_indices=frag,
                  dtype=torch.float64, seed=len(name), scale=0.7)
    topk = None if dense else random_topk(c["seg"], hi, 3, 64, seed=1, future=False)
    qi, ki = c["qi"].requires_grad_(True), c["ki"].requires_grad_(True)
    q, k = c["q"].requires_grad_(True), c["k"].requires_grad_(True)
    loss = msa.msa_indexer_kl(q, k, qi, ki, topk, c["cu_seqlens_q"], c["cu_seqlens_k"],
                              fragment_indices=c["fragment_indices"], block_size=64,
                              loss_coeff=0.3)
    ref = brute_kl(q, k, qi, ki, topk, c["seg"], 64, 64 ** -0.5, 64 ** -0.5, coeff=0.3)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert loss.item() > 0
    g = torch.autograd.grad(loss, [qi, ki], allow_unused=True)
    r = torch.autograd.grad(ref, [qi, ki])
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    loss2 = msa.msa_indexer_kl(q, k, qi, ki, topk, c["cu_seqlens_q"], c["cu_seqlens_k"],
                               fragment_indices=c["fragment_indices"], block_size=64)
    assert torch.autograd.grad(loss2, [q, k], allow_unused=True) == (None, None)  # detached


def test_kl_zero_when_student_equals_teacher():
    # Hq = Hkv = Hi, qi = q, ki = k: both distributions coincide -> KL 0 and zero grads
    c = make_case((30,), (200,), hq=2, hkv=2, hi=2, hki=2, dtype=torch.float64, seed=3)
    topk = random_topk(c["seg"], 2, 2, 64, seed=3, future=False)
    qi, ki = c["q"].clone().requires_grad_(True), c["k"].clone().requires_grad_(True)
    loss = msa.msa_indexer_kl(c["q"], c["k"], qi, ki, topk, c["cu_seqlens_q"],
                              c["cu_seqlens_k"], block_size=64)
    assert abs(loss.item()) < 1e-12
    loss.backward()
    assert qi.grad.abs().max() < 1e-12 and ki.grad.abs().max() < 1e-12


def test_unselected_keys_and_empty_rows_get_zero_grads():
    c = make_case((7,), (128,), hq=4, hkv=2, hi=2, seed=4)
    topk = torch.full((2, 7, 2), -1, dtype=torch.int32)
    topk[0, 0, 0] = 0                         # only head 0 of query 0 (position 121)
    qi, ki = c["qi"].requires_grad_(True), c["ki"].requires_grad_(True)
    loss = msa.msa_indexer_kl(c["q"], c["k"], qi, ki, topk, c["cu_seqlens_q"],
                              c["cu_seqlens_k"], block_size=64)
    loss.backward()
    assert torch.all(qi.grad[1:] == 0) and torch.all(qi.grad[0, 1] == 0)
    assert torch.all(ki.grad[64:] == 0) and ki.grad[:64].abs().sum() > 0


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_msa_attention_one_backward_trains_both_branches(mode):
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=3,
                        kl_loss_coeff=0.5)
    c = make_case((90, 40), (90, 200), hq=4, hkv=2, hi=2, dtype=torch.float64, seed=6)
    leaves = {n: c[n].requires_grad_(True) for n in ("q", "k", "v", "qi", "ki")}
    args = (c["q"], c["k"], c["v"], c["qi"], c["ki"], c["cu_seqlens_q"], c["cu_seqlens_k"])
    out, aux = msa.msa_attention(*args, config=cfg, mode=mode, return_aux=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    got = {n: t.grad.clone() for n, t in leaves.items()}
    # the same pieces called one by one
    for t in leaves.values():
        t.grad = None
    varlen = dict(cu_seqlens_q=c["cu_seqlens_q"], cu_seqlens_k=c["cu_seqlens_k"])
    if mode == "sparse":
        topk = msa.msa_indexer(c["qi"], c["ki"], **varlen, block_size=64, topk=3)
        assert torch.equal(topk, aux.topk_indices)
        ref_out = msa.msa_sparse_attention(c["q"], c["k"], c["v"], topk, **varlen, block_size=64)
    else:
        topk = None
        from msa.ops.dense import dense_attention
        ref_out = dense_attention(c["q"], c["k"], c["v"], c["seg"], scale=64 ** -0.5)
    kl = msa.msa_indexer_kl(c["q"], c["k"], c["qi"], c["ki"], topk, **varlen, block_size=64,
                            loss_coeff=0.5)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux.kl_loss, kl.detach(), rtol=1e-12, atol=1e-12)
    ((ref_out * dout).sum() + kl).backward()
    for n, t in leaves.items():
        torch.testing.assert_close(got[n], t.grad, rtol=1e-10, atol=1e-12)
        assert t.grad.abs().sum() > 0, n
