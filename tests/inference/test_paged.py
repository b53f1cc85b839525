"""Paged KV cache: prefill / decode / multi-token decode over scattered and shared pages
equal the packed operators on the same sequences."""
import pytest
import torch

import msa
from msa.inference import PagedKVCache, paged_attention, paged_indexer
from msa.inference.paged_ops import token_major

HQ, HKV, D, BS = 4, 2, 64, 64


def _seq(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *s, generator=g) for s in ((HKV, D), (HKV, D), (64,))]


@pytest.mark.parametrize("lengths,q", [((1, 127, 128, 129), 1), ((300, 65), 4),
                                       ((200,), 16)])
def test_paged_matches_packed(lengths, q):
    cache = PagedKVCache(64, BS, HKV, D, 64, dtype=torch.float32)
    cache.free_pages = list(reversed(cache.free_pages))     # scattered, descending pages
    seqs = []
    for r, n in enumerate(lengths):
        cache.allocate(r)
        k, v, ki = _seq(n, r)
        half = n // 2                                      # two appends per request
        cache.append(r, k[:half], v[:half], ki[:half])
        cache.append(r, k[half:], v[half:], ki[half:])
        seqs.append((k, v, ki))
    reqs = list(range(len(lengths)))
    table, lens = cache.page_table(reqs), cache.seq_lens(reqs)
    q_lens = [min(q, n) for n in lengths]
    g = torch.Generator().manual_seed(9)
    qq = torch.randn(sum(q_lens), HQ, D, generator=g)
    qi = torch.randn(sum(q_lens), HKV, 64, generator=g)
    topk = paged_indexer(qi, cache.ki_pages[0], table, lens, q_lens, block_size=BS, topk=3)
    out = paged_attention(qq, cache.k_pages[0], cache.v_pages[0], topk, table, lens, q_lens)
    k = torch.cat([s[0] for s in seqs])
    v = torch.cat([s[1] for s in seqs])
    ki = torch.cat([s[2] for s in seqs]).unsqueeze(1)
    cu_q = msa.cu_seqlens_from_lengths(q_lens)
    cu_k = msa.cu_seqlens_from_lengths(lengths)
    ref_topk = msa.msa_indexer(qi, ki, cu_q, cu_k, block_size=BS, topk=3)
    ref = msa.msa_sparse_attention(qq, k, v, ref_topk, cu_q, cu_k, block_size=BS)
    assert torch.equal(topk, ref_topk)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert token_major(topk).shape == (sum(q_lens), HKV, 3)


def test_shared_prefix_pages_and_free():
    cache = PagedKVCache(8, BS, HKV, D, 64, dtype=torch.float32)
    k, v, ki = _seq(150, 0)
    cache.allocate(0)
    cache.append(0, k, v, ki)
    table = cache.page_table([0])
    shared = torch.cat([table, table])                     # two requests, same pages
    lens = torch.tensor([150, 100], dtype=torch.int32)
    qq = torch.randn(2, HQ, D)
    topk = torch.tensor([[[0, 2]], [[1, -1]]], dtype=torch.int32).transpose(0, 1)
    topk = topk.expand(HKV, 2, 2).contiguous()
    out = paged_attention(qq, cache.k_pages[0], cache.v_pages[0], topk, shared, lens, [1, 1])
    ref0 = msa.msa_sparse_attention(qq[:1], k, v, topk[:, :1], torch.tensor([0, 1]),
                                    torch.tensor([0, 150]), block_size=BS)
    ref1 = msa.msa_sparse_attention(qq[1:], k[:100], v[:100], topk[:, 1:],
                                    torch.tensor([0, 1]), torch.tensor([0, 100]),
                                    block_size=BS)
    torch.testing.assert_close(out, torch.cat([ref0, ref1]), rtol=0, atol=0)
    cache.free(0)
    assert len(cache.free_pages) == 8


def test_paged_errors():
    cache = PagedKVCache(2, BS, HKV, D, 64, dtype=torch.float32)
    cache.allocate(0)
    with pytest.raises(RuntimeError, match="exhausted"):
        k, v, ki = _seq(200, 0)
        cache.append(0, k, v, ki)
    with pytest.raises(KeyError, match="allocate"):
        cache.append(5, *_seq(1, 0))
    with pytest.raises(KeyError, match="unknown request 5"):
        cache.free(5)
    with pytest.raises(KeyError, match="unknown request 7"):
        cache.page_table([0, 7])
    with pytest.raises(TypeError, match="config must be an msa.MSAConfig"):
        PagedKVCache.for_model({}, num_layers=1, batch=1, num_pages=2)
    with pytest.raises(ValueError, match=r"page_size must be one of \(64, 128\), got 100"):
        PagedKVCache(2, 100, HKV, D, 64)
    ki_pages = cache.ki_pages[0]
    with pytest.raises(ValueError, match=r"ki_pages must be \[pages, page=128, Di\]"):
        paged_indexer(torch.randn(1, HKV, 64), ki_pages, cache.page_table([0]),
                      torch.tensor([1], dtype=torch.int32), [1], block_size=128, topk=2)
    table = torch.tensor([[0, 7]], dtype=torch.int32)
    with pytest.raises(IndexError, match="page_table"):
        paged_attention(torch.randn(1, HQ, D), cache.k_pages[0], cache.v_pages[0],
                        torch.zeros(HKV, 1, 1, dtype=torch.int32), table,
                        torch.tensor([100], dtype=torch.int32))
    with pytest.raises(ValueError, match="q_len"):
        paged_attention(torch.randn(3, HQ, D), cache.k_pages[0], cache.v_pages[0],
                        torch.zeros(HKV, 3, 1, dtype=torch.int32), table[:, :1],
                        torch.tensor([2], dtype=torch.int32))


def test_multi_layer_cache_shares_pages_and_checks_order():
    cache = PagedKVCache(8, BS, HKV, D, 64, num_layers=2, dtype=torch.float32)
    cache.allocate(0)
    k, v, ki = _seq(100, 0)
    with pytest.raises(ValueError, match="reserve"):
        cache.append(0, k, v, ki)                        # two layers: reserve + write
    start = cache.reserve(0, 100)
    cache.write(1, 0, start, k, v, ki)
    cache.write(0, 0, start, 2 * k, v, ki)
    table = cache.page_table([0])
    assert torch.equal(cache.k_pages[1, table[0, 0], :, :BS], k[:BS].transpose(0, 1))
    assert torch.equal(cache.k_pages[0, table[0, 0], :, :BS], 2 * k[:BS].transpose(0, 1))
    with pytest.raises(ValueError, match="written"):
        cache.write(0, 0, 0, k[:1], v[:1], ki[:1])      # position 0 again
    with pytest.raises(ValueError, match="reserved"):
        cache.write(0, 0, 100, k[:1], v[:1], ki[:1])    # not reserved yet
    with pytest.raises(RuntimeError, match="for_model"):
        cache.attend(0, *[torch.zeros(1, 1, 1, 1)] * 5)


def test_cache_writes_reject_bad_shapes_and_layers():
    cache = PagedKVCache(8, BS, HKV, D, 64, num_layers=2, dtype=torch.float32)
    cache.allocate(0)
    k, v, ki = _seq(10, 0)
    start = cache.reserve(0, 10)
    with pytest.raises(ValueError, match=r"k must be \[t, Hkv=2, D=64\]"):
        cache.write(0, 0, start, k[:, :1], v, ki)
    with pytest.raises(ValueError, match=r"ki must be \[t, Di=64\]"):
        cache.write(0, 0, start, k, v, ki[:, :32])
    with pytest.raises(IndexError, match="layer must lie in"):
        cache.write(2, 0, start, k, v, ki)
    with pytest.raises(ValueError, match="n must be an int"):
        cache.reserve(0, -1)
