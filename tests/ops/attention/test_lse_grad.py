"""Gradients through the returned LSE: a loss on both ``out`` and ``lse`` gives the
gradients of the exact formula (autograd of a brute-force fp64 attention), empty rows
included."""
import pytest
import torch

import msa
from tests.helpers import DEVICE, random_topk
from tests.helpers.brute import brute_attention, make_case


def _case(dtype):
    c = make_case((20, 1, 37), (150, 64, 260), hq=4, hkv=2, seed=21, dtype=dtype)
    topk = random_topk(c["seg"], 2, 3, 64, seed=21, p_empty=0.4)
    topk[:, 3] = -1                             # a query with nothing selected: lse -inf
    return c, topk


def _loss(out, lse, w, u):
    finite = torch.isfinite(lse)
    return (out * w).sum() + (torch.where(finite, lse, 0.0) * u).sum()


def _grads(c, topk, backend, dtype, device):
    leaves = [c[n].to(device, dtype).requires_grad_(True) for n in "qkv"]
    out, lse = msa.msa_sparse_attention(*leaves, topk.to(device), c["cu_seqlens_q"].to(device),
                                        c["cu_seqlens_k"].to(device), block_size=64,
                                        return_lse=True, backend=backend)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device, out.dtype)
    u = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(device, lse.dtype)
    return torch.autograd.grad(_loss(out, lse, w, u), leaves), (w, u)


def _exact(c, topk, w, u):
    leaves = [c[n].double().requires_grad_(True) for n in "qkv"]
    out, lse = brute_attention(*leaves, topk, c["seg"], 64, 64 ** -0.5)
    return torch.autograd.grad(_loss(out, lse, w.double().cpu(), u.double().cpu()), leaves)


def test_reference_lse_gradient_equals_exact_formula_fp64():
    c, topk = _case(torch.float64)
    got, (w, u) = _grads(c, topk, "reference", torch.float64, "cpu")
    for a, b in zip(got, _exact(c, topk, w, u)):
        assert ((a - b).norm() / b.norm()).item() < 1e-9


def test_lse_gradient_alone_is_not_zero():
    c, topk = _case(torch.float64)
    q = c["q"].clone().requires_grad_(True)
    _, lse = msa.msa_sparse_attention(q, c["k"], c["v"], topk, c["cu_seqlens_q"],
                                      c["cu_seqlens_k"], block_size=64, return_lse=True)
    torch.where(torch.isfinite(lse), lse, 0.0).sum().backward()
    assert q.grad.abs().sum() > 0 and torch.all(q.grad[3] == 0)


@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_lse_gradient_matches_exact_formula(deterministic):
    pytest.importorskip("triton")
    c, topk = _case(torch.float32)
    leaves = [c[n].to(DEVICE).requires_grad_(True) for n in "qkv"]
    out, lse = msa.msa_sparse_attention(*leaves, topk.to(DEVICE),
                                        c["cu_seqlens_q"].to(DEVICE),
                                        c["cu_seqlens_k"].to(DEVICE), block_size=64,
                                        return_lse=True, backend="triton",
                                        deterministic=deterministic)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(out.shape, generator=g).to(DEVICE)
    u = torch.randn(lse.shape, generator=g).to(DEVICE)
    got = torch.autograd.grad(_loss(out, lse, w, u), leaves)
    for a, b in zip(got, _exact(c, topk, w, u)):
        assert not torch.isnan(a).any()
        assert ((a.double().cpu() - b).norm() / b.norm()).item() < 1e-5
