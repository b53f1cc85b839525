"""MSA prefill over a paged cache's tensors: the indexer and the attention, by gather or
in place.

Pages ``[P, Hkv, page, D]`` (index keys ``[P, page, Di]``), ``page_table [B, max_pages]``,
``seq_lens [B]``; queries of request ``b`` are the last ``q_len_b`` positions of its
``seq_lens[b]`` tokens, request-major. Top-k is head-major ``[H, total_q, K]`` of logical
page ids, as everywhere in ``msa``; ``token_major`` converts for engines that want
``[total_q, H, K]``.

``paged_indexer`` / ``paged_attention`` gather the pages of each request into a packed
sequence and run the packed operators (Triton on CUDA): exact, and they copy the used
pages once per call (at HBM speed: ~1-2% of a long prefill). ``paged_attention_in_place``
reads each selected page where it lies.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..functional import msa_indexer, msa_sparse_attention
from ..ops.checks import check_page_scales
from ..ops.decode.naive import gather_pages
from ..ops.quant import E4M3, dequantize, fake_quantize
from ..varlen import cu_seqlens_from_lengths


def _check_paged(k_pages, page_table, seq_lens, q_lens):
    if page_table.dim() != 2 or page_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"page_table must be [B, max_pages] int32/int64, got "
                         f"{tuple(page_table.shape)} {page_table.dtype}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != page_table.shape[0]:
        raise ValueError(f"seq_lens must be [B={page_table.shape[0]}], got "
                         f"{tuple(seq_lens.shape)}")
    ps, npages = k_pages.shape[-2], k_pages.shape[0]
    lens = seq_lens.tolist()
    for b, (n, ql) in enumerate(zip(lens, q_lens)):
        if not 0 < ql <= n:
            raise ValueError(f"request {b}: need 0 < q_len={ql} <= seq_lens={n}")
        need = -(-n // ps)
        if need > page_table.shape[1]:
            raise ValueError(f"request {b}: seq_lens={n} needs {need} pages, page_table has "
                             f"{page_table.shape[1]}")
        pages = page_table[b, :need]
        if bool(((pages < 0) | (pages >= npages)).any()):
            raise IndexError(f"request {b}: page_table holds a page outside [0, {npages})")
    return lens


def _gathered(pages, scales, page_table, lens, dtype):
    """Token rows of ``pages [P, ..., page, X]`` (dequantized with ``scales [P, ...,
    page]`` when given) as ``dtype``."""
    x = gather_pages(pages, page_table, lens)
    if scales is None:
        return x
    return dequantize(x, gather_pages(scales.unsqueeze(-1), page_table, lens)[..., 0]
                      ).to(dtype)


def paged_indexer(qi, ki_pages, page_table, seq_lens, q_lens: Optional[List[int]] = None, *,
                  block_size: int, topk: int = 16, softmax_scale=None, ki_scales=None,
                  index_precision: str = "input"):
    """Top-k ``[Hi, total_q, topk]`` for queries ``qi [total_q, Hi, Di]`` (request-major;
    ``q_lens`` per request, default: equal split) over the paged index keys
    ``ki_pages [pages, page, Di]`` (FP8 pages: with ``ki_scales [pages, page]``, scored
    against the queries quantized to e4m3 the same way, docs/semantics.md);
    ``index_precision`` as ``msa_indexer``'s (``"int4"``, the rule of a decode scan over
    an int4 copy, by its reference)."""
    q_lens = q_lens or [qi.shape[0] // page_table.shape[0]] * page_table.shape[0]
    if ki_pages.dim() != 3 or ki_pages.shape[1] != block_size:
        raise ValueError(f"ki_pages must be [pages, page={block_size}, Di] (a page is one "
                         f"block of block_size keys: the top-k ids are logical page ids), "
                         f"got {tuple(ki_pages.shape)}")
    check_page_scales(("ki_scales",), (ki_pages,), (ki_scales,))
    if ki_scales is not None:
        qi = fake_quantize(qi).to(qi.dtype)
    lens = _check_paged(ki_pages.unsqueeze(1), page_table, seq_lens, q_lens)
    ki = _gathered(ki_pages.unsqueeze(1), None if ki_scales is None else
                   ki_scales.unsqueeze(1), page_table, lens, qi.dtype)      # [T, 1, Di]
    cu_q = cu_seqlens_from_lengths(q_lens, device=qi.device)
    cu_k = cu_seqlens_from_lengths(lens, device=qi.device)
    return msa_indexer(qi, ki, cu_q, cu_k, block_size=block_size, topk=topk,
                       softmax_scale=softmax_scale, index_precision=index_precision,
                       backend="reference" if index_precision == "int4" else "auto")


def paged_attention(q, k_pages, v_pages, topk_indices, page_table, seq_lens,
                    q_lens: Optional[List[int]] = None, *, softmax_scale=None, k_scales=None,
                    v_scales=None):
    """MSA over a paged cache: ``q [total_q, Hq, D]`` (request-major), pages
    ``[P, Hkv, page, D]`` (FP8 pages: with ``k_scales, v_scales [P, Hkv, page]``),
    head-major ``topk_indices [Hkv or 1, total_q, K]`` of logical page ids. Returns
    ``out [total_q, Hq, D]``."""
    q_lens = q_lens or [q.shape[0] // page_table.shape[0]] * page_table.shape[0]
    check_page_scales(("k_scales", "v_scales"), (k_pages, v_pages), (k_scales, v_scales))
    lens = _check_paged(k_pages, page_table, seq_lens, q_lens)
    k = _gathered(k_pages, k_scales, page_table, lens, q.dtype)
    v = _gathered(v_pages, v_scales, page_table, lens, q.dtype)
    cu_q = cu_seqlens_from_lengths(q_lens, device=q.device)
    cu_k = cu_seqlens_from_lengths(lens, device=q.device)
    return msa_sparse_attention(q, k, v, topk_indices, cu_q, cu_k,
                                block_size=k_pages.shape[-2], softmax_scale=softmax_scale)


def paged_attention_in_place(q, k_pages, v_pages, topk_indices, page_table, seq_lens,
                             q_lens: Optional[List[int]] = None, *, softmax_scale=None,
                             k_scales=None, v_scales=None):
    """``paged_attention`` without the gather: the KV-outer kernel reads each selected
    page where it lies (e4m3 pages dequantized once per block and KV head, for all the
    queries that selected it). Kernels only (CUDA, or CPU in the interpreter); same
    arguments, checks and result as ``paged_attention``."""
    from ..ops.attention.forward import sparse_attn_fwd
    from ..ops.checks import check_topk_indices
    from ..ops.geometry import block_rows, paged_rows
    from ..ops.plan import build_plan
    from ..ops.workspace import forward_chunk, item_queries
    from ..varlen import make_segments
    q_lens = q_lens or [q.shape[0] // page_table.shape[0]] * page_table.shape[0]
    check_page_scales(("k_scales", "v_scales"), (k_pages, v_pages), (k_scales, v_scales))
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if x.dim() != 4 or not x.is_contiguous() or x.shape != k_pages.shape:
            raise ValueError(f"{name} must be contiguous [P, Hkv, page, D] pages of one "
                             f"shape, got {tuple(x.shape)}")
    num_pages, hkv, bs, d = k_pages.shape
    if q.dim() != 3 or q.shape[2] != d or q.shape[1] % hkv:
        raise ValueError(f"q must be [total_q, Hq, D={d}] with Hq a multiple of "
                         f"Hkv={hkv}, got {tuple(q.shape)}")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if x.dtype not in (q.dtype, E4M3) or x.device != q.device:
            raise TypeError(f"{name} must be {q.dtype} or float8_e4m3fn pages on "
                            f"{q.device} (as q), got {x.dtype} on {x.device}")
    lens = _check_paged(k_pages, page_table, seq_lens, q_lens)
    cu_q = cu_seqlens_from_lengths(q_lens, device=q.device)
    cu_k = cu_seqlens_from_lengths(lens, device=q.device)
    seg = make_segments(q.shape[0], sum(lens), cu_q, cu_k)
    check_topk_indices(topk_indices, seg, (1, hkv), bs, q.device)
    rows = paged_rows(block_rows(seg, bs, q.device), seg, page_table, hkv * bs)
    plan = build_plan(topk_indices, seg, block_size=bs, heads=hkv, rows=rows,
                      chunk=forward_chunk(q.shape[1], d, q.element_size(),
                                          topk_indices.shape[-1]),
                      q_per_item=item_queries(q.shape[1] // hkv))
    k, v = (_token_rows(x) for x in (k_pages, v_pages))
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out, _ = sparse_attn_fwd(q, k, v, topk_indices, plan, scale=scale, query_major=False,
                             k_scales=k_scales, v_scales=v_scales)
    return out


def _token_rows(pages: torch.Tensor) -> torch.Tensor:
    """``pages [P, Hkv, page, D]`` (contiguous) as a ``[rows, Hkv, D]`` view whose row
    ``p * Hkv * page + t`` is token ``t`` of page ``p`` (no copy)."""
    num_pages, hkv, bs, d = pages.shape
    n = (num_pages - 1) * hkv * bs + bs if num_pages else 0
    return pages.as_strided((n, hkv, d), (d, bs * d, 1), pages.storage_offset())


def token_major(topk_indices: torch.Tensor) -> torch.Tensor:
    """Head-major ``[H, tokens, K]`` -> token-major ``[tokens, H, K]`` (contiguous)."""
    return topk_indices.transpose(0, 1).contiguous()
