import math
import zlib

import pytest
import torch

import msa
from tests.helpers.brute import brute_indexer, make_case

CASES = {
    # id: (q_lens, k_lens, fragment_indices, block, topk)
    "single-q65-k1152-B64": ((65,), (1152,), None, 64, 16),
    "varlen-tiny-segments": ((33, 1, 7, 20), (257, 1, 127, 300), None, 64, 4),
    "lengths-1-127-128-129": ((1, 127, 128, 129), (1, 127, 128, 129), None, 64, 3),
    "chunked-prefill": ((5, 40), (700, 129), None, 128, 5),
    "fragments-spec-3.1": ((17, 41, 73), (149, 181, 259), (0, 0, 1), 64, 6),
    "topk1-local-only": ((9,), (400,), None, 64, 1),
}


def _valid_rows(idx, seg, block, topk):
    for b in range(seg.num_segments):
        for i in range(seg.q_len[b]):
            pos = seg.k_len[b] - seg.q_len[b] + i
            local, n_vis = pos // block, pos // block + 1
            for h in range(idx.shape[0]):
                row = idx[h, seg.q_start[b] + i].tolist()
                nvalid = min(topk, n_vis)
                assert row[nvalid - 1] == local, row                 # local block last
                assert all(x == -1 for x in row[nvalid:]), row     # -1 padding
                assert len(set(row[:nvalid])) == nvalid and max(row[:nvalid]) == local


@pytest.mark.parametrize("hi,hki", [(2, 1), (2, 2), (1, 1)], ids=["Hi2-Ki1", "Hi2-Ki2", "Hi1"])
@pytest.mark.parametrize("name", list(CASES))
def test_indexer_matches_brute_force(name, hi, hki):
    q_lens, k_lens, frag, block, topk = CASES[name]
    c = make_case(q_lens, k_lens, hi=hi, hki=hki, fragment_indices=frag,
                  seed=zlib.crc32(name.encode()))
    idx, lse = msa.msa_indexer(c["qi"], c["ki"], c["cu_seqlens_q"], c["cu_seqlens_k"],
                               fragment_indices=c["fragment_indices"], block_size=block,
                               topk=topk, return_lse=True)
    assert idx.dtype == torch.int32 and idx.shape == (hi, sum(q_lens), topk)
    assert lse.dtype == torch.float32 and not torch.isnan(lse).any()
    _valid_rows(idx, c["seg"], block, topk)
    ref = brute_indexer(c["qi"], c["ki"], c["seg"], block, topk, 64 ** -0.5)
    tol = 1e-5      # fp32 vs fp64 scores: near-ties may swap, nothing else may
    for qrow, row in enumerate(ref):
        for h, (ids, ref_lse, maxes) in enumerate(row):
            got = idx[h, qrow, :len(ids)].tolist()
            assert got[-1] == ids[-1]
            ranked = [maxes[L] for L in got[:-1]]
            assert all(a >= b - tol for a, b in zip(ranked, ranked[1:]))   # score desc
            if set(got) != set(ids):
                boundary = maxes[ids[-2]]            # weakest block the oracle kept
                assert all(abs(maxes[L] - boundary) < tol for L in set(got) ^ set(ids))
            else:
                assert math.isclose(lse[h, qrow].item(), ref_lse, rel_tol=1e-5, abs_tol=1e-5)


def test_zero_scores_tie_break_by_block_id():
    # ties (docs/semantics.md, "Selection"): all-zero Q/K, 2304 keys (18 blocks), one
    # query -> [0..14, 17]
    qi = torch.zeros(1, 4, 128)
    ki = torch.zeros(2304, 1, 128)
    cu_q = torch.tensor([0, 1], dtype=torch.int32)
    cu_k = torch.tensor([0, 2304], dtype=torch.int32)
    idx = msa.msa_indexer(qi, ki, cu_q, cu_k)
    assert idx[:, 0].tolist() == [list(range(15)) + [17]] * 4


@pytest.mark.parametrize("temp", [0.5, 2.0])
def test_lse_temperature_changes_lse_not_ids(temp):
    c = make_case((33,), (512,), hi=2, seed=3)
    args = (c["qi"], c["ki"], c["cu_seqlens_q"], c["cu_seqlens_k"])
    idx1, _ = msa.msa_indexer(*args, block_size=64, topk=4, return_lse=True)
    idx2, lse = msa.msa_indexer(*args, block_size=64, topk=4, lse_temperature=temp,
                                return_lse=True)
    assert torch.equal(idx1, idx2)
    ref = brute_indexer(c["qi"], c["ki"], c["seg"], 64, 4, 64 ** -0.5, temp)
    got = torch.tensor([[r[h][1] for h in range(2)] for r in ref], dtype=torch.float64).T
    torch.testing.assert_close(lse.double(), got, rtol=1e-5, atol=1e-5)


def test_batched_equals_packed():
    g = torch.Generator().manual_seed(1)
    qi, ki = torch.randn(3, 100, 2, 64, generator=g), torch.randn(3, 260, 1, 64, generator=g)
    idx_b, lse_b = msa.msa_indexer(qi, ki, block_size=64, topk=3, return_lse=True)
    cu_q = torch.arange(4, dtype=torch.int32) * 100
    cu_k = torch.arange(4, dtype=torch.int32) * 260
    idx_p, lse_p = msa.msa_indexer(qi.reshape(300, 2, 64), ki.reshape(780, 1, 64), cu_q, cu_k,
                                   block_size=64, topk=3, return_lse=True)
    assert idx_b.shape == (3, 2, 100, 3)
    assert torch.equal(idx_b.transpose(0, 1).reshape(2, 300, 3), idx_p)
    assert torch.equal(lse_b.transpose(0, 1).reshape(2, 300), lse_p)


def test_bf16_inputs_give_fp32_lse_and_same_selection_as_fp32_of_rounded():
    c = make_case((40,), (640,), hi=2, seed=5)
    qi, ki = c["qi"].bfloat16(), c["ki"].bfloat16()
    args = (c["cu_seqlens_q"], c["cu_seqlens_k"])
    idx16, lse16 = msa.msa_indexer(qi, ki, *args, block_size=64, topk=4, return_lse=True)
    idx32, lse32 = msa.msa_indexer(qi.float(), ki.float(), *args, block_size=64, topk=4,
                                   return_lse=True)
    assert lse16.dtype == torch.float32
    assert torch.equal(idx16, idx32) and torch.equal(lse16, lse32)
