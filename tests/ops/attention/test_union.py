"""Union forward (``msa.ops.attention.union``) vs the reference, and its plan vs a direct
count (interpreter on CPU, real kernels on GPU)."""
import pytest
import torch

triton = pytest.importorskip("triton")

from tests.helpers import (DEVICE, force_smallest_launch, nan_empty, plan_of,  # noqa: E402
                           random_topk, shared_topk)
from tests.helpers.brute import make_case, rel_err  # noqa: E402
from tests.ops.attention.test_forward import (CASES, _inputs, _poisoned,  # noqa: E402
                                             public_api_matches_reference)
from msa.ops.attention.forward import sparse_attn_fwd  # noqa: E402
from msa.ops.attention.naive import attention_forward_reference  # noqa: E402
from msa.ops.attention import union as union_module  # noqa: E402
from msa.ops.attention.union import build_union_plan  # noqa: E402
from msa.ops.plan import tile_queries  # noqa: E402


def _check(c, topk, q, k, v, block, atol=1e-5, **kw):
    out, lse = _poisoned(q)
    scale = q.shape[-1] ** -0.5
    sparse_attn_fwd(q, k, v, topk, plan_of(topk, c["seg"], block, k.shape[1]), scale=scale,
                    out=out, lse=lse, kernel="union", **kw)
    ref_o, ref_l = attention_forward_reference(q.double(), k.double(), v.double(), topk,
                                               c["seg"], block_size=block, scale=scale)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref_o, rtol=atol, atol=atol)
    torch.testing.assert_close(lse.double(), ref_l, rtol=min(atol, 1e-3), atol=min(atol, 1e-3))


@pytest.mark.parametrize("name", [n for n in CASES if "D256" not in n])
def test_union_forward_matches_reference_fp32(name):
    c, topk, (q, k, v) = _inputs(name, torch.float32)
    _check(c, topk, q, k, v, CASES[name][6])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_union_forward_half_head_dim_256(dtype):
    c, topk, (q, k, v) = _inputs("G8-D256-B128", dtype)
    _check(c, topk, q, k, v, 128, atol=3e-2)


@pytest.mark.parametrize("hq,hkv", [(16, 1), (8, 2), (6, 1), (4, 1)])
def test_union_forward_shared_selections_every_group(hq, hkv):
    """The GQA groups of issue-sized models (tiles of 4 / 8 / 10 / 16 queries) over
    selections consecutive queries share, in two segments."""
    c = make_case((45, 30), (700, 330), hq=hq, hkv=hkv, d=64, seed=hq)
    topk = shared_topk(c["seg"], hkv, 6, 64, seed=hq).to(DEVICE)
    _check(c, topk, *(c[n].to(DEVICE) for n in "qkv"), 64)


@pytest.mark.parametrize("rows", [16, 128])
def test_union_forward_other_tile_sizes(rows):
    """Tiles of 16 rows (4 queries at G = 4) and of 128 (32 queries, 8 warps, 3 mask
    words)."""
    from msa.ops.attention.union import union_fwd
    c = make_case((45, 30), (700, 330), hq=4, hkv=1, d=64, seed=rows)
    topk = shared_topk(c["seg"], 1, 6, 64, seed=rows).to(DEVICE)
    q, k, v = (c[n].to(DEVICE) for n in "qkv")
    out, lse = _poisoned(q)
    union_fwd(q, k, v, topk, plan_of(topk, c["seg"], 64, 1), out, lse, scale=0.125,
              tile_rows=rows)
    ref_o, ref_l = attention_forward_reference(q.double(), k.double(), v.double(), topk,
                                               c["seg"], block_size=64, scale=0.125)
    torch.testing.assert_close(out.double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_l, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["G2-varlen-chunked-B64", "fragments-shared", "G16-D128-B64"])
def test_union_forward_by_tma_matches_reference(name):
    """Keys and values by tensor descriptors (``tma=True``), packed segments included
    (a box may reach into the next segment's rows: their probabilities are 0)."""
    from msa.ops.attention.union import union_fwd
    c, topk, (q, k, v) = _inputs(name, torch.float32)
    block = CASES[name][6]
    out, lse = _poisoned(q)
    union_fwd(q, k, v, topk, plan_of(topk, c["seg"], block, k.shape[1]), out, lse,
              scale=0.125, tma=True)
    ref_o, ref_l = attention_forward_reference(q.double(), k.double(), v.double(), topk,
                                               c["seg"], block_size=block, scale=0.125)
    torch.testing.assert_close(out.double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_l, rtol=1e-5, atol=1e-5)


def test_union_forward_by_tma_refuses_keys_it_cannot_read():
    from msa.ops.attention.union import union_fwd
    c, topk, (q, k, v) = _inputs("G2-varlen-chunked-B64", torch.float32)
    plan = plan_of(topk, c["seg"], 64, 2)
    out, lse = _poisoned(q)
    strided = k.transpose(0, 1).contiguous().transpose(0, 1)          # heads not adjacent
    with pytest.raises(ValueError, match="tma=True"):
        union_fwd(q, strided, v, topk, plan, out, lse, scale=0.125, tma=True)


def test_union_forward_smallest_launch(monkeypatch):
    """The last fallback (quarter blocks), for GPUs with less shared memory."""
    import msa.ops.attention.union as union
    used = force_smallest_launch(monkeypatch, union)
    c, topk, (q, k, v) = _inputs("G2-varlen-chunked-B64", torch.float32)
    _check(c, topk, q, k, v, 64)
    assert used and used[0]["BN"] == 16


def test_union_forward_empty_rows_give_zero_and_neg_inf():
    c, _, (q, k, v) = _inputs("G2-varlen-chunked-B64", torch.float32)
    topk = torch.full((2, q.shape[0], 3), -1, dtype=torch.int32, device=DEVICE)
    topk[1, 5, 2] = 0
    topk[0, 7, 0] = 3                      # after query 7 (position 6): nothing visible
    out, lse = _poisoned(q)
    sparse_attn_fwd(q, k, v, topk, plan_of(topk, c["seg"], 64, 2), scale=0.125, out=out,
                    lse=lse, kernel="union")
    mask = torch.ones_like(lse, dtype=torch.bool)
    mask[5, 2:] = False
    assert torch.isfinite(lse[5, 2:]).all()
    assert torch.all(out[mask] == 0) and torch.all(torch.isneginf(lse[mask]))


def _direct_plan(topk, seg, block, qt):
    """Per (selection head, tile): the sorted union and each query's set of places, from
    Python sets, tiles in ``query_tiles``'s order."""
    from msa.ops.geometry import query_tiles
    q0, n, _, off = (x.tolist() for x in query_tiles(seg, qt, "cpu"))
    out = []
    for h in range(topk.shape[0]):
        for t0, nt, o in zip(q0, n, off):
            ids = [{b for b in topk[h, t0 + i].tolist() if b >= 0 and b * block <= o + i}
                   for i in range(nt)]
            union = sorted(set().union(*ids))
            out.append((union, [sorted(union.index(b) for b in s) for s in ids]))
    return out


def _set_bits(words):
    """The set bits of 64-bit words (int64, bit 63 negative), word ``w``'s bit ``b`` as
    ``64 w + b``, ascending."""
    out = []
    for w, word in enumerate(words):
        x = word & (2 ** 64 - 1)
        while x:
            low = x & -x
            out.append(64 * w + low.bit_length() - 1)
            x ^= low
    return out


@pytest.mark.parametrize("group,shared,rows", [
    (16, True, 64), (6, False, 128), (4, True, 64), (1, False, 64),
    pytest.param(16, True, 128, marks=pytest.mark.slow),
    pytest.param(4, True, 128, marks=pytest.mark.slow),
    pytest.param(6, False, 64, marks=pytest.mark.slow)])
def test_union_plan_equals_direct_count(group, shared, rows, monkeypatch):
    """Union, count, bits (several 64-bit words at K * QT > 64) and the halves' words
    (at G = 6 and 128 rows, query 10 straddles the two) against Python sets, over random
    selections (with blocks after the query, dropped) and shared ones; the buffers
    ``build_union_plan`` leaves to the kernel (the union, the count) start as -1."""
    c = make_case((37, 50), (900, 400), seed=group)
    seg, k = c["seg"], 9
    topk = (shared_topk(seg, 2, k, 64, group) if shared else
            random_topk(seg, 2, k, 64, seed=group)).to(DEVICE)
    plan = plan_of(topk, seg, 64, 2)
    qt = tile_queries(group, k, rows)
    nan_empty(union_module, monkeypatch, ints=-1)
    up = build_union_plan(topk, plan, qt, group)
    direct = _direct_plan(topk.cpu(), seg, 64, qt)
    assert up.bits.shape[3] == -(-qt * k // 64)
    blocks, count, bits, halves = (x.cpu().flatten(0, 1) for x in
                                   (up.blocks, up.count, up.bits, up.halves))
    bits, halves = bits.tolist(), halves.tolist()
    for row, (union, places) in enumerate(direct):
        assert count[row] == len(union)
        assert blocks[row, :len(union)].tolist() == union
        half_places = [set(), set()]
        for i in range(qt):
            mine = places[i] if i < len(places) else []
            assert _set_bits(bits[row][i]) == mine
            for h in {min(i * group // 64, 1), min((i * group + group - 1) // 64, 1)}:
                half_places[h].update(mine)
        for h in (0, 1):
            assert _set_bits(halves[row][h]) == sorted(half_places[h])
    if shared:
        assert count.float().mean() < 0.5 * qt * k


def test_environment_chooses_the_union_kernel(monkeypatch):
    """``MSA_FORWARD_KERNEL=union``: named by ``attention_kernel`` past the few-query
    case, run by ``msa_sparse_attention`` (its gradients from the KV-outer backward)."""
    import msa
    import msa.ops.attention.forward as fwd
    monkeypatch.setenv("MSA_FORWARD_KERNEL", "union")
    many = torch.zeros(1025, 4, 64, device=DEVICE)
    kk = torch.zeros(1025, 2, 64, device=DEVICE)
    assert msa.attention_kernel(many, kk, kk, block_size=64, backend="triton") == "union"
    assert msa.attention_kernel(many[:1024], kk, kk, block_size=64,
                                backend="triton") == "query_major"
    calls = []
    monkeypatch.setattr(fwd, "QUERY_MAJOR_MAX_QUERIES", 0)     # 84 queries: not few here
    real = fwd.union_fwd
    monkeypatch.setattr(fwd, "union_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    public_api_matches_reference()
    assert len(calls) == 1
    monkeypatch.setenv("MSA_FORWARD_KERNEL", "unoin")
    with pytest.raises(ValueError, match="MSA_FORWARD_KERNEL='unoin'"):
        msa.attention_kernel(many, kk, kk, block_size=64, backend="triton")


def test_union_launch_options_pass_through_and_others_are_refused():
    c, topk, (q, k, v) = _inputs("G2-varlen-chunked-B64", torch.float32)
    _check(c, topk, q, k, v, 64, tile_rows=16)
    with pytest.raises(TypeError, match="block_q"):
        _check(c, topk, q, k, v, 64, block_q=4)
    for bad in (96, 8, 64.0):
        with pytest.raises(ValueError, match="tile_rows must be a power of two"):
            _check(c, topk, q, k, v, 64, tile_rows=bad)


def test_partials_refuse_the_union_kernel():
    from msa.ops.attention.forward import launch_partials
    c, topk, (q, k, v) = _inputs("G2-varlen-chunked-B64", torch.float32)
    plan = plan_of(topk, c["seg"], 64, 2)
    with pytest.raises(ValueError, match="kernel='union'"):
        launch_partials(q, k, v, plan.rows, plan.chunks[0][2], 0, None, None, scale=0.1,
                        topk=3, block_size=64, kernel="union")


@pytest.mark.parametrize("lengths,q_lens", [((150, 70), (40, 70)), ((300,), (37,))])
def test_union_forward_reads_pages_in_place(monkeypatch, lengths, q_lens):
    """Chunked prefill over cached pages (``paged_attention_in_place``): the union kernel
    finds each block's page through the plan's rows."""
    from msa.inference import paged_attention, paged_attention_in_place, paged_indexer
    from tests.inference.test_fp8_cache import _caches
    _, cache = _caches(list(lengths))
    ids = list(range(len(lengths)))
    table, lens = cache.page_table(ids), cache.seq_lens(ids)
    g = torch.Generator().manual_seed(sum(q_lens))
    q = torch.randn(sum(q_lens), 4, 64, generator=g).to(DEVICE)
    qi = torch.randn(sum(q_lens), 2, 64, generator=g).to(DEVICE)
    kp, vp, kip = cache.layer(0)
    topk = paged_indexer(qi, kip, table, lens, list(q_lens), block_size=64, topk=3)
    want = paged_attention(q, kp, vp, topk, table, lens, list(q_lens))
    monkeypatch.setenv("MSA_FORWARD_KERNEL", "union")
    got = paged_attention_in_place(q, kp, vp, topk, table, lens, list(q_lens))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tile_queries_fill_the_rows_within_bounds():
    assert [tile_queries(g, 16) for g in (16, 8, 6, 4, 1, 128)] == [4, 8, 10, 16, 32, 1]
    assert tile_queries(16, 16, rows=128) == 8
    assert tile_queries(1, 64) == 16 and tile_queries(2, 64, rows=128) == 16   # 1024 blocks


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv,hs", [
    ((3000,), (3000,), 64, 4, 4),                    # MiniMax-M3 group of 16
    ((700, 1, 900), (4000, 1, 2500), 64, 8, 8),      # G = 8, prefixes, a one-token segment
    ((1500,), (5000,), 24, 4, 1),                    # G = 6 (60-row tiles), shared selection
    ((2000,), (2000,), 32, 8, 8),                    # G = 4
])
@pytest.mark.parametrize("shared", [False, True])
def test_bf16_variants_equal_the_kv_outer_kernel(q_lens, k_lens, hq, hkv, hs, shared):
    """bf16 at realistic shapes, random and shared selections: every variant (64- and
    128-row tiles, pointers and, on Hopper, TMA) gives the Triton KV-outer kernel's
    output on the same plan, and is bitwise repeatable."""
    from msa.ops.attention.union import union_fwd
    from msa.ops.launch import on_hopper
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, d=128, seed=sum(q_lens))
    q, k, v = (c[x].to(DEVICE, torch.bfloat16) for x in "qkv")
    topk = (shared_topk if shared else random_topk)(c["seg"], hs, 16, 128, seed=3).to(DEVICE)
    topk[:, ::7] = -1                                # rows that select nothing
    plan = plan_of(topk, c["seg"], 128, hkv)
    want, want_lse = _poisoned(q)
    sparse_attn_fwd(q, k, v, topk, plan, scale=0.088, out=want, lse=want_lse,
                    query_major=False, kernel="triton")
    for rows in (64, 128):
        for tma in (False, True) if on_hopper(q) else (False,):
            got = []
            for _ in range(2):
                out, lse = _poisoned(q)
                union_fwd(q, k, v, plan.indices(topk), plan, out, lse, scale=0.088,
                          tile_rows=rows, tma=tma)
                got.append((out, lse))
            (out, lse), (out2, lse2) = got
            assert torch.equal(out, out2) and torch.equal(lse, lse2)
            assert not out.isnan().any() and not lse.isnan().any()
            cos = torch.nn.functional.cosine_similarity(out.float().flatten(),
                                                        want.float().flatten(), 0)
            assert cos > 0.99999, (rows, tma, cos)
            assert rel_err(out, want.double()) < 1e-2, (rows, tma)
            seen = want_lse.isfinite()
            assert torch.equal(lse.isfinite(), seen)
            torch.testing.assert_close(lse[seen], want_lse[seen], rtol=1e-3, atol=1e-3)


def test_the_forward_takes_the_union_kernel_for_shared_selections(monkeypatch):
    """Where the Gluon KV-outer kernel would run (Hopper; faked here), the forward takes
    the union kernel for a selection consecutive queries share and keeps the KV-outer
    one for a random selection or where launch options are given; ``attention_kernel``
    says the same from the selection."""
    import msa
    from msa.ops.attention import forward as F
    from msa.ops.attention import gluon_union, union
    c = make_case((600,), (1400,), hq=16, hkv=1, d=64, seed=5)
    q, k, v = (c[n].to(DEVICE) for n in "qkv")
    shared = shared_topk(c["seg"], 1, 8, 64, seed=5).to(DEVICE)
    scattered = random_topk(c["seg"], 1, 8, 64, seed=5).to(DEVICE)
    monkeypatch.setattr(F, "forward_kernel", lambda *a: "gluon")
    monkeypatch.setattr(union, "gluon_applies", lambda *a: True)
    monkeypatch.setattr(gluon_union, "supported", lambda *a: True)
    plans = {name: plan_of(t, c["seg"], 64, 1) for name, t in
             (("shared", shared), ("scattered", scattered))}
    assert F.selection_kernel(q, k, v, shared, plans["shared"]) == "union"
    assert F.selection_kernel(q, k, v, scattered, plans["scattered"]) == "gluon"
    assert F.selection_kernel(q, k, v, shared, plans["shared"], None, {"block_q": 4}) == "gluon"
    assert F.selection_kernel(q, k, v, shared, plans["shared"], "triton") == "triton"
    monkeypatch.setattr("msa.ops.attention.forward.forward_kernel", lambda *a: "gluon")
    monkeypatch.setattr("msa.ops.attention.forward.use_query_major", lambda *a: False)
    assert msa.attention_kernel(q, k, v, topk_indices=shared, backend="triton") == "union"
    assert msa.attention_kernel(q, k, v, topk_indices=scattered, backend="triton") == "gluon"
    assert msa.attention_kernel(q, k, v, backend="triton") == "gluon"
    # two sequences, the first ending inside a block: a box would reach the second's keys
    assert msa.attention_kernel(q, k, v, topk_indices=shared, backend="triton",
                                cu_seqlens_q=[0, 300, 600],
                                cu_seqlens_k=[0, 700, 1400]) == "gluon"
    assert msa.attention_kernel(q, k, v, topk_indices=shared, backend="triton",
                                cu_seqlens_q=[0, 300, 600],
                                cu_seqlens_k=[0, 768, 1400]) == "union"


def test_short_segments_count_against_the_union_kernel():
    """``shared_enough``: a selection every query shares passes over one segment, and
    fails over segments of 2 queries (8-query tiles a quarter full at G = 16)."""
    from msa.ops.attention.union import shared_enough
    same = torch.zeros(1, 64, 4, dtype=torch.int32)
    same[..., 1:] = torch.arange(1, 4, dtype=torch.int32)
    assert shared_enough(same, 16)
    assert shared_enough(same, 16, [64])
    assert not shared_enough(same, 16, [2] * 32)
    assert shared_enough(same, 16, [4] * 16)               # half full: walk 1 <= 2 * 0.5


def test_the_walk_sample_is_read_with_the_queued_plan(monkeypatch):
    """``shared_enough`` given the selection's plan reads its sample through
    ``SparsePlan.read``: with the plan's planning kernels queued, the walk and the
    chunks reach the host in one read, and the choice is the one made without a plan."""
    from msa.ops import plan as P
    from msa.ops.attention.union import WALK_SAMPLE, shared_enough
    from tests.helpers.brute import make_case
    c = make_case((64,), (64 * 24,), hq=16, hkv=1, seed=3)
    seg = c["seg"]
    for apart in (False, True):
        topk = torch.zeros(1, 64, 4, dtype=torch.int32)
        topk[..., 1:] = torch.arange(1, 4, dtype=torch.int32)
        if apart:                 # two slots apart within a tile: a walk of 4.5
            topk[0, :, 1] = torch.arange(64, dtype=torch.int32) % 8 + 4
            topk[0, :, 2] = torch.arange(64, dtype=torch.int32) % 8 + 12
        want = shared_enough(topk, 16)
        assert want != apart
        plan = P.build_plan(topk, seg, block_size=64, heads=1, chunk=16)
        plan.queue()
        reads, tolist = [], torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist",
                            lambda t: reads.append(t.numel()) or tolist(t))
        assert shared_enough(topk, 16, plan=plan) == want
        assert len(reads) == 1 and len(plan.chunks) == 4 and len(reads) == 1
        assert plan._counts[("walk", 8, WALK_SAMPLE)] == list(
            P.walk_totals(topk, 8, WALK_SAMPLE).tolist())
        monkeypatch.undo()
