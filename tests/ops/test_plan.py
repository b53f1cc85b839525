"""k->q planning: every valid (head, block, query, slot) edge exactly once, in order."""
import pytest
import torch

from tests.helpers.brute import make_case
from tests.helpers import DEVICE, random_topk
from msa.ops.geometry import block_rows
from msa.ops.plan import plan_chunks


@pytest.mark.parametrize("hs,chunk,qpi", [(2, 1000, 4), (1, 13, 3), (2, 7, 256)])
def test_plan_edges_and_items(hs, chunk, qpi):
    c = make_case((33, 1, 50), (200, 64, 300), hq=4, hkv=2, fragment_indices=(0, 1, 1),
                  seed=3)
    seg = c["seg"]
    topk = random_topk(seg, hs, 4, 64, seed=4)
    rows = block_rows(seg, 64, "cpu")
    expected = set()
    for b in range(seg.num_segments):
        nb = seg.num_blocks(b, 64)
        for i in range(seg.q_len[b]):
            q = seg.q_start[b] + i
            for h in range(2):
                for j, L in enumerate(topk[h if hs > 1 else 0, q].tolist()):
                    if 0 <= L < nb:
                        expected.add((h, seg.k_base[b] + 64 * L, q, j))
    got = []
    total = seg.total_q
    plans = plan_chunks(topk, rows, 0, total, chunk, 2, qpi)
    assert [p[0] for p in plans] == list(range(0, total, chunk))
    edge0 = 0
    for c0, c1, plan in plans:
        # a chunk's edges: one contiguous range, right after the previous chunk's
        assert plan.edge0 == edge0
        edge0 += plan.num_edges
        assert sum((plan.item_e1 - plan.item_e0).tolist()) == plan.num_edges
        assert all(plan.edge0 <= int(x) <= edge0 for x in (*plan.item_e0, *plan.item_e1))
        sizes = (plan.item_e1 - plan.item_e0).tolist()
        assert all(0 < n <= qpi for n in sizes) and sizes == sorted(sizes, reverse=True)
        for it in range(plan.num_items):
            e0, e1 = int(plan.item_e0[it]), int(plan.item_e1[it])
            qs = (plan.edge_q[e0:e1] + c0).tolist()
            assert qs == sorted(qs) and all(c0 <= q < c1 for q in qs)
            for q, j in zip(qs, plan.edge_slot[e0:e1].tolist()):
                got.append((int(plan.item_h[it]), int(plan.item_krow[it]), q, j))
            t0, nk = int(plan.item_t0[it]), int(plan.item_nk[it])
            assert t0 % 64 == 0 and 0 < nk <= 64
    assert len(got) == len(set(got)) and set(got) == expected
    assert plan_chunks(topk, rows, 5, 5, chunk, 2, qpi) == []       # empty query range


def test_segments_cache_follows_tensor_identity_and_version():
    import torch
    from msa.varlen import cached_segments
    cu_q = torch.tensor([0, 5, 9])
    cu_k = torch.tensor([0, 5, 12])
    s1 = cached_segments(9, 12, cu_q, cu_k)
    assert cached_segments(9, 12, cu_q, cu_k) is s1 and s1.q_len == [5, 4]
    cu_q[1] = 4                                   # in place: new version, read again
    s2 = cached_segments(9, 12, cu_q, cu_k)
    assert s2 is not s1 and s2.q_len == [4, 5]
    other = torch.tensor([0, 3, 9])               # another tensor: read, never the entry
    assert cached_segments(9, 12, other, cu_k).q_len == [3, 6]
    with torch.inference_mode():                  # no version counter: never cached
        cu_i = torch.tensor([0, 2, 9])
        assert cached_segments(9, 12, cu_i, cu_k).q_len == [2, 7]
        cu_i[1] = 5
        assert cached_segments(9, 12, cu_i, cu_k).q_len == [5, 4]


@pytest.mark.parametrize("layout", ["packed", "batched"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_one_plan_and_no_topk_validation_per_training_step(monkeypatch, layout, deterministic):
    """msa_attention with the Triton backend: the selected-LSE pass, the forward, the
    indexer KL and the backward share one SparsePlan, queued and read by the host once,
    and the library's own top-k is never validated."""
    pytest.importorskip("triton")
    import msa
    import msa.ops.custom_ops as custom_ops
    import msa.ops.geometry as geo_mod
    import msa.ops.plan as plan_mod
    from msa.ops.workspace import item_queries
    from tests.helpers import DEVICE
    builds, checks = [], []
    build = plan_mod.build_plan
    monkeypatch.setattr(plan_mod, "build_plan",
                        lambda *a, **k: builds.append(k["q_per_item"]) or build(*a, **k))
    monkeypatch.setattr(custom_ops, "check_topk_indices", lambda *a, **k: checks.append(1))
    settled, settle = [], plan_mod.SparsePlan._settle
    monkeypatch.setattr(plan_mod.SparsePlan, "_settle",
                        lambda self: settled.append(self._queued is not None) or settle(self))
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=3)
    if layout == "packed":
        c = make_case((20, 45), (150, 200), hq=4, hkv=2, hi=2, seed=9)
        x = [c[n].to(DEVICE).requires_grad_(True) for n in ("q", "k", "v", "qi", "ki")]
        meta = (c["cu_seqlens_q"].to(DEVICE), c["cu_seqlens_k"].to(DEVICE))
    else:
        g = torch.Generator().manual_seed(9)
        x = [torch.randn(2, t, h, 64, generator=g).to(DEVICE).requires_grad_(True)
             for t, h in ((40, 4), (150, 2), (150, 2), (40, 2), (150, 1))]
        meta = ()
    monkeypatch.setattr(geo_mod, "_GEOMETRY", type(geo_mod._GEOMETRY)())
    served, geometry = [], geo_mod.geometry       # (its builder, what each call was given)
    monkeypatch.setattr(geo_mod, "geometry",
                        lambda *a: served.append((a[-1], geometry(*a))) or served[-1][1])
    out, aux = msa.msa_attention(*x, *meta, config=cfg, backend="triton",
                                 deterministic=deterministic, return_aux=True)
    out.sum().backward()
    assert all(t.grad is not None for t in x) and aux.kl_loss > 0
    assert builds == [item_queries(2)] and not checks    # items sized for G = 2
    assert settled == [True]           # the plan queued, its counts read by the host once
    # the remembered geometry is read, never written: after the step, what every call was
    # given equals a fresh build
    assert served
    for rebuild, got in served:
        want = rebuild()
        for a, b in zip(*(vars(x).values() if isinstance(x, geo_mod.BlockRows) else x
                          for x in (got, want))):
            assert (a == b).all() if isinstance(a, torch.Tensor) else a == b
    msa.msa_sparse_attention(*x[:3], aux.topk_indices, *meta, block_size=64,
                             backend="triton")
    assert not checks                        # still trusted when passed back in
    topk = aux.topk_indices.clone()
    msa.msa_sparse_attention(*x[:3], topk, *meta, block_size=64, backend="triton")
    assert len(checks) == 1                  # a copy is the user's: validated


def test_queued_plan_and_counts_reach_the_host_in_one_synchronisation(monkeypatch):
    """``SparsePlan.queue`` reads nothing to the host; the first ``read`` then reads the
    planning groups' counts and its own in one ``tolist`` (the chunks: ``plan_chunks``'),
    a count is made once per key, and one asked for after the chunks are built costs its
    own read. Planning groups of 32 queries: three groups, one read."""
    import msa.ops.plan as plan_mod
    monkeypatch.setattr(plan_mod, "PLAN_GROUP_QUERIES", 32)
    c = make_case((40, 45), (200, 130), hq=4, hkv=2, seed=11)
    seg = c["seg"]
    topk = random_topk(seg, 2, 3, 64, seed=12).to(DEVICE)
    rows = block_rows(seg, 64, DEVICE)
    plan = plan_mod.build_plan(topk, seg, block_size=64, heads=2, chunk=8, q_per_item=3)
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or tolist(t))
    plan.queue()
    assert reads == []
    made = []

    def make():
        made.append(1)
        return torch.tensor([[7], [-2]], device=DEVICE)
    assert plan.read("k", make) == [7, -2] and len(reads) == 1
    assert plan.read("k", make) == [7, -2] and len(reads) == 1 and made == [1]
    got = plan.chunks
    assert len(reads) == 1
    want = [p for s0 in (0, 32, 64) for p in plan_chunks(topk, rows, s0, min(85, s0 + 32), 8,
                                                          2, 3)]
    assert [g[:2] for g in got] == [w[:2] for w in want] and len(got) == 11
    for (_, _, g), (_, _, w) in zip(got, want):
        assert (g.num_edges, g.num_items) == (w.num_edges, w.num_items)
        assert torch.equal(g.item_e1 - g.item_e0, w.item_e1 - w.item_e0)
    n = len(reads)
    assert plan.read("later", lambda: torch.tensor([5], device=DEVICE)) == [5]
    assert len(reads) == n + 1


def test_plan_is_remembered_with_its_tensor_only():
    import gc

    import msa.ops.plan as plan_mod
    c = make_case((30,), (200,), seed=2)
    topk = random_topk(c["seg"], 2, 3, 64, seed=2)
    p1 = plan_mod.sparse_plan(topk, c["seg"], block_size=64, heads=2, max_chunk=8)
    assert plan_mod.sparse_plan(topk, c["seg"], block_size=64, heads=2, max_chunk=16) is p1
    assert plan_mod.sparse_plan(topk, c["seg"], block_size=64, heads=2, max_chunk=4) is not p1
    p2 = plan_mod.sparse_plan(topk, c["seg"], block_size=64, heads=2, max_chunk=4)
    topk[0, 0, 0] = -1                       # modified in place: planned again
    assert plan_mod.sparse_plan(topk, c["seg"], block_size=64, heads=2, max_chunk=4) is not p2
    n = len(plan_mod._REGISTRY)
    del topk, p1, p2
    gc.collect()
    assert len(plan_mod._REGISTRY) == n - 1  # the entry died with its tensor


@pytest.mark.parametrize("hs,chunk,qpi,K", [(2, 1000, 4, 4), (1, 13, 3, 4), (2, 7, 256, 3),
                                            (1, 64, 2, 16)])
def test_planning_kernels_build_the_torch_plan(hs, chunk, qpi, K):
    """The Triton planning kernels (``msa.ops.plan_triton``) give bitwise the plan of the
    torch ops: every chunk's range, edges and items, over fragments, empty segments,
    empty (-1) and out-of-range ids."""
    from msa.ops.plan import plan_by_torch
    from msa.ops import plan_triton
    c = make_case((33, 0, 1, 50), (200, 64, 65, 300), hq=4, hkv=2,
                  fragment_indices=(0, 1, 1, 3), seed=6)
    seg = c["seg"]
    topk = random_topk(seg, hs, K, 64, seed=7)
    topk[0, ::5, -1] = 99                              # past every segment's blocks
    topk = topk.to(DEVICE)
    rows = block_rows(seg, 64, DEVICE)
    for q0, q1 in ((0, seg.total_q), (10, 60)):
        assert plan_triton.applies(topk, rows, q0, q1, chunk, 2, qpi)
        want = plan_by_torch(topk, rows, q0, q1, chunk, 2, qpi)
        got = plan_chunks(topk, rows, q0, q1, chunk, 2, qpi)
        assert [g[:2] for g in got] == [w[:2] for w in want]
        for (_, _, g), (_, _, w) in zip(got, want):
            assert (g.num_heads, g.edge0, g.num_edges) == (w.num_heads, w.edge0, w.num_edges)
            for name in ("edge_q", "edge_slot", "item_h", "item_krow", "item_t0", "item_nk",
                         "item_e0", "item_e1"):
                a, b = getattr(g, name), getattr(w, name)
                assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("qt,every,K,hs,T", [(8, 8, 16, 2, 100), (3, 1, 5, 1, 7),
                                             (5, 2, 6, 3, 64), (1, 3, 4, 2, 10)])
def test_walk_kernel_counts_as_the_torch_ops(qt, every, K, hs, T):
    """The walk sample's kernel (``msa.ops.plan_triton.walk_totals``, on CUDA tensors):
    the distinct and the selected ids of every ``every``-th whole tile, as
    ``msa.ops.plan.walk_totals``' torch ops count them (on the CPU), on selections with
    repeats across a tile's queries and empty (-1) ids."""
    from msa.ops import plan as P
    from msa.ops.plan_triton import walk_totals

    def walk_counts(*args):
        return tuple(walk_totals(*args).tolist())
    g = torch.Generator().manual_seed(qt * 100 + K)
    topk = torch.randint(-1, 9, (hs, T, K), generator=g, dtype=torch.int32).to(DEVICE)
    want = tuple(P.walk_totals(topk.cpu(), qt, every).tolist())
    assert walk_counts(topk, qt, every) == want
    assert walk_counts(topk.long(), qt, every) == want
    assert walk_counts(topk.mT.contiguous().mT, qt, every) == want     # slots strided
    assert walk_counts(torch.full((2, 4, 3), -1, device=DEVICE), 2, 1) == (0, 0)


def test_plan_chunks_falls_back_to_the_torch_ops(monkeypatch):
    """Without Triton, or where int32 indices cannot hold the plan, ``plan_chunks`` plans
    by torch ops; with the kernels it does not call them."""
    from msa.ops import plan as P
    from msa.ops import plan_triton
    c = make_case((40,), (200,), hq=4, hkv=2, seed=8)
    topk = random_topk(c["seg"], 2, 3, 64, seed=9).to(DEVICE)
    rows = block_rows(c["seg"], 64, DEVICE)
    calls = []
    real = P.queue_by_torch
    monkeypatch.setattr(P, "queue_by_torch", lambda *a: calls.append(1) or real(*a))
    P.plan_chunks(topk, rows, 0, 40, 16, 2, 4)
    assert calls == []
    assert not plan_triton.applies(topk, rows, 5, 5, 16, 2, 4)          # no queries
    monkeypatch.setattr(plan_triton, "INT32_MAX", 2 * 40 * 3)          # entries too many
    assert not plan_triton.applies(topk, rows, 0, 40, 16, 2, 4)
    P.plan_chunks(topk, rows, 0, 40, 16, 2, 4)
    monkeypatch.setattr(P, "_planning_kernels", lambda: None)
    P.plan_chunks(topk, rows, 0, 40, 16, 2, 4)
    assert calls == [1, 1]
