"""The Gluon KV-outer backward (msa.ops.attention.gluon_bwd): it compiles for Hopper on
any machine (cp.async gathers, wgmma with transposed shared-memory operands, warp
specialization), and on a Hopper GPU its gradients equal the Triton backward's and the
fp64 reference's on the same plan."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from msa.ops.attention.backward import sparse_attn_bwd  # noqa: E402
from msa.ops.attention.naive import (attention_backward_reference,  # noqa: E402
                                     attention_forward_reference)
from tests.helpers import DEVICE, gluon_ptx, plan_of, random_topk  # noqa: E402
from tests.helpers.brute import make_case, rel_err  # noqa: E402

SIG = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "LSE": "*fp32",
       "DELTA": "*fp32", "DQ": "*bf16", "DK": "*fp32", "DV": "*fp32", "PT": "*fp32",
       "POS": "*i32",
       "EDGE_Q": "*i32", "EDGE_SLOT": "*i32", "ITEM_H": "*i32", "ITEM_KROW": "*i32",
       "ITEM_T0": "*i32", "ITEM_NK": "*i32", "ITEM_E0": "*i32", "ITEM_E1": "*i32",
       "q0": "i32", "edge0": "i32", "scale": "fp32", "scale_log2": "fp32", "stride_qt": "i32",
       "stride_qh": "i32", "stride_dt": "i32", "stride_dh": "i32", "stride_kt": "i32",
       "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32", "stride_lt": "i32"}


@pytest.mark.parametrize("early_dv", [False, True], ids=["dv_after_ds", "early_dv"])
@pytest.mark.parametrize("det", [False, True], ids=["atomics", "deterministic"])
def test_compiles_for_sm90(det, early_dv):
    """Compiled in a fresh process (``gluon_ptx``). Per attention warpgroup and tile:
    S and dP, 8 + 8 m64n64k16 (K = D); dQ in two column halves, 2 x 4 m64n64k16 (K = 64
    keys); dV and dK, 4 + 4 m64n128k16 (K = 64 query rows). ``EARLY_DV`` waits for S
    alone, then for dP with dV in flight (two waits leaving one wgmma group)."""
    from msa.ops.attention import gluon_bwd as gb
    const = dict(HKV=4, G=16, D=128, BS=128, TOPK=16, BLOCK_Q=4, STAGES=gb.STAGES,
                 DET=det, EARLY_DV=early_dv, TEACHER=False, NPT=8, LOAD_WARPS=gb.LOAD_WARPS,
                 num_warps=4)
    ptx = gluon_ptx("msa.ops.attention.gluon_bwd", "bwd_kernel", SIG, const)
    assert ptx.count("wgmma.wait_group.sync.aligned 1;") == (2 * 2 if early_dv else 0)
    assert "cp.async.cg.shared.global" in ptx and "cp.async.mbarrier.arrive" in ptx
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == 2 * 24
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16") == 2 * 8
    assert "setmaxnreg" in ptx
    atomics = ptx.count("atom.global.gpu.relaxed.add")
    assert (atomics == 0) if det else (atomics > 0)       # dK, dV: slots or atomics


@pytest.mark.parametrize("g", [16, 8, 6, 4])
def test_teacher_rows_compile_for_sm90(g):
    """``TEACHER``: per attention warpgroup and tile one more K = 64 wgmma, ``P^T E``, of
    N = the tile's queries padded (m64n8k16 for G >= 8, m64n16k16 for G = 4, 6: four
    each), and one fp32 store per value held (64 x N over 128 threads); the rest as
    without rows. With ``EARLY_DV`` dP is waited with two groups in flight (the rows' and
    dV): the rows' MMA is waited with the tile's last wait."""
    from msa.ops.attention import gluon_bwd as gb
    npt = max(8, 1 << (64 // g - 1).bit_length())
    early_dv = g >= gb.EARLY_DV_GROUP
    const = dict(HKV=4, G=g, D=128, BS=128, TOPK=16, BLOCK_Q=64 // g, STAGES=gb.STAGES,
                 DET=False, EARLY_DV=early_dv, TEACHER=True, NPT=npt,
                 LOAD_WARPS=gb.LOAD_WARPS, num_warps=4)
    ptx = gluon_ptx("msa.ops.attention.gluon_bwd", "bwd_kernel", SIG, const)
    assert ptx.count(f"wgmma.mma_async.sync.aligned.m64n{npt}k16.f32.bf16.bf16") == 2 * 4
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == 2 * 24
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16") == 2 * 8
    assert ptx.count("st.global.b32") == 2 * (64 * npt // 128)
    assert ptx.count("wgmma.wait_group.sync.aligned 2;") == (2 if early_dv else 0)
    assert gb.teaches(g) and not gb.teaches(3)


@pytest.mark.gpu
@pytest.mark.parametrize("det", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv,hs", [
    ((3000,), (3000,), 64, 4, 4),                    # MiniMax-M3 group of 16
    ((2000,), (2000,), 64, 8, 8),                    # G = 8
    ((700, 1, 900), (4000, 1, 2500), 32, 8, 8),      # G = 4, prefixes, a one-token segment
    ((1500,), (5000,), 24, 4, 1),                    # G = 6 (60-row tiles), shared top-k
    ((900,), (900,), 21, 7, 7),                      # G = 3 (21 queries, 63 rows)
    ((600,), (1800,), 4, 4, 4),                      # G = 1 (64 queries a tile)

])
def test_gradients_equal_the_triton_backward(q_lens, k_lens, hq, hkv, hs, det):
    from msa.ops.attention import gluon
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, d=128, seed=sum(q_lens) + 1)
    q, k, v = (c[x].to(DEVICE, torch.bfloat16) for x in "qkv")
    if not gluon.supported(q, k, v, 128):
        pytest.skip("the Gluon backward needs a Hopper GPU")
    topk = random_topk(c["seg"], hs, 16, 128, seed=5).to(DEVICE)
    topk[:, ::7] = -1                                # rows that select nothing
    scale = 0.088
    out, lse = attention_forward_reference(q.float(), k.float(), v.float(), topk, c["seg"],
                                           block_size=128, scale=scale)
    out = out.to(q.dtype)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    dout = torch.randn(out.shape, generator=g, device=DEVICE).to(q.dtype)
    dlse = torch.randn(lse.shape, generator=g, device=DEVICE)
    plan = plan_of(topk, c["seg"], 128, hkv)
    runs = [sparse_attn_bwd(q, k, v, topk, plan, out, lse, dout, dlse, scale=scale,
                            deterministic=det, kernel=kernel)
            for kernel in ("triton", "gluon", "gluon")]
    ref = attention_backward_reference(q.double(), k.double(), v.double(), topk, c["seg"],
                                       out.double(), lse.double(), dout.double(),
                                       dlse.double(), block_size=128, scale=scale)
    for name, a, b, r in zip(("dq", "dk", "dv"), runs[0], runs[1], ref):
        assert not b.isnan().any(), name
        cos = torch.nn.functional.cosine_similarity(b.double().flatten(),
                                                    a.double().flatten(), 0)
        assert cos > 0.99999, (name, cos)
        assert rel_err(b, r) < 3e-2, name                # MiniMax's bf16 tolerances
    if det:
        assert all(torch.equal(x, y) for x, y in zip(runs[1], runs[2]))   # bitwise


def test_kernel_argument_is_checked():
    """An unknown kernel is named; the Gluon one refuses what it cannot run (here: not a
    Hopper GPU, or fp32) instead of falling back silently."""
    c = make_case((200,), (200,), hq=4, hkv=2, d=128, seed=1)
    q, k, v = (c[x].to(DEVICE) for x in "qkv")
    topk = random_topk(c["seg"], 2, 2, 128, seed=1).to(DEVICE)
    out, lse = attention_forward_reference(q, k, v, topk, c["seg"], block_size=128,
                                           scale=0.1)
    plan = plan_of(topk, c["seg"], 128, 2)
    with pytest.raises(ValueError, match="kernel must be"):
        sparse_attn_bwd(q, k, v, topk, plan, out, lse, out, scale=0.1, kernel="cuda")
    with pytest.raises(NotImplementedError, match="Gluon backward"):
        sparse_attn_bwd(q, k, v, topk, plan, out, lse, out, scale=0.1, kernel="gluon")


@pytest.mark.gpu
def test_queries_and_output_gradient_with_their_own_strides():
    """The loader walks dO at its own strides: q sliced from a fused projection beside a
    contiguous dO gives the reference gradients (no copy of either)."""
    from msa.ops.attention import gluon
    c = make_case((900,), (900,), hq=32, hkv=4, d=128, seed=3)
    fused = torch.cat([c["q"], c["q"]], 1).to(DEVICE, torch.bfloat16)
    q = fused[:, :32]                                # stride(0) = 64 heads x 128
    k, v = (c[x].to(DEVICE, torch.bfloat16) for x in "kv")
    if not gluon.supported(q, k, v, 128):
        pytest.skip("the Gluon backward needs a Hopper GPU")
    topk = random_topk(c["seg"], 4, 8, 128, seed=2).to(DEVICE)
    out, lse = attention_forward_reference(q.float(), k.float(), v.float(), topk, c["seg"],
                                           block_size=128, scale=0.1)
    dout = torch.randn(out.shape, device=DEVICE).to(q.dtype)
    plan = plan_of(topk, c["seg"], 128, 4)
    got = sparse_attn_bwd(q, k, v, topk, plan, out.to(q.dtype), lse, dout, scale=0.1,
                          kernel="gluon")
    ref = attention_backward_reference(q.double(), k.double(), v.double(), topk, c["seg"],
                                       out.double(), lse.double(), dout.double(),
                                       block_size=128, scale=0.1)
    for name, a, r in zip(("dq", "dk", "dv"), got, ref):
        assert rel_err(a, r) < 3e-2, name


def test_backward_kernel_choice(monkeypatch):
    """``"gluon"`` where the Gluon forward applies (a Hopper GPU, bf16), ``"triton"``
    elsewhere and under ``MSA_BACKWARD_KERNEL=triton``; ``msa.attention_kernel`` reports
    it with ``backward=True``."""
    import msa
    from msa.ops.attention import gluon
    from msa.ops.attention.backward import backward_kernel
    q = torch.randn(300, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(300, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    want = "gluon" if gluon.supported(q, k, k, 128) else "triton"
    assert backward_kernel(q, k, k, 128) == want
    assert msa.attention_kernel(q, k, k, backward=True, backend="triton") == want
    assert msa.attention_kernel(q, k, k, backward=True, backend="reference") == "reference"
    assert backward_kernel(q.float(), k.float(), k.float(), 128) == "triton"
    monkeypatch.setenv("MSA_BACKWARD_KERNEL", "triton")
    assert backward_kernel(q, k, k, 128) == "triton"
