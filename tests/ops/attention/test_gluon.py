"""The Gluon KV-outer forward (msa.ops.attention.gluon): it compiles for Hopper on any
machine (cp.async gathers, wgmma, warp specialization), and on a Hopper GPU its partial
outputs give what the Triton kernel gives on the same plan."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from msa.ops.attention.forward import sparse_attn_fwd  # noqa: E402
from msa.ops.attention.naive import attention_forward_reference  # noqa: E402
from tests.helpers import DEVICE, gluon_ptx, plan_of, random_topk  # noqa: E402
from tests.helpers.brute import make_case, rel_err  # noqa: E402

SIG = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "PO": "*bf16", "PO_DESC": None, "PL": "*fp32",
       "POS": "*i32", "EDGE_Q": "*i32", "EDGE_SLOT": "*i32", "ITEM_H": "*i32",
       "ITEM_KROW": "*i32", "ITEM_T0": "*i32", "ITEM_NK": "*i32", "ITEM_E0": "*i32",
       "ITEM_E1": "*i32", "q0": "i32", "scale_log2": "fp32", "stride_qt": "i32",
       "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32",
       "stride_vh": "i32"}


@pytest.mark.parametrize("g", [16, 6])
def test_compiles_for_sm90_to_gathers_and_wgmma(g):
    """Compiled in a fresh process (``gluon_ptx``). G = 16: a storer warp stores each
    query's 16 partial rows by TMA; G = 6 (rows off the swizzle's 8-row period): the
    attention warpgroups store them in 16-byte pieces."""
    from msa.ops.attention import gluon as ga
    const = dict(HKV=4, G=g, D=128, BS=128, TOPK=16, BLOCK_Q=64 // g, STAGES=ga.STAGES,
                 LOAD_WARPS=ga.LOAD_WARPS, num_warps=4)
    sig = dict(SIG, PO_DESC=f"tensordesc<bf16[{g}, 128],{ga.TILE_L.value!r}>")
    if g % 8:
        sig["PO_DESC"], const["PO_DESC"] = "constexpr", None
    ptx = gluon_ptx("msa.ops.attention.gluon", "fwd_kernel", sig, const)
    assert "cp.async.cg.shared.global" in ptx and "cp.async.mbarrier.arrive" in ptx
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx
    assert "setmaxnreg" in ptx
    assert ptx.count("wgmma.mma_async") == 32     # QK^T and PV of each attention warpgroup
    if g == 16:
        assert "cp.async.bulk.tensor.2d.global.shared" in ptx and "st.global.v4" not in ptx
        assert "ld.local" not in ptx                                      # no spills
    else:
        assert "cp.async.bulk.tensor" not in ptx and "st.global.v4" in ptx


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv,hs", [
    ((3000,), (3000,), 64, 4, 4),                    # MiniMax-M3 group of 16
    ((700, 1, 900), (4000, 1, 2500), 64, 4, 4),      # G = 16 (TMA stores), prefixes
    ((2000,), (2000,), 64, 8, 8),                    # G = 8
    ((700, 1, 900), (4000, 1, 2500), 32, 8, 8),      # G = 4, prefixes, a one-token segment
    ((1500,), (5000,), 24, 4, 1),                    # G = 6 (60-row tiles), shared selection
    ((900,), (900,), 21, 7, 7),                      # G = 3 (21 queries, 63 rows)
    ((600,), (1800,), 4, 4, 4),                      # G = 1 (64 queries a tile)
])
def test_partials_equal_the_triton_kernel(q_lens, k_lens, hq, hkv, hs):
    from msa.ops.attention import gluon
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, d=128, seed=sum(q_lens))
    q, k, v = (c[x].to(DEVICE, torch.bfloat16) for x in "qkv")
    if not gluon.supported(q, k, v, 128):
        pytest.skip("the Gluon forward needs a Hopper GPU")
    topk = random_topk(c["seg"], hs, 16, 128, seed=3).to(DEVICE)
    topk[:, ::7] = -1                                # rows that select nothing
    outs = []
    for kernel in ("triton", "gluon", "gluon"):
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"), device=DEVICE)
        sparse_attn_fwd(q, k, v, topk, plan_of(topk, c["seg"], 128, hkv), scale=0.088,
                        out=out, lse=lse, query_major=False, kernel=kernel)
        outs.append((out, lse))
    (a, la), (b, lb), (b2, lb2) = outs
    assert not b.isnan().any() and not lb.isnan().any()              # every row written
    assert torch.equal(b, b2) and torch.equal(lb, lb2)               # bitwise repeatable
    cos = torch.nn.functional.cosine_similarity(b.float().flatten(), a.float().flatten(), 0)
    assert cos > 0.99999, cos
    # against the fp64 reference on the same bf16 inputs: MiniMax's bf16 tolerances
    ref_o, ref_l = attention_forward_reference(q.double(), k.double(), v.double(), topk,
                                               c["seg"], block_size=128, scale=0.088)
    assert rel_err(b, ref_o) < 3e-2
    seen = ref_l.isfinite()
    torch.testing.assert_close(lb[seen].double(), ref_l[seen], rtol=1e-3, atol=1e-3)
    assert torch.equal(lb.isfinite(), seen)


def test_where_it_cannot_run_it_says_so():
    c = make_case((20,), (300,), hq=4, hkv=2, d=64, seed=1)
    q, k, v = (c[x].to(DEVICE) for x in "qkv")
    topk = random_topk(c["seg"], 2, 3, 64, seed=1).to(DEVICE)
    with pytest.raises(NotImplementedError, match="Gluon forward runs"):
        sparse_attn_fwd(q, k, v, topk, plan_of(topk, c["seg"], 64, 2), scale=0.125,
                        query_major=False, kernel="gluon")


@pytest.mark.gpu
def test_public_api_runs_it_on_hopper(monkeypatch):
    """``msa_sparse_attention`` picks the Gluon kernels on Hopper (``attention_kernel``
    says so) and gives the reference's output and gradients, fragments included (key rows
    shared by two segments: their dK/dV sum over both), bitwise repeatable when
    deterministic; the environment switch keeps the Triton kernel."""
    import msa
    c = make_case((1500, 600, 400), (1500, 2600, 3000), hq=64, hkv=4, d=128, seed=5,
                  fragment_indices=(0, 1, 1))
    q, k, v = (c[x].to(DEVICE, torch.bfloat16).requires_grad_() for x in "qkv")
    if msa.attention_kernel(q, k, v) != "gluon":
        pytest.skip("the Gluon forward needs a Hopper GPU")
    assert msa.attention_kernel(q, k, v, backward=True) == "gluon"
    topk = random_topk(c["seg"], 4, 16, 128, seed=4).to(DEVICE)
    meta = {n: c[n].to(DEVICE) for n in ("cu_seqlens_q", "cu_seqlens_k", "fragment_indices")}
    out = msa.msa_sparse_attention(q, k, v, topk, **meta)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = msa.msa_sparse_attention(q64, k64, v64, topk, **meta, backend="reference")
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert rel_err(out, ref) < 3e-2
    for name, a, r in zip("qkv", grads, ref_grads):
        assert not a.isnan().any(), name
        assert rel_err(a, r) < 3e-2, name
    det = [torch.autograd.grad(msa.msa_sparse_attention(q, k, v, topk, **meta,
                                                        deterministic=True), (q, k, v), dout)
           for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*det))
    monkeypatch.setenv("MSA_FORWARD_KERNEL", "triton")
    assert msa.attention_kernel(q, k, v) == "triton"
