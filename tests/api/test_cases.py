"""Focused cases of MiniMax's MSA test matrix, adapted to the forward path.

Each case runs the indexer and the sparse attention through the public API with the
Triton kernels (interpreter on CPU, real kernels on a GPU) and checks them against the
pure-PyTorch reference and, where cheap, closed-form expectations.
"""
import pytest
import torch

pytest.importorskip("triton")

import msa  # noqa: E402
from tests.helpers.brute import make_case  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _both(c, block, topk, hq_dtype=torch.float32, temperature=1.0):
    dev = {n: (c[n].to(DEVICE) if isinstance(c[n], torch.Tensor) else c[n])
           for n in ("q", "k", "v", "qi", "ki", "cu_seqlens_q", "cu_seqlens_k",
                     "fragment_indices")}
    varlen = dict(cu_seqlens_q=dev["cu_seqlens_q"], cu_seqlens_k=dev["cu_seqlens_k"],
                  fragment_indices=dev["fragment_indices"])
    res = {}
    for backend in ("triton", "reference"):
        idx, ilse = msa.msa_indexer(dev["qi"], dev["ki"], **varlen, block_size=block,
                                    topk=topk, return_lse=True, backend=backend,
                                    lse_temperature=temperature)
        out, lse = msa.msa_sparse_attention(dev["q"], dev["k"], dev["v"], idx, **varlen,
                                            block_size=block, return_lse=True,
                                            backend=backend)
        res[backend] = (idx, ilse, out, lse)
    (ti, tl, to, ta), (ri, rl, ro, ra) = res["triton"], res["reference"]
    assert torch.equal(ti, ri)
    torch.testing.assert_close(tl, rl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(to, ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ta, ra, rtol=1e-5, atol=1e-5)
    return ti, to, ta


def test_single_fragment_q65_k2304():
    c = make_case((65,), (2304,), hq=4, hkv=2, d=128, di=128, seed=1)
    idx, out, lse = _both(c, 128, 16)
    assert idx.shape == (2, 65, 16) and torch.isfinite(lse).all()
    local = (torch.arange(2304 - 65, 2304, device=idx.device) // 128).int()
    assert torch.equal(idx[..., 15], local.expand(2, 65))        # 18 blocks: 15 + local


def test_packed_varlen_33_segments():
    q_lens = [33, 65, 70] + [1, 2, 3] * 10
    k_lens = [257, 320, 513] + [q + 1 + (i % 4) for i, q in enumerate([1, 2, 3] * 10)]
    c = make_case(q_lens, k_lens, hq=2, hkv=1, seed=2)
    _both(c, 64, 4)


def test_fragment_indices_and_temperature():
    c = make_case((17, 41, 73), (149, 181, 259), hq=4, hkv=2, fragment_indices=(0, 0, 1),
                  seed=3)
    _both(c, 64, 6, temperature=0.5)


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (2, 127), (7, 128), (33, 64), (129, 128),
                                         (257, 96)])
def test_single_batch_single_kv_block_shapes(q_len, k_len):
    q_len = min(q_len, k_len)                 # queries are a suffix of the keys
    c = make_case((q_len,), (k_len,), hq=2, hkv=1, seed=q_len)
    _, out, lse = _both(c, 128, 16)
    assert torch.isfinite(lse).all()


def test_1024_single_query_documents_equal_dense_within_the_block():
    n = 256 if DEVICE == "cpu" else 1024     # the interpreter runs a quarter of the case
    k_lens = [(37 * i) % 128 + 1 for i in range(n)]
    c = make_case([1] * n, k_lens, hq=2, hkv=1, seed=4)
    _, out, lse = _both(c, 128, 1)           # top-1 = the local block = the whole document
    seg = c["seg"]
    for b in (0, 1, n // 2, n - 1):           # dense attention over the document
        base, kl = seg.k_base[b], seg.k_len[b]
        x = torch.einsum("hd,khd->hk", c["q"][b], c["k"][base:base + kl].expand(kl, 2, 64))
        p = torch.softmax(x / 8, -1)
        ref = torch.einsum("hk,khd->hd", p, c["v"][base:base + kl].expand(kl, 2, 64))
        torch.testing.assert_close(out[b].cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_views_of_fused_projections_get_the_reference_gradients(deterministic):
    """q, k, v and the index queries as strided views of fused projection outputs (rows
    longer than one tensor's heads): the Triton backward and the indexer KL accumulate
    their fp32 gradients in contiguous buffers, not at the views' strides (which wrote
    out of bounds)."""
    T, hq, hkv, d, hi, di = 200, 2, 1, 64, 1, 64
    g = torch.Generator().manual_seed(11)
    fused = torch.randn(T, hq + 2 * hkv, d, generator=g)          # q | k | v heads per row
    fused_i = torch.randn(T, hi * di + di, generator=g)          # qi heads | ki
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEVICE)
    cfg = msa.MSAConfig(num_heads=hq, num_kv_heads=hkv, head_dim=d, num_index_heads=hi,
                        index_head_dim=di, block_size=128, topk=2)
    grads = {}
    for backend in ("triton", "reference"):
        x = fused.to(DEVICE, copy=True).requires_grad_(True)
        xi = fused_i.to(DEVICE, copy=True).requires_grad_(True)
        q, k, v = x[:, :hq], x[:, hq:hq + hkv], x[:, hq + hkv:]
        qi, ki = xi[:, :hi * di].view(T, hi, di), xi[:, hi * di:].view(T, 1, di)
        out, aux = msa.msa_attention(q, k, v, qi, ki, cu, cu, config=cfg, backend=backend,
                                     deterministic=deterministic, return_aux=True)
        (out.square().sum() + aux.kl_loss).backward()
        grads[backend] = (x.grad, xi.grad)
    for a, r in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_batched_views_of_a_fused_projection_get_the_reference_gradients(deterministic):
    """``msa_sparse_attention`` on q, k, v sliced from one ``[B, T, Hq + 2 Hkv, D]``
    tensor: the backward reads dO at its own strides (it read dO at q's, so NaN and
    garbage gradients for any strided q)."""
    B, T, hq, hkv, d = 2, 160, 2, 1, 64
    fused = torch.randn(B, T, hq + 2 * hkv, d, generator=torch.Generator().manual_seed(4))
    topk = torch.full((B, hkv, T, 2), -1, dtype=torch.int32)
    t = torch.arange(T)
    topk[..., 0] = 0
    topk[..., 1] = torch.where(t >= 128, t // 128, -1).int()
    grads = {}
    for backend in ("triton", "reference"):
        x = fused.to(DEVICE, copy=True).requires_grad_(True)
        q, k, v = x[..., :hq, :], x[..., hq:hq + hkv, :], x[..., hq + hkv:, :]
        out = msa.msa_sparse_attention(q, k, v, topk.to(DEVICE), block_size=128,
                                       backend=backend, deterministic=deterministic)
        out.square().sum().backward()
        grads[backend] = x.grad
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-4, atol=1e-4)


def test_values_with_their_own_strides_get_the_reference_gradients():
    """Contiguous k beside v sliced from a wider tensor: the backward loads each at its own
    strides (it read v at k's, so dq and dk were wrong)."""
    T, hq, hkv, d = 200, 2, 1, 64
    g = torch.Generator().manual_seed(5)
    q0, k0 = torch.randn(T, hq, d, generator=g), torch.randn(T, hkv, d, generator=g)
    wide = torch.randn(T, 3 * hkv, d, generator=g)
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEVICE)
    topk = torch.full((hkv, T, 2), -1, dtype=torch.int32)
    topk[..., 0] = 0
    topk[..., 1] = torch.where(torch.arange(T) >= 128, 1, -1).int()
    grads = {}
    for backend in ("triton", "reference"):
        q, k, w = (x.to(DEVICE, copy=True).requires_grad_(True) for x in (q0, k0, wide))
        msa.msa_sparse_attention(q, k, w[:, hkv:2 * hkv], topk.to(DEVICE), cu, cu,
                                 backend=backend).square().sum().backward()
        grads[backend] = (q.grad, k.grad, w.grad)
    for a, r in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
