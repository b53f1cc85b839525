"""The Gluon KV-outer forward (msa.ops.attention.gluon): it compiles for Hopper on any
machine (cp.async gathers, wgmma, warp specialization), and on a Hopper GPU its partial
outputs give what the Triton kernel gives on the same plan."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from msa.ops.attention.forward import sparse_attn_fwd  # noqa: E402
from msa.ops.attention.naive import attention_forward_reference  # noqa: E402
from tests.helpers import DEVICE, compiled_ptx, plan_of, random_topk  # noqa: E402
from tests.helpers.brute import make_case, rel_err  # noqa: E402

COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from msa.ops.attention import gluon as ga
const = dict(HKV=4, G=16, G_PAD=16, D=128, BS=128, TOPK=16, BLOCK_Q=4, STAGES=ga.STAGES,
             LOAD_WARPS=ga.LOAD_WARPS, CONSUMERS=CONSUMERS, num_warps=4)
sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "PO": "*bf16", "PL": "*fp32", "POS": "*i32",
       "EDGE_Q": "*i32", "EDGE_SLOT": "*i32", "ITEM_H": "*i32", "ITEM_KROW": "*i32",
       "ITEM_T0": "*i32", "ITEM_NK": "*i32", "ITEM_E0": "*i32", "ITEM_E1": "*i32",
       "q0": "i32", "scale_log2": "fp32", "stride_qt": "i32", "stride_qh": "i32",
       "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32",
       **{k: "constexpr" for k in const}}
aligned = [n for n in sig if sig[n].startswith("*") or n.startswith("stride")]
attrs = {(ga.fwd_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
src = GluonASTSource(fn=ga.fwd_kernel, signature=sig, constexprs=const, attrs=attrs)
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}
                     ).asm["ptx"])
"""


@pytest.mark.parametrize("consumers", [1, 2])
def test_compiles_for_sm90_to_gathers_and_wgmma(consumers):
    """Compiled in a fresh process (``compiled_ptx``)."""
    ptx = compiled_ptx(f"CONSUMERS = {consumers}\n" + COMPILE)
    assert "cp.async.cg.shared.global" in ptx and "cp.async.mbarrier.arrive" in ptx
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx
    assert "setmaxnreg" in ptx and "ld.local" not in ptx          # no spills
    assert ptx.count("wgmma.mma_async") == 16 * consumers           # QK^T and PV per group


@pytest.mark.gpu
@pytest.mark.parametrize("consumers", [1, 2])
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv,hs", [
    ((3000,), (3000,), 64, 4, 4),                    # MiniMax-M3 group of 16
    ((700, 1, 900), (4000, 1, 2500), 32, 8, 8),      # G = 4, prefixes, a one-token segment
    ((1500,), (5000,), 24, 4, 1),                    # G = 6 (padded to 8), shared selection
])
def test_partials_equal_the_triton_kernel(monkeypatch, q_lens, k_lens, hq, hkv, hs,
                                          consumers):
    from msa.ops.attention import gluon
    monkeypatch.setattr(gluon, "CONSUMERS", consumers)
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, d=128, seed=sum(q_lens))
    q, k, v = (c[x].to(DEVICE, torch.bfloat16) for x in "qkv")
    if not gluon.supported(q, k, v, 128):
        pytest.skip("the Gluon forward needs a Hopper GPU")
    topk = random_topk(c["seg"], hs, 16, 128, seed=3).to(DEVICE)
    outs = []
    for kernel in ("triton", "gluon"):
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"), device=DEVICE)
        sparse_attn_fwd(q, k, v, topk, plan_of(topk, c["seg"], 128, hkv), scale=0.088,
                        out=out, lse=lse, query_major=False, kernel=kernel)
        outs.append((out, lse))
    (a, la), (b, lb) = outs
    assert not b.isnan().any() and not lb.isnan().any()              # every row written
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
