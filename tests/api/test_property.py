"""Property-based tests: random segment layouts, head counts and selections."""
import torch
from hypothesis import given, settings, strategies as st

import msa
from tests.helpers.brute import brute_attention, brute_indexer, make_case
from tests.helpers import random_topk


@st.composite
def layouts(draw):
    nseg = draw(st.integers(1, 3))
    q_lens, k_lens = [], []
    for _ in range(nseg):
        q = draw(st.integers(0, 40))
        q_lens.append(q)
        k_lens.append(q + draw(st.integers(0, 200)))
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2, 3]))
    topk = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2 ** 16))
    return q_lens, k_lens, hq, hkv, topk, seed


@settings(max_examples=30, deadline=None)
@given(layouts(), st.booleans(), st.sampled_from([0, 1, 4]))
def test_attention_matches_brute_force(layout, shared, span):
    import msa.ops.attention.naive as naive
    old, naive.DENSE_SPAN_FACTOR = naive.DENSE_SPAN_FACTOR, span
    try:
        _check_attention(layout, shared)
    finally:
        naive.DENSE_SPAN_FACTOR = old


def _check_attention(layout, shared):
    q_lens, k_lens, hq, hkv, kk, seed = layout
    if sum(k_lens) == 0:
        return
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, dtype=torch.float64, seed=seed)
    topk = random_topk(c["seg"], 1 if shared else hkv, kk, 64, seed=seed)
    out, lse = msa.msa_sparse_attention(c["q"], c["k"], c["v"], topk, c["cu_seqlens_q"],
                                        c["cu_seqlens_k"], block_size=64, return_lse=True)
    if sum(q_lens) == 0:
        assert out.shape == c["q"].shape
        return
    ref_out, ref_lse = brute_attention(c["q"], c["k"], c["v"], topk, c["seg"], 64, 64 ** -0.5)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(layouts())
def test_indexer_matches_brute_force(layout):
    q_lens, k_lens, _, hkv, kk, seed = layout
    c = make_case(q_lens, k_lens, hi=hkv, dtype=torch.float64, seed=seed)
    idx, lse = msa.msa_indexer(c["qi"], c["ki"], c["cu_seqlens_q"], c["cu_seqlens_k"],
                               block_size=64, topk=kk, return_lse=True)
    ref = brute_indexer(c["qi"], c["ki"], c["seg"], 64, kk, 64 ** -0.5)
    for qrow, row in enumerate(ref):
        for h, (ids, ref_lse, _) in enumerate(row):
            assert idx[h, qrow].tolist() == ids + [-1] * (kk - len(ids))
            assert abs(lse[h, qrow].item() - ref_lse) < 1e-9
