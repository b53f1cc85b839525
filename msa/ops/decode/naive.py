"""Reference paged decode: gather each request's pages into a packed sequence and run the
reference indexer and attention over it (docs/semantics.md, "Paged layout").

Same contract as the fused ``msa.ops.decode.triton.paged_decode``; exact, and it copies
the used pages once per call.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from ...varlen import Segments
from ..attention.naive import attention_forward_reference
from ..indexer.naive import indexer_reference


def gather_pages(pages: torch.Tensor, page_table: torch.Tensor,
                 seq_lens: List[int]) -> torch.Tensor:
    """``pages [P, ..., page, X]`` -> packed ``[sum seq_lens, ..., X]`` token rows of the
    requests ``b`` (their first ``seq_lens[b]`` tokens through ``page_table [B, pages]``)."""
    out = []
    for b, n in enumerate(seq_lens):
        ids = page_table[b, :-(-n // pages.shape[-2])].long()
        x = pages[ids].movedim(-2, 1)                    # [pages, page, ..., X]
        out.append(x.reshape(-1, *x.shape[2:])[:n])
    return torch.cat(out) if out else pages.new_zeros((0, *pages.shape[1:-2],
                                                       pages.shape[-1]))


def paged_segments(seq_lens: List[int], q_lens: List[int]) -> Segments:
    """Geometry of the packed requests: request ``b``'s ``q_lens[b]`` queries are the last
    positions of its ``seq_lens[b]`` gathered keys."""
    q_start = [sum(q_lens[:b]) for b in range(len(q_lens))]
    k_base = [sum(seq_lens[:b]) for b in range(len(seq_lens))]
    return Segments(q_start, list(q_lens), k_base, list(seq_lens), sum(q_lens),
                    sum(seq_lens))


def paged_decode_reference(q, qi, k_pages, v_pages, ki_pages, page_table, seq_lens, *,
                           num_q: int, topk: int, scale: float, index_scale: float,
                           index_precision: str = "input"
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [B*Q, Hq, D], lse [B*Q, Hq], topk_indices [Hi, B*Q, K])`` of one decode
    step (shapes as ``paged_decode``; ``seq_lens`` and ``page_table`` hold the ``B``
    requests of the step). ``index_precision="fp8"`` / ``"int4"``: candidates by the e4m3
    / int4 scores, then the exact ones (``indexer_reference``; the decoder's ``ki_scan``)."""
    lens = [int(n) for n in seq_lens.tolist()]
    seg = paged_segments(lens, [num_q] * len(lens))
    bs = k_pages.shape[-2]
    ki = gather_pages(ki_pages.unsqueeze(1), page_table, lens)            # [T, 1, Di]
    k = gather_pages(k_pages, page_table, lens)
    v = gather_pages(v_pages, page_table, lens)
    idx, _ = indexer_reference(qi, ki, seg, block_size=bs, topk=topk, scale=index_scale,
                               index_precision=index_precision)
    out, lse = attention_forward_reference(q, k, v, idx, seg, block_size=bs, scale=scale)
    return out, lse, idx
