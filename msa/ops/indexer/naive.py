"""Reference MSA indexer (docs/semantics.md, "Selection"): block scores, top-k, selected
LSE.

For query ``q`` (position ``p``) and index head ``h``::

    s[h, q, t] = scale * qi[q, h] . ki[k_base + t]            for t <= p
    M[h, q, L] = max_{t in block L, t <= p} s[h, q, t]         (block max pooling)
    ranked     = the min(topk-1, local) blocks L < local with the largest M
                 (score descending, then block id ascending)
    topk row   = [ranked..., local, -1, ...]                   local = p // block_size
    lse[h, q]  = log sum_{selected L} sum_{t in L, t <= p} exp(s[h, q, t] / T)

Work is chunked over queries and key tiles: the largest buffers are
``[C, Hi, T/block]`` block statistics for one chunk of ``C`` queries.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ...varlen import Segments
from ..quant import (FP8_CANDIDATES, INT4_CANDIDATES, fake_quantize, fake_quantize_int4,
                     fake_quantize_int8)
from ..common import (CHUNK_BUDGET, chunk_size, compute_dtype, dense_keys, gather_keys,
                      group_logits, query_chunks)


def _block_stats(qi: torch.Tensor, ki: torch.Tensor, k_base: int, pos: torch.Tensor,
                 nblocks: int, block_size: int, scale: float, temperature: float,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block max ``M`` and ``S_T = sum exp((s - M)/T)`` for one query chunk.

    qi: ``[C, Hi, Di]``; returns two ``[C, Hi, nblocks]`` tensors (``M = -inf``,
    ``S = 0`` for blocks with no visible key).
    """
    c, hi, _ = qi.shape
    m_out = torch.full((c, hi, nblocks), float("-inf"), dtype=dtype, device=qi.device)
    s_out = torch.zeros_like(m_out)
    tile_blocks = max(1, CHUNK_BUDGET // (c * hi * block_size))
    for l0 in range(0, nblocks, tile_blocks):
        l1 = min(nblocks, l0 + tile_blocks)
        t1 = min(l1 * block_size, int(pos.max()) + 1)
        rows, allowed = dense_keys(k_base, pos, l0 * block_size, t1)
        s = group_logits(qi, gather_keys(ki, rows, hi, dtype), scale).squeeze(2)  # [C,Hi,n]
        s = s.masked_fill(~allowed, float("-inf"))
        pad = (l1 - l0) * block_size - s.shape[-1]
        s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
        s = s.view(c, hi, l1 - l0, block_size)
        m = s.amax(-1)
        m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        m_out[..., l0:l1] = m
        s_out[..., l0:l1] = torch.exp((s - m_safe.unsqueeze(-1)) / temperature).sum(-1)
    return m_out, s_out


def rank_scores(m: torch.Tensor) -> torch.Tensor:
    """Ranking key of block maxima: NaN -> very negative, -0 -> +0."""
    very_negative = torch.finfo(m.dtype).min
    m = torch.where(torch.isnan(m), torch.full_like(m, very_negative), m)
    return torch.where(m == 0, torch.zeros_like(m), m)


def select_blocks(m: torch.Tensor, local: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k rows from block maxima.

    Args:
        m: ``[C, Hi, NB]`` block max scores; local: ``[C]`` local block of each query.
    Returns:
        ``[C, Hi, topk]`` int64: ``min(topk-1, local)`` ranked ids (score desc, id asc),
        then ``local``, then ``-1``.
    """
    c, hi, nb = m.shape
    blocks = torch.arange(nb, device=m.device)
    candidate = blocks.view(1, 1, nb) < local.view(c, 1, 1)
    key = torch.where(candidate, rank_scores(m), torch.full_like(m, float("-inf")))
    r_max = min(topk - 1, nb)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :r_max]
    n_ranked = torch.clamp(local, max=topk - 1).view(c, 1, 1)               # R per query
    out = torch.full((c, hi, topk), -1, dtype=torch.int64, device=m.device)
    slot = torch.arange(r_max, device=m.device).view(1, 1, -1)
    out[..., :r_max] = torch.where(slot < n_ranked, order, torch.full_like(order, -1))
    out.scatter_(2, n_ranked.expand(c, hi, 1), local.view(c, 1, 1).expand(c, hi, 1))
    return out


def refine(m: torch.Tensor, cand: torch.Tensor, local: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k rows ``[C, Hi, topk]`` choosing only among the candidate blocks of ``cand``
    (rows of ``select_blocks``), ranked by the block maxima ``m [C, Hi, NB]``."""
    nb = m.shape[-1]
    keep = torch.zeros(*m.shape[:-1], nb + 1, dtype=torch.bool, device=m.device)
    keep.scatter_(2, torch.where(cand < 0, nb, cand), True)       # -1 slots: column nb
    return select_blocks(m.masked_fill(~keep[..., :nb], float("-inf")), local, topk)


def indexer_reference(qi: torch.Tensor, ki: torch.Tensor, seg: Segments, *, block_size: int,
                      topk: int, scale: float, lse_temperature: float = 1.0,
                      index_precision: str = "input") -> Tuple[torch.Tensor, torch.Tensor]:
    """Block top-k selection and its LSE.

    Args:
        qi: ``[total_q, Hi, Di]`` index queries; ki: ``[total_k, 1 or Hi, Di]`` index keys.
        seg: validated segment geometry (``msa.varlen.make_segments``).
        index_precision: ``"fp8"``: the ``topk - 1 + FP8_CANDIDATES`` best blocks by the
            scores of ``qi``, ``ki`` quantized to e4m3 per row and dequantized
            (``msa.ops.quant``) are candidates; the best ``topk - 1`` of them by the
            inputs' own scores are selected. ``"int4"`` (the decode scan of an int4 copy,
            ``PagedDecoder.run(..., ki_scan=...)``): the same with ``INT4_CANDIDATES``,
            ``ki`` as ``quantize_int4`` and ``qi`` as ``quantize_int8`` store them. The
            LSE is always that of the inputs.
    Returns:
        topk_indices ``[Hi, total_q, topk]`` int32 (segment-local block ids, local block
        last among the ``min(topk, local+1)`` valid entries, ``-1`` padding) and
        selected_lse ``[Hi, total_q]`` (fp32; fp64 for fp64 inputs).
    """
    dtype = compute_dtype(qi, ki)
    total_q, hi, _ = qi.shape
    # poisoned (-2 / NaN): every query row must be written by a chunk
    out_idx = torch.full((hi, total_q, topk), -2, dtype=torch.int32, device=qi.device)
    out_lse = torch.full((hi, total_q), float("nan"), dtype=dtype, device=qi.device)
    scan_ki = fake_quantize(ki) if index_precision == "fp8" else \
        fake_quantize_int4(ki) if index_precision == "int4" else None
    pos_all = seg.positions(qi.device)
    nb_max = max((seg.num_blocks(b, block_size) for b in range(seg.num_segments)), default=1)
    chunk = chunk_size(hi * max(nb_max, block_size) * 4)
    for b, s0, s1 in query_chunks(seg, chunk):
        pos = pos_all[s0:s1]
        local = pos // block_size
        nblocks = int(local.max()) + 1
        m, s = _block_stats(qi[s0:s1], ki, seg.k_base[b], pos, nblocks, block_size, scale,
                            lse_temperature, dtype)
        if scan_ki is None:
            sel = select_blocks(m, local, topk)                                # [C,Hi,K]
        else:
            fp8 = index_precision == "fp8"
            q = (fake_quantize if fp8 else fake_quantize_int8)(qi[s0:s1])
            m8 = _block_stats(q, scan_ki, seg.k_base[b], pos, nblocks, block_size, scale,
                              lse_temperature, dtype)[0]
            extra = FP8_CANDIDATES if fp8 else INT4_CANDIDATES
            sel = refine(m, select_blocks(m8, local, topk + extra), local, topk)
        vals = m / lse_temperature + torch.log(s)
        picked = torch.gather(vals, 2, sel.clamp_min(0))
        picked = picked.masked_fill(sel < 0, float("-inf"))
        out_lse[:, s0:s1] = torch.logsumexp(picked, dim=-1).transpose(0, 1)
        out_idx[:, s0:s1] = sel.transpose(0, 1).to(torch.int32)
    return out_idx, out_lse
