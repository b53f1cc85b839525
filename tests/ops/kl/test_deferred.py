"""The indexer KL inside the attention backward (msa.ops.kl.deferred): on any machine the
orchestration (teacher rows made in torch, NaN-filled first) gives the loss and the five
gradients of the KL computed in the forward; on a Hopper GPU the Gluon backward's rows
equal the fp64 teacher's and ``msa_attention`` trains as with the KL in the forward."""
import pytest
import torch

import msa
import msa.ops.attention.backward as B
import msa.ops.kl.deferred as deferred
from msa.ops.kl.triton import LOG2E
from tests.helpers import DEVICE, nan_empty, plan_of, random_topk
from tests.helpers.brute import make_case
from tests.ops.kl.test_gluon import torch_teacher


def rows_in_torch(monkeypatch):
    """``kl_in_backward`` holds and the attention backward's rows come from torch: the
    Triton backward runs, then each chunk's rows (``torch_teacher`` from the saved LSE,
    into a NaN-filled buffer) go to ``kl_rows``."""
    real = B.sparse_attn_bwd
    calls = []

    def bwd(q, k, v, topk, plan, out, lse, dout, dlse=None, *, scale, kernel, kl_rows):
        grads = real(q, k, v, topk, plan, out, lse, dout, dlse, scale=scale, kernel="triton")
        calls.append(kl_rows is not None)
        if kl_rows is not None:
            for q0, q1, p in plan.chunks:
                pt = torch.full((p.num_edges, plan.block_size), float("nan"), device=q.device)
                torch_teacher(q, k, lse, plan.rows.q_pos, p, q0, pt,
                              scale_log2=scale * LOG2E, block_size=plan.block_size)
                kl_rows(q0, q1, p, pt)
        return grads
    monkeypatch.setattr(deferred, "sparse_attn_bwd", bwd)
    monkeypatch.setattr(deferred, "kl_in_backward", lambda *a: True)
    return calls


def step(c, cfg, read_first=False):
    """``msa_attention`` forward and backward: ``(loss, dq, dk, dv, dqi, dki)``."""
    leaves = [c[n].to(DEVICE).clone().requires_grad_(True) for n in ("q", "k", "v", "qi", "ki")]
    out, aux = msa.msa_attention(*leaves, c["cu_seqlens_q"].to(DEVICE),
                                 c["cu_seqlens_k"].to(DEVICE), config=cfg, return_aux=True,
                                 backend="triton")
    first = aux.kl_loss.clone() if read_first else None
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    if read_first:
        assert torch.equal(first, aux.kl_loss)
    return [aux.kl_loss] + [x.grad for x in leaves]


@pytest.mark.parametrize("read_first", [False, True], ids=["after_backward", "read_first"])
def test_kl_in_backward_equals_the_kl_of_the_forward(monkeypatch, read_first):
    """Loss and all five gradients equal those of the KL computed in the forward; read
    before the backward, the value is computed then and the backward writes no rows."""
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=1, head_dim=64, num_index_heads=1,
                        index_head_dim=64, block_size=64, topk=2, kl_loss_coeff=0.5)
    c = make_case((40, 30), (100, 130), hq=4, hkv=1, hi=1, seed=4)
    want = step(c, cfg)
    calls = rows_in_torch(monkeypatch)
    got = step(c, cfg, read_first)
    assert calls == [not read_first]
    for name, a, b in zip(("loss", "dq", "dk", "dv", "dqi", "dki"), got, want):
        assert not a.isnan().any(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert got[0] > 0


def test_kl_rows_need_the_gluon_backward():
    c = make_case((100,), (100,), hq=4, hkv=2, d=64, seed=1)
    q, k, v = (c[x].to(DEVICE) for x in "qkv")
    topk = random_topk(c["seg"], 2, 2, 64, seed=1).to(DEVICE)
    plan = plan_of(topk, c["seg"], 64, 2)
    lse = torch.zeros(q.shape[:2], device=DEVICE)
    with pytest.raises(ValueError, match="kl_rows needs the Gluon backward"):
        B.sparse_attn_bwd(q, k, v, topk, plan, q, lse, q, scale=0.1, kernel="triton",
                          kl_rows=lambda *a: None)


def hopper_case(q_lens, k_lens, hq, hkv):
    from msa.ops.attention import gluon
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, d=128, hi=hkv, di=128, seed=sum(q_lens))
    for n in ("q", "k", "v", "qi", "ki"):
        c[n] = c[n].to(DEVICE, torch.bfloat16)
    if not gluon.supported(c["q"], c["k"], c["v"], 128):
        pytest.skip("the Gluon backward needs a Hopper GPU")
    return c


GROUPS = [((3000,), (3000,), 64, 4),                # MiniMax-M3: G = 16
          ((2000,), (2000,), 64, 8),                # G = 8
          ((700, 1, 900), (4000, 1, 2500), 32, 8),  # G = 4, prefixes, a one-token segment
          ((1500,), (3000,), 24, 4)]                # G = 6 (60-row tiles)


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv", GROUPS)
def test_backward_rows_equal_the_teacher(q_lens, k_lens, hq, hkv, monkeypatch):
    """The Gluon backward's rows (NaN-filled buffers) against the fp64 teacher, chunked;
    the gradients it returns are those of the backward without rows (``dq`` bitwise)."""
    from msa.ops.attention.naive import attention_forward_reference
    c = hopper_case(q_lens, k_lens, hq, hkv)
    q, k, v, seg = c["q"], c["k"], c["v"], c["seg"]
    topk = random_topk(seg, hkv, 16, 128, seed=3).to(DEVICE)
    scale = 0.088
    out, lse = attention_forward_reference(q.float(), k.float(), v.float(), topk, seg,
                                           block_size=128, scale=scale)
    dout = torch.randn(out.shape, device=DEVICE).to(q.dtype)
    out = out.to(q.dtype)
    plan = plan_of(topk, seg, 128, hkv, chunk=1000)
    seen = []

    def check(q0, q1, p, pt):
        ref = torch.empty(pt.shape, dtype=torch.float64, device=DEVICE)
        torch_teacher(q, k, lse, plan.rows.q_pos, p, q0, ref, scale_log2=scale * LOG2E,
                      block_size=128)
        assert not pt.isnan().any() and pt.dtype == torch.float32
        torch.testing.assert_close(pt.double(), ref, rtol=2 ** -8, atol=1e-6)
        seen.append(p.num_edges)
    nan_empty(B, monkeypatch)
    got = B.sparse_attn_bwd(q, k, v, topk, plan, out, lse, dout, scale=scale, kernel="gluon",
                            kl_rows=check)
    want = B.sparse_attn_bwd(q, k, v, topk, plan, out, lse, dout, scale=scale, kernel="gluon")
    assert seen == [p.num_edges for _, _, p in plan.chunks if p.num_items]
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):             # fp32 atomics, then bf16: last bits
        cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(),
                                                    0)
        assert cos > 0.99999, cos


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv", GROUPS)
def test_msa_attention_trains_as_with_the_kl_in_the_forward(q_lens, k_lens, hq, hkv,
                                                            monkeypatch):
    """On Hopper ``msa_attention`` computes the KL in its backward (``indexer_kl_kernel``
    names it); loss within ``2^-8`` of the KL in the forward (``MSA_KL_KERNEL=forward``:
    ``P`` reaches the rows rounded to bf16), ``dq`` bitwise equal, the rest to cosine
    0.99999 (``dk``, ``dv``: atomics) and 0.9999 (``dqi``, ``dki``)."""
    c = hopper_case(q_lens, k_lens, hq, hkv)
    cfg = msa.MSAConfig(num_heads=hq, num_kv_heads=hkv, head_dim=128, num_index_heads=hkv,
                        index_head_dim=128)
    q, k, qi, ki = (c[n].detach().requires_grad_(True) for n in ("q", "k", "qi", "ki"))
    assert msa.indexer_kl_kernel(q, k, qi, ki) == "attention_backward"
    nan_empty(B, monkeypatch)
    got = step(c, cfg)
    monkeypatch.setenv("MSA_KL_KERNEL", "forward")
    want = step(c, cfg)
    torch.testing.assert_close(got[0], want[0], rtol=2 ** -8, atol=0)
    assert torch.equal(got[1], want[1])
    for name, a, b, bound in zip(("dk", "dv", "dqi", "dki"), got[2:], want[2:],
                                 (0.99999, 0.99999, 0.9999, 0.9999)):
        assert not a.isnan().any(), name
        cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(),
                                                    0)
        assert cos > bound, (name, cos)
