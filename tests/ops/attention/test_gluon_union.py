"""The Gluon union forward (msa.ops.attention.gluon_union): it compiles for Hopper on any
machine (TMA loads, wgmma, warp specialization), refuses what it cannot run, and on a
Hopper GPU gives the reference's output over every group size."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from msa.ops.attention.forward import sparse_attn_fwd  # noqa: E402
from msa.ops.attention.naive import attention_forward_reference  # noqa: E402
from msa.ops.attention.union import union_fwd  # noqa: E402
from tests.helpers import DEVICE, gluon_ptx, plan_of, random_topk, shared_topk  # noqa: E402
from tests.helpers.brute import make_case, rel_err  # noqa: E402


@pytest.mark.parametrize("g", [16, 6])
def test_compiles_for_sm90_to_tma_loads_and_wgmma(g):
    """Compiled in a fresh process (``gluon_ptx``): keys and values by TMA, both
    warpgroups' MMAs, register budgets set, no spills."""
    from msa.ops.attention import gluon_union as gu
    from msa.ops.plan import tile_queries
    desc = f"tensordesc<bf16[128, 128],{gu.TILE_L.value!r}>"
    sig = dict(Q="*bf16", K_DESC=desc, V_DESC=desc, U="*i32", NU="*i32", BITS="*i64",
               HALVES="*i64", TQ0="*i32", TN="*i32", TKBASE="*i32", TOFF="*i32", OUT="*bf16",
               LSE="*fp32", num_tiles="i32", scale_log2="fp32", stride_qt="i32",
               stride_qh="i32", stride_ot="i32", stride_oh="i32", stride_lt="i32")
    qt = tile_queries(g, 16, gu.TILE_ROWS)
    const = dict(HS=4, G=g, QT=qt, D=128, BS=128, W=qt * 16, NW=-(-qt * 16 // 64),
                 STAGES=gu.STAGES, num_warps=4)
    ptx = gluon_ptx("msa.ops.attention.gluon_union", "union_kernel", sig, const)
    assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier" in ptx
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx
    assert ptx.count("wgmma.mma_async") == 32        # QK^T, PV: 8 k-steps, 2 warpgroups
    assert "setmaxnreg" in ptx and "ld.local" not in ptx


def test_boxes_stay_in_segments_only_where_segments_end_on_whole_blocks():
    """The Gluon kernel's TMA boxes of whole blocks may read past a segment's keys only
    into zeros past the tensor, never into the next segment."""
    from msa.ops.attention.union import boxes_stay_in_segments
    from msa.varlen import Segments

    def seg(k_lens):
        bases = [sum(k_lens[:i]) for i in range(len(k_lens))]
        return Segments(bases, [1] * len(k_lens), bases, list(k_lens), len(k_lens),
                        sum(k_lens))
    assert boxes_stay_in_segments(seg([300]), 128, 300)            # the last: zero fill
    assert boxes_stay_in_segments(seg([256, 128, 77]), 128, 461)
    assert not boxes_stay_in_segments(seg([256, 129, 77]), 128, 462)
    assert not boxes_stay_in_segments(seg([300]), 128, 400)        # rows after the keys
    assert boxes_stay_in_segments(seg([]), 128, 0)


def _case(q_lens, k_lens, hq, hkv, hs, shared, seed=3):
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, d=128, seed=sum(q_lens))
    q, k, v = (c[x].to(DEVICE, torch.bfloat16) for x in "qkv")
    topk = (shared_topk if shared else random_topk)(c["seg"], hs, 16, 128, seed=seed)
    topk = topk.to(DEVICE)
    topk[:, ::7] = -1                                # rows that select nothing
    return c, q, k, v, topk


def test_refuses_what_it_cannot_run():
    """Other tiles or fp32 (or any input off Hopper): a ``ValueError`` naming the option."""
    c, q, k, v, topk = _case((40,), (300,), 4, 1, 1, True)
    plan = plan_of(topk, c["seg"], 128, 1)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device=DEVICE)
    with pytest.raises(ValueError, match="gluon=True"):
        union_fwd(q, k, v, plan.indices(topk), plan, out, lse, scale=0.1, gluon=True,
                  tile_rows=128)
    with pytest.raises(ValueError, match="gluon=True needs a Hopper GPU"):
        union_fwd(q.float(), k.float(), v.float(), plan.indices(topk), plan, out.float(),
                  lse, scale=0.1, gluon=True)


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv,hs", [
    ((3000,), (3000,), 64, 4, 4),                    # MiniMax-M3 group of 16 (8 queries)
    ((700, 1, 900), (4096, 128, 2500), 64, 8, 8),    # G = 8, prefixes, a one-token segment
    ((1500,), (5000,), 24, 4, 1),                    # G = 6 (21 queries, 126 rows), Hs = 1
    ((2000, 333), (2048, 2400), 32, 8, 8),           # G = 4 (32 queries, 8 mask words)
    ((900,), (900,), 256, 2, 2),                     # G = 128 (one query a tile)
])
@pytest.mark.parametrize("shared", [False, True])
def test_matches_the_reference(q_lens, k_lens, hq, hkv, hs, shared):
    """bf16 against the fp64 reference on the same inputs (MiniMax's bf16 tolerances) and
    the Triton KV-outer kernel on the same plan; NaN-poisoned outputs, every row written,
    bitwise repeatable."""
    from msa.ops.attention import gluon_union
    c, q, k, v, topk = _case(q_lens, k_lens, hq, hkv, hs, shared)
    plan = plan_of(topk, c["seg"], 128, hkv)
    if not gluon_union.supported(q, k, v, 128, plan.rows.paged):
        pytest.skip("the Gluon union forward needs a Hopper GPU")
    got = []
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"), device=DEVICE)
        sparse_attn_fwd(q, k, v, topk, plan, scale=0.088, out=out, lse=lse,
                        kernel="union", gluon=True)
        got.append((out, lse))
    (out, lse), (out2, lse2) = got
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    ref_o, ref_l = attention_forward_reference(q.double(), k.double(), v.double(), topk,
                                               c["seg"], block_size=128, scale=0.088)
    assert rel_err(out, ref_o) < 1e-2
    seen = ref_l.isfinite()
    assert torch.equal(lse.isfinite(), seen)
    torch.testing.assert_close(lse[seen].double(), ref_l[seen], rtol=1e-3, atol=1e-3)
    assert (out[~seen] == 0).all()                   # a row that sees nothing: 0, -inf
    want, _ = sparse_attn_fwd(q, k, v, topk, plan, scale=0.088, query_major=False,
                              kernel="triton")
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(),
                                                want.float().flatten(), 0)
    assert cos > 0.99999, cos


@pytest.mark.gpu
def test_a_segment_ending_inside_a_block_keeps_the_kv_outer_kernel():
    """A packed batch whose first segment ends inside a block (a box would reach the
    next segment's rows): the automatic choice keeps the KV-outer kernel and
    ``gluon=True`` is refused by name."""
    from msa.ops.attention import gluon_union
    from msa.ops.attention.forward import selection_kernel
    c, q, k, v, topk = _case((700, 900), (4000, 2500), 64, 4, 4, True)
    plan = plan_of(topk, c["seg"], 128, 4)
    if not gluon_union.supported(q, k, v, 128, plan.rows.paged):
        pytest.skip("the Gluon union forward needs a Hopper GPU")
    assert selection_kernel(q, k, v, plan.indices(topk), plan) == "gluon"
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device=DEVICE)
    with pytest.raises(ValueError, match="whole block"):
        union_fwd(q, k, v, plan.indices(topk), plan, out, lse, scale=0.1, gluon=True)
