"""``PagedCache``: the layer-side view of ``msa.inference.PagedKVCache`` (one page pool per
layer, page = block), so ``MSAttention`` prefills and decodes over paged storage.

With a ``PagedCache`` the layer appends the new tokens' k, v and index key to each
request's pages, then attends through the page tables: decode / multi-token steps
(``t <= 16`` new tokens per request) use the fused ``PagedDecoder`` on CUDA, everything
else the paged reference operators (which gather the pages; Triton on CUDA).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..config import MSAConfig
from ..inference import PagedDecoder, PagedKVCache, paged_attention, paged_indexer


class PagedCache:
    """Paged KV storage for ``num_layers`` ``MSAttention`` layers and a fixed batch of
    requests (row ``b`` of the hidden states is request ``b``).

    Args:
        config: the layers' ``MSAConfig``; num_layers; batch: requests;
        pages_per_layer: page pool size of each layer; dtype, device of the pages.
    """

    def __init__(self, config: MSAConfig, num_layers: int, batch: int, pages_per_layer: int,
                 *, dtype=torch.float32, device="cpu"):
        self.config, self.batch = config, batch
        self.pools = [PagedKVCache(pages_per_layer, config.block_size, config.num_kv_heads,
                                   config.head_dim, config.index_dim, dtype=dtype,
                                   device=device) for _ in range(num_layers)]
        for pool in self.pools:
            for r in range(batch):
                pool.allocate(r)
        self.decoders: Dict[int, PagedDecoder] = {}

    def length(self, layer_idx: int) -> int:
        return self.pools[layer_idx].lengths[0]

    def attend(self, layer_idx: int, q, k, v, qi, ki) -> torch.Tensor:
        """Append ``k, v [B, t, Hkv, D]``, ``ki [B, t, 1, Di]`` and attend the new queries
        ``q [B, t, Hq, D]``, ``qi [B, t, Hi, Di]``; returns ``[B, t, Hq, D]``."""
        c, pool = self.config, self.pools[layer_idx]
        b, t = q.shape[:2]
        if b != self.batch:
            raise ValueError(f"hidden states hold {b} requests, the cache {self.batch}")
        for r in range(b):
            pool.append(r, k[r], v[r], ki[r, :, 0])
        reqs: List[int] = list(range(b))
        table, lens = pool.page_table(reqs), pool.seq_lens(reqs)
        qf, qif = q.reshape(b * t, *q.shape[2:]), qi.reshape(b * t, *qi.shape[2:])
        if q.is_cuda and t <= 16 and q.dtype in (torch.bfloat16, torch.float16):
            dec = self.decoders.get(t)          # layers run in turn: one decoder per Q
            if dec is None:
                dec = PagedDecoder(c, max_batch=b, num_q=t, max_pages=pool.k.shape[0],
                                   device=q.device, dtype=q.dtype)
                self.decoders[t] = dec
            dec.plan(table, lens)
            out, _ = dec.run(qf, qif, pool.k, pool.v, pool.ki)
            out = out.clone()
        else:
            q_lens = [t] * b
            topk = paged_indexer(qif, pool.ki, table, lens, q_lens, block_size=c.block_size,
                                 topk=c.topk, softmax_scale=c.index_scale)
            out = paged_attention(qf, pool.k, pool.v, topk, table, lens, q_lens,
                                  softmax_scale=c.scale)
        return out.view(b, t, *q.shape[2:])
