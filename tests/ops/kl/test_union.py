"""The union KL (msa.ops.kl.union) against the fp64 reference (interpreter on CPU, the real
kernels on a GPU): random and shared selections, chunks that cut tiles, fragments, padded
groups, replicated student rows, deterministic mode; dz rows left unwritten are NaN."""
import pytest
import torch

pytest.importorskip("triton")

import msa.ops.kl.triton as kl_triton  # noqa: E402
import msa.ops.kl.union as kl_union  # noqa: E402
from msa.ops.kl.union import chunk_tiles, tile_shape  # noqa: E402
from tests.helpers import DEVICE, kl_case, plan_of, random_topk, shared_topk  # noqa: E402
from tests.helpers.brute import make_case  # noqa: E402


def _run(q_lens, k_lens, hq, hkv, *, frag=None, kk=3, block=64, shared=False, chunk=None,
         det=False, dtype=torch.float32, d=64, seed=3, monkeypatch=None, kernel="union",
         future=False):
    select = shared_topk if shared else \
        (lambda *a, seed: random_topk(*a, seed=seed, future=future))
    run, ref = kl_case(q_lens, k_lens, hq, hkv, frag, kk, block, dtype, seed, d, select)
    empty = torch.empty                      # every dz row read was written first

    def poisoned(*a, **kw):
        x = empty(*a, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x
    monkeypatch.setattr(kl_triton.torch, "empty", poisoned)
    return run(kernel, chunk, det), ref


CASES = {
    # id: (q_lens, k_lens, hq, hkv, options)
    "G2-fragments-one-token": ((33, 1, 50), (200, 64, 300), 4, 2, dict(frag=(0, 1, 1))),
    "G4-blocks-after-the-query": ((60,), (150,), 8, 2, dict(future=True, chunk=25)),
    "G16-shared": ((40,), (300,), 16, 1, dict(shared=True)),
    "G6-padded-chunks-cut-tiles": ((45, 20), (300, 90), 12, 2, dict(chunk=17)),
    "G1-prefix-shared-chunked": ((70,), (400,), 2, 2, dict(shared=True, chunk=29)),
}


@pytest.mark.parametrize("name,det", [
    pytest.param(n, det, id=f"{n}-{'deterministic' if det else 'fast'}",
                 marks=[pytest.mark.slow] if det and n.startswith(("G6", "G1", "G4")) else [])
    for n in CASES for det in (False, True)])
def test_union_kl_matches_reference(name, det, monkeypatch):
    q_lens, k_lens, hq, hkv, opts = CASES[name]
    (loss, dqi, dki), (rl, rq, rk) = _run(q_lens, k_lens, hq, hkv, det=det,
                                          monkeypatch=monkeypatch, **opts)
    for x in (loss, dqi, dki):
        assert not x.isnan().any()
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dqi.double(), rq, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(dki.double(), rk, rtol=1e-4, atol=1e-8)
    assert loss > 0


def test_union_kl_tiles_are_powers_of_two_rows():
    """``GP`` teacher rows per query (the group padded), ``QT`` a power of two: 128-row
    tiles of the Gluon union forward's queries at G = 16 / 8 / 4, 64 for head dim 256 or
    fp32; each query's student row repeated to fill 16 rows."""
    assert [tile_shape(g, 16, 128, 2) for g in (16, 8, 6, 4, 1)] == \
        [(8, 2), (16, 1), (16, 1), (32, 1), (32, 1)]
    assert tile_shape(16, 16, 256, 2) == tile_shape(16, 16, 128, 4) == (4, 4)
    assert tile_shape(128, 16, 128, 2) == (1, 16) and tile_shape(4, 48, 128, 2) == (16, 1)


def test_union_kl_needs_one_kv_head_per_index_head(monkeypatch):
    c = make_case((20,), (100,), hq=4, hkv=2, d=32, hi=1, di=32, seed=1)
    seg = c["seg"]
    topk = random_topk(seg, 1, 2, 32, seed=1, future=False).to(DEVICE)
    q, k, qi, ki = (c[n].to(DEVICE) for n in ("q", "k", "qi", "ki"))
    lse = torch.zeros(q.shape[:2], device=DEVICE)
    with pytest.raises(ValueError, match="union KL needs one KV head per index head"):
        kl_triton.indexer_kl_bwd(q, k, lse, qi, ki, lse[:, :1].T.contiguous(), topk,
                                 plan_of(topk, seg, 32, 1), scale=0.125, index_scale=0.125,
                                 kernel="union")
    monkeypatch.setenv("MSA_KL_KERNEL", "union")
    assert kl_triton.kl_kernel(q, k, 1, 32) == "triton"          # Hkv != Hi: not the union
    assert kl_triton.kl_kernel(q, k, 2, 32) == "union"


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv,shared,frag", [
    ((3000,), (3000,), 64, 4, True, None),                    # MiniMax-M3: G = 16
    ((3000,), (3000,), 64, 4, False, None),
    ((2000,), (2000,), 64, 8, True, None),                    # G = 8
    ((1500,), (3000,), 24, 4, True, None),                    # G = 6: 8 rows per query
    ((700, 1, 900), (4000, 1, 2500), 32, 8, False, None),     # G = 4, prefixes, one token
    ((500, 300), (1500, 900), 64, 4, True, (0, 1)),           # fragments
])
def test_union_kl_on_gpu_equals_auto_and_reference(q_lens, k_lens, hq, hkv, shared, frag,
                                                   monkeypatch):
    """bf16, head dim 128, blocks of 128, 16 blocks a query: the union KL against the
    automatic choice's (the Gluon teacher on Hopper) and the fp64 reference;
    chunking changes nothing; deterministic mode is bitwise repeatable."""
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA GPU")
    kw = dict(kk=16, block=128, shared=shared, dtype=torch.bfloat16, d=128, seed=sum(q_lens),
              monkeypatch=monkeypatch, frag=frag)
    (loss, dqi, dki), (rl, rq, rk) = _run(q_lens, k_lens, hq, hkv, **kw)
    chunked, _ = _run(q_lens, k_lens, hq, hkv, chunk=333, **kw)
    auto, _ = _run(q_lens, k_lens, hq, hkv, **{**kw, "kernel": None})
    cos = torch.nn.functional.cosine_similarity
    for x, y, r in zip((loss, dqi, dki), auto, (rl, rq, rk)):
        assert not x.isnan().any()
        assert cos(x.double().flatten(), y.double().flatten(), 0) > 0.99999
        assert cos(x.double().flatten(), r.flatten(), 0) > 0.999
    torch.testing.assert_close(loss.double(), rl, rtol=2e-2, atol=0)
    for x, y in zip((loss, dqi, dki), chunked):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-6)
    d1, _ = _run(q_lens, k_lens, hq, hkv, det=True, **kw)
    d2, _ = _run(q_lens, k_lens, hq, hkv, det=True, **kw)
    for x, y in zip(d1, d2):
        assert torch.equal(x, y)


def test_msa_attention_with_the_union_kl_trains_like_the_reference(monkeypatch):
    """``MSA_KL_KERNEL=union`` (and the union forward, whose union plan the KL then
    shares): the whole step (indexer, attention, KL) through the public API, its
    gradients and KL loss against the reference backend's."""
    import msa
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=3,
                        kl_loss_coeff=0.5)
    c = make_case((90, 40), (90, 200), hq=4, hkv=2, hi=2, seed=6)
    import msa.ops.attention.union as union_fwd
    built, build = [], union_fwd.build_union_plan
    monkeypatch.setattr(union_fwd, "build_union_plan",
                        lambda *a: built.append(a[2:]) or build(*a))
    grads = {}
    for backend in ("triton", "reference"):
        if backend == "triton":
            monkeypatch.setenv("MSA_KL_KERNEL", "union")
            monkeypatch.setenv("MSA_FORWARD_KERNEL", "union")
        leaves = [c[n].to(DEVICE).clone().requires_grad_(True)
                  for n in ("q", "k", "v", "qi", "ki")]
        assert msa.indexer_kl_kernel(*leaves[:2], *leaves[3:], backend=backend) == \
            ("union" if backend == "triton" else "reference")
        out, aux = msa.msa_attention(*leaves, c["cu_seqlens_q"].to(DEVICE),
                                     c["cu_seqlens_k"].to(DEVICE), config=cfg,
                                     return_aux=True, backend=backend)
        out.backward(torch.ones_like(out))
        grads[backend] = [x.grad for x in leaves] + [aux.kl_loss]
        monkeypatch.delenv("MSA_KL_KERNEL", raising=False)
        monkeypatch.delenv("MSA_FORWARD_KERNEL", raising=False)
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)
    assert grads["triton"][3].abs().sum() > 0                 # the KL reaches qi
    assert built == [(32, 2)]            # one union plan (32 queries of 2 heads) for both


def test_each_chunk_launches_at_least_its_tiles():
    """``chunk_tiles`` bounds the tiles (of ``msa.ops.plan.query_tiles``) that hold a
    query of a chunk, over packed segments of random lengths (empty ones too)."""
    from msa.ops.plan import query_tiles
    from msa.varlen import Segments
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        lens = torch.randint(0, 40, (int(torch.randint(1, 6, (1,), generator=g)),),
                             generator=g).tolist()
        starts = [sum(lens[:i]) for i in range(len(lens))]
        seg = Segments(starts, lens, starts, lens, sum(lens), sum(lens))
        qt = [1, 4, 8, 16][trial % 4]
        q0, n, _, _ = query_tiles(seg, qt, "cpu")
        for c0 in range(0, seg.total_q, 7):
            for c1 in (c0 + 1, c0 + 9, seg.total_q):
                held = int(((q0 < c1) & (q0 + n > c0)).sum())
                assert held <= chunk_tiles(seg, qt, c0, c1), (lens, qt, c0, c1)


def test_union_kl_compiles_for_sm90_without_spills():
    """bf16, head dim 128, 16 blocks a query, 8 warps, 2 stages (``ptxas -v``): no register
    spills at G = 16 / 8 / 6 (head-major teacher rows; docs/experiments.md)."""
    from tests.helpers import triton_sass_report
    ptr = dict(Q="*bf16", K="*bf16", TLSE="*fp32", QI="*bf16", KI="*bf16", ILSE="*fp32",
               TOPK="*i32", DZ="*bf16", DQI="*fp32", LOSS="*fp32", U="*i32", NU="*i32",
               TQ0="*i32", TN="*i32", TKBASE="*i32", TOFF="*i32", ORDER="*i64", SPAN="*i64")
    names = kl_union.union_kl_kernel.arg_names
    sig = {n: ptr.get(n, "fp32" if n in ("scale_log2", "iscale", "coeff") else "i32")
           for n in names[:names.index("G")]}
    consts = []
    for g in (16, 8, 6):
        qt, r = tile_shape(g, 16, 128, 2)
        gp = 128 // qt
        consts.append(dict(G=g, GP=gp, QT=qt, R=r, D=128, DI=128, BS=128, W=qt * 16, HI=4,
                           TOPK_K=16, KP=16, PRECISION="tf32", UPCAST=False,
                           num_warps=max(4, qt * gp // 16), num_stages=2))
    for g, (regs, spill) in zip((16, 8, 6), triton_sass_report(
            "msa.ops.kl.union", "union_kl_kernel", sig, consts)):
        assert spill == 0 and regs <= 255, (g, regs, spill)
