"""Triton indexer (streamed top-k + KV-outer LSE) vs the reference."""
import zlib

import pytest
import torch

pytest.importorskip("triton")

import msa  # noqa: E402
from tests.helpers.brute import make_case  # noqa: E402
from tests.helpers import DEVICE, force_smallest_launch, plan_of  # noqa: E402
from msa.ops.indexer.naive import indexer_reference  # noqa: E402
from msa.ops.indexer.triton import indexer_topk, selected_lse  # noqa: E402


CASES = {
    # id: (q_lens, k_lens, frag, hi, block, topk)
    "varlen-tiny-segments-K4": ((33, 1, 7, 20), (257, 1, 127, 300), None, 2, 64, 4),
    "lengths-1-127-128-129-K3": ((1, 127, 128, 129), (1, 127, 128, 129), None, 1, 64, 3),
    "chunked-prefill-B128-K16": ((5, 40), (1400, 129), None, 4, 128, 16),
    "fragments-spec-3.1-K6": ((17, 41, 73), (149, 181, 259), (0, 0, 1), 2, 64, 6),
    "topk1": ((9,), (400,), None, 2, 64, 1),
    "three-index-heads-K3": ((40, 9), (500, 300), None, 3, 64, 3),   # 96-row tiles
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_indexer_matches_reference(name):
    q_lens, k_lens, frag, hi, block, kk = CASES[name]
    c = make_case(q_lens, k_lens, hi=hi, fragment_indices=frag, seed=zlib.crc32(name.encode()))
    qi, ki = c["qi"].to(DEVICE), c["ki"].to(DEVICE)
    idx = indexer_topk(qi, ki, c["seg"], block_size=block, topk=kk, scale=0.125)
    ref_idx, ref_lse = indexer_reference(qi.double(), ki.double(), c["seg"], block_size=block,
                                         topk=kk, scale=0.125)
    # random normal scores: no near-ties at this size, so the order is exact
    assert torch.equal(idx.cpu(), ref_idx.cpu())
    lse = selected_lse(qi, ki, idx, plan_of(idx, c["seg"], block, hi), scale=0.125)
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def check_selected_lse(name, chunk=None):
    """``selected_lse`` of case ``name`` on the reference's selection, over a plan of
    ``chunk`` queries per chunk (default all), against the reference's LSE."""
    q_lens, k_lens, frag, hi, block, kk = CASES[name]
    c = make_case(q_lens, k_lens, hi=hi, fragment_indices=frag, seed=zlib.crc32(name.encode()))
    qi, ki = c["qi"].to(DEVICE), c["ki"].to(DEVICE)
    ref_idx, ref_lse = indexer_reference(qi.double(), ki.double(), c["seg"], block_size=block,
                                         topk=kk, scale=0.125)
    idx = ref_idx.to(DEVICE)
    plan = plan_of(idx, c["seg"], block, hi, chunk=chunk)
    lse = selected_lse(qi, ki, idx, plan, scale=0.125)
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    return plan


@pytest.mark.parametrize("name", ["varlen-tiny-segments-K4", "fragments-spec-3.1-K6"])
def test_selected_lse_over_query_chunks(name):
    """A plan of many query chunks (7 queries each) gives the reference's LSE: each chunk's
    partials land at its own queries' rows."""
    assert len(check_selected_lse(name, chunk=7).chunks) > 3


@pytest.mark.parametrize("name", ["chunked-prefill-B128-K16", "fragments-spec-3.1-K6"])
def test_selected_lse_smallest_launch(monkeypatch, name):
    """The selected LSE through the KV-outer kernel's last fallback (16-row tiles, keys in
    half blocks, no V)."""
    import msa.ops.attention.forward as fwd
    force_smallest_launch(monkeypatch, fwd)
    check_selected_lse(name)


def test_triton_indexer_zero_ties_and_temperature():
    qi = torch.zeros(1, 4, 128, device=DEVICE)
    ki = torch.zeros(2304, 1, 128, device=DEVICE)
    cu_q = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 2304], dtype=torch.int32, device=DEVICE)
    idx, lse = msa.msa_indexer(qi, ki, cu_q, cu_k, return_lse=True, backend="triton",
                               lse_temperature=2.0)
    assert idx[:, 0].tolist() == [list(range(15)) + [17]] * 4
    # query at position 2303 (last key of block 17): 16 full blocks, all scores 0
    torch.testing.assert_close(lse.cpu(), torch.full((4, 1), float(torch.log(torch.tensor(
        16 * 128.0)))), rtol=1e-6, atol=1e-6)


def test_triton_indexer_bf16_and_public_api_batched():
    g = torch.Generator().manual_seed(3)
    qi = torch.randn(2, 150, 2, 64, generator=g).bfloat16().to(DEVICE)
    ki = torch.randn(2, 300, 1, 64, generator=g).bfloat16().to(DEVICE)
    idx_t, lse_t = msa.msa_indexer(qi, ki, block_size=64, topk=3, return_lse=True,
                                   backend="triton")
    idx_r, lse_r = msa.msa_indexer(qi, ki, block_size=64, topk=3, return_lse=True,
                                   backend="reference")
    assert torch.equal(idx_t, idx_r)
    torch.testing.assert_close(lse_t, lse_r, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kk", [5, 16, 64])
def test_triton_indexer_ranks_groups_of_tied_blocks(kk):
    """Blocks repeat one of 3 key patterns, so pooled scores tie in groups: the rows must
    list them by score, then ascending id, exactly as the reference does (ranked in the
    kernel, local block last, -1 after)."""
    g = torch.Generator().manual_seed(kk)
    block, nb = 64, 70
    pattern = torch.randn(3, block, 32, generator=g)
    ki = pattern[torch.randint(3, (nb,), generator=g)].reshape(nb * block, 1, 32)
    c_q = torch.tensor([0, 1, 201, 1501])
    c_k = torch.tensor([0, 1000, 3000, 4480])
    sel_q = torch.randn(1501, 2, 32, generator=g)
    from msa.varlen import make_segments
    seg = make_segments(sel_q.shape[0], ki.shape[0], c_q, c_k)
    idx = indexer_topk(sel_q.to(DEVICE), ki.to(DEVICE), seg, block_size=block, topk=kk,
                       scale=0.125)
    ref, _ = indexer_reference(sel_q.double(), ki.double(), seg, block_size=block, topk=kk,
                               scale=0.125)
    assert torch.equal(idx.cpu(), ref.cpu())
