"""k->q planning: every valid (head, block, query, slot) edge exactly once, in order."""
import pytest

from brute import make_case
from conftest import random_topk
from msa.ops.prepare import block_rows, plan_chunks


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
    for c0, c1, plan in plans:
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
