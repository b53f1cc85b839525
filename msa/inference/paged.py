"""Paged KV cache (page = KV block) and MSA prefill/decode over it, reference version.

Pages hold ``page_size = block_size`` tokens, so a logical page id *is* a block id:
``k_pages, v_pages [num_pages, Hkv, page, D]`` and ``ki_pages [num_pages, page, Di]``
(one shared index-key head). A request's ``page_table[b, j]`` is the physical page of its
logical page ``j``; physical pages may be scattered, permuted or shared between requests
(prefix sharing). Queries of request ``b`` are the last ``q_len_b`` positions of its
``seq_lens[b]`` tokens (chunked prefill, decode ``Q = 1``, multi-token decode ``Q > 1``).

Top-k layout: head-major ``[H, total_q, K]`` everywhere in ``msa`` (as the indexer
returns it); ``token_major`` converts for engines that want ``[total_q, H, K]``.

This reference gathers the pages of each request into a packed sequence and runs the
packed operators (``msa_indexer`` / ``msa_sparse_attention``, Triton on CUDA); it is exact
and copies the cache once per call (at HBM speed: ~1-2% of a long prefill). Decode and
multi-token decode have the fused path: ``msa.inference.PagedDecoder``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..functional import msa_indexer, msa_sparse_attention


class PagedKVCache:
    """A pool of KV pages plus per-request page lists (a small manager for users without a
    serving engine).

    Args:
        num_pages: pool size; page_size: tokens per page (= MSA block size);
        num_kv_heads, head_dim: main branch; index_dim: index-key dim.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 index_dim: int, *, dtype=torch.bfloat16, device="cpu"):
        self.page_size = page_size
        self.k = torch.zeros(num_pages, num_kv_heads, page_size, head_dim, dtype=dtype,
                             device=device)
        self.v = torch.zeros_like(self.k)
        self.ki = torch.zeros(num_pages, page_size, index_dim, dtype=dtype, device=device)
        self.free_pages: List[int] = list(range(num_pages))
        self.pages: Dict[int, List[int]] = {}
        self.lengths: Dict[int, int] = {}

    def allocate(self, request: int) -> None:
        if request in self.pages:
            raise ValueError(f"request {request} already exists")
        self.pages[request], self.lengths[request] = [], 0

    def free(self, request: int) -> None:
        self.free_pages.extend(self.pages.pop(request))
        del self.lengths[request]

    def append(self, request: int, k: torch.Tensor, v: torch.Tensor, ki: torch.Tensor) -> None:
        """Append ``t`` tokens: k, v ``[t, Hkv, D]``, ki ``[t, Di]`` (or ``[t, 1, Di]``)."""
        if request not in self.pages:
            raise KeyError(f"unknown request {request}; call allocate() first")
        ki = ki.reshape(ki.shape[0], self.ki.shape[-1])
        if not (k.shape[0] == v.shape[0] == ki.shape[0]):
            raise ValueError("k, v and ki must hold the same number of tokens")
        n, ps = self.lengths[request], self.page_size
        for t in range(k.shape[0]):
            if (n + t) % ps == 0:
                if not self.free_pages:
                    raise RuntimeError("the page pool is exhausted")
                self.pages[request].append(self.free_pages.pop(0))
            page, off = self.pages[request][(n + t) // ps], (n + t) % ps
            self.k[page, :, off] = k[t]
            self.v[page, :, off] = v[t]
            self.ki[page, off] = ki[t]
        self.lengths[request] = n + k.shape[0]

    def page_table(self, requests) -> torch.Tensor:
        """``[B, max_pages]`` int32 physical pages (``-1`` past the end)."""
        width = max(1, max(len(self.pages[r]) for r in requests))
        table = torch.full((len(requests), width), -1, dtype=torch.int32)
        for i, r in enumerate(requests):
            table[i, :len(self.pages[r])] = torch.tensor(self.pages[r], dtype=torch.int32)
        return table.to(self.k.device)

    def seq_lens(self, requests) -> torch.Tensor:
        return torch.tensor([self.lengths[r] for r in requests], dtype=torch.int32,
                            device=self.k.device)


def _check_paged(k_pages, page_table, seq_lens, q_lens):
    if page_table.dim() != 2 or page_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"page_table must be [B, max_pages] int32/int64, got "
                         f"{tuple(page_table.shape)} {page_table.dtype}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != page_table.shape[0]:
        raise ValueError(f"seq_lens must be [B={page_table.shape[0]}], got "
                         f"{tuple(seq_lens.shape)}")
    ps, npages = k_pages.shape[-2], k_pages.shape[0]
    for b, (n, ql) in enumerate(zip(seq_lens.tolist(), q_lens)):
        if not 0 < ql <= n:
            raise ValueError(f"request {b}: need 0 < q_len={ql} <= seq_lens={n}")
        need = -(-n // ps)
        if need > page_table.shape[1]:
            raise ValueError(f"request {b}: seq_lens={n} needs {need} pages, page_table has "
                             f"{page_table.shape[1]}")
        pages = page_table[b, :need]
        if bool(((pages < 0) | (pages >= npages)).any()):
            raise IndexError(f"request {b}: page_table holds a page outside [0, {npages})")


def _gather(pages: torch.Tensor, page_table, seq_lens) -> torch.Tensor:
    """``pages [P, ..., page, X]`` -> packed ``[sum seq_lens, ..., X]`` token rows."""
    out = []
    for b, n in enumerate(seq_lens.tolist()):
        ids = page_table[b, :-(-n // pages.shape[-2])].long()
        x = pages[ids].movedim(-2, 1)                    # [pages, page, ..., X]
        out.append(x.reshape(-1, *x.shape[2:])[:n])
    return torch.cat(out)


def _varlen(seq_lens, q_lens):
    dev = seq_lens.device
    cu_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device=dev)
    cu_q[1:] = torch.cumsum(torch.tensor(q_lens, device=dev), 0)
    cu_k = torch.zeros_like(cu_q)
    cu_k[1:] = torch.cumsum(seq_lens, 0)
    return cu_q, cu_k


def paged_indexer(qi, cache_ki, page_table, seq_lens, q_lens: Optional[List[int]] = None, *,
                  block_size: int, topk: int = 16, softmax_scale=None):
    """Top-k ``[Hi, total_q, topk]`` for queries ``qi [total_q, Hi, Di]`` (request-major;
    ``q_lens`` per request, default: equal split) over the paged index keys
    ``cache_ki [pages, page, Di]``."""
    q_lens = q_lens or [qi.shape[0] // page_table.shape[0]] * page_table.shape[0]
    _check_paged(cache_ki.unsqueeze(1), page_table, seq_lens, q_lens)
    ki = _gather(cache_ki.unsqueeze(1), page_table, seq_lens)            # [T, 1, Di]
    cu_q, cu_k = _varlen(seq_lens, q_lens)
    return msa_indexer(qi, ki, cu_q, cu_k, block_size=block_size, topk=topk,
                       softmax_scale=softmax_scale)


def paged_attention(q, k_pages, v_pages, topk, page_table, seq_lens,
                    q_lens: Optional[List[int]] = None, *, softmax_scale=None):
    """MSA over a paged cache: ``q [total_q, Hq, D]`` (request-major), pages
    ``[P, Hkv, page, D]``, head-major ``topk [Hkv or 1, total_q, K]`` of logical page ids.
    Returns ``out [total_q, Hq, D]``."""
    q_lens = q_lens or [q.shape[0] // page_table.shape[0]] * page_table.shape[0]
    _check_paged(k_pages, page_table, seq_lens, q_lens)
    k, v = _gather(k_pages, page_table, seq_lens), _gather(v_pages, page_table, seq_lens)
    cu_q, cu_k = _varlen(seq_lens, q_lens)
    return msa_sparse_attention(q, k, v, topk, cu_q, cu_k, block_size=k_pages.shape[-2],
                                softmax_scale=softmax_scale)


def token_major(topk: torch.Tensor) -> torch.Tensor:
    """Head-major ``[H, tokens, K]`` -> token-major ``[tokens, H, K]`` (contiguous)."""
    return topk.transpose(0, 1).contiguous()
