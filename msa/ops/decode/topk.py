"""Decode top-k: per (query row, index head), the ``K-1`` best earlier blocks of the block
maxima ``M [B*Q, Hi, max_pages]`` by the reference rule (score desc, id asc; NaN lowest,
-0 as +0), the local block, then -1 (docs/semantics.md, "Selection").

Rows with few queries and many blocks (1M tokens: 8192 blocks, 4 rows) rank in chunks
over enough programs, each leaving its chunk's best in place in ``M``, and one program
per row merges them (``topk_chunks``); otherwise one program ranks a whole row.
"""
from __future__ import annotations

from typing import Tuple

import triton
import triton.language as tl

from ..triton_utils import next_pow2, rank_key

TARGET_PROGRAMS = 264           # about two waves on a 132-SM GPU


@triton.jit
def best_blocks(key, ids, R: tl.constexpr, OUT_PAD: tl.constexpr):
    """The ``R`` best of ``key`` (desc, then smaller id; ``-inf`` never picked) ->
    ``(vals, ids) [OUT_PAD]``, padded with ``-inf`` / ``-1``."""
    offs = tl.arange(0, OUT_PAD)
    out_v = tl.full((OUT_PAD,), float("-inf"), dtype=tl.float32)
    out_i = tl.full((OUT_PAD,), -1, dtype=tl.int32)
    for r in range(R):
        best = tl.max(key, 0)
        pick = tl.min(tl.where(key == best, ids, 2147483647), 0)   # ties: smaller id
        pick = tl.where(best > float("-inf"), pick, -1)
        out_v = tl.where(offs == r, best, out_v)
        out_i = tl.where(offs == r, pick, out_i)
        key = tl.where(ids == pick, float("-inf"), key)
    return out_v, out_i


@triton.jit
def write_row(TOPK_INDICES, ranked, local, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr):
    """A top-k row: the ranked ids, ``local`` at ``min(local, K-1)``, then -1."""
    offs_k = tl.arange(0, TOPK_PAD)
    n_ranked = tl.minimum(local, TOPK - 1)
    out = tl.where(offs_k == n_ranked, local, tl.where(offs_k > n_ranked, -1, ranked))
    tl.store(TOPK_INDICES + offs_k, out, mask=offs_k < TOPK)


@triton.jit
def decode_topk_kernel(M, SEQ_LENS, TOPK_INDICES, stride_mc, stride_mh, stride_th, stride_tq,
                       max_pages, NQ: tl.constexpr, BS: tl.constexpr, TOPK: tl.constexpr,
                       TOPK_PAD: tl.constexpr, CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
    """Top-k of one (query row, index head) from its block maxima, the reference rule:
    ``min(K-1, local)`` earlier blocks by score desc / id asc, then ``local``, then -1.
    ``NCHUNK > 1``: this program ranks one chunk of ``CHUNK`` blocks and leaves its best
    ``K-1`` scores, then their ids (as floats), in the chunk's first ``2 * TOPK_PAD``
    entries of ``M`` for ``decode_topk_merge_kernel``."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    j = tl.program_id(2)
    local = (tl.load(SEQ_LENS + c // NQ) - NQ + (c % NQ)) // BS
    idx = j * CHUNK + tl.arange(0, CHUNK)
    row = M + c * stride_mc + h * stride_mh
    m = tl.load(row + idx, mask=idx < max_pages, other=float("-inf"))
    key = tl.where(idx < local, rank_key(m), float("-inf"))       # earlier blocks only
    vals, ids = best_blocks(key, idx, TOPK - 1, TOPK_PAD)
    if NCHUNK == 1:
        write_row(TOPK_INDICES + h * stride_th + c * stride_tq, ids, local, TOPK, TOPK_PAD)
    else:
        offs = j * CHUNK + tl.arange(0, TOPK_PAD)
        tl.store(row + offs, vals)
        tl.store(row + TOPK_PAD + offs, ids.to(tl.float32))


@triton.jit
def decode_topk_merge_kernel(M, SEQ_LENS, TOPK_INDICES, stride_mc, stride_mh, stride_th,
                             stride_tq, max_pages, NQ: tl.constexpr, BS: tl.constexpr,
                             TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, CHUNK: tl.constexpr,
                             NCHUNK: tl.constexpr, NCHUNK_PAD: tl.constexpr):
    """The top-k row from the ``NCHUNK`` chunks' best blocks (``decode_topk_kernel``) and
    the block maxima past the last whole chunk (fewer than ``CHUNK``)."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    local = (tl.load(SEQ_LENS + c // NQ) - NQ + (c % NQ)) // BS
    row = M + c * stride_mc + h * stride_mh
    e = tl.arange(0, NCHUNK_PAD * TOPK_PAD)
    at = row + (e // TOPK_PAD) * CHUNK + e % TOPK_PAD
    part = e < NCHUNK * TOPK_PAD
    key = tl.load(at, mask=part, other=float("-inf"))
    ids = tl.load(at + TOPK_PAD, mask=part, other=-1.0).to(tl.int32)
    tail = NCHUNK * CHUNK + tl.arange(0, CHUNK)
    tail_key = tl.load(row + tail, mask=tail < max_pages, other=float("-inf"))
    tail_key = tl.where(tail < local, rank_key(tail_key), float("-inf"))
    offs = tl.arange(0, TOPK_PAD)
    ranked = tl.full((TOPK_PAD,), -1, dtype=tl.int32)
    for r in range(TOPK - 1):          # best_blocks over both candidate sets
        best = tl.maximum(tl.max(key, 0), tl.max(tail_key, 0))
        pick = tl.minimum(tl.min(tl.where(key == best, ids, 2147483647), 0),
                          tl.min(tl.where(tail_key == best, tail, 2147483647), 0))
        pick = tl.where(best > float("-inf"), pick, -1)
        ranked = tl.where(offs == r, pick, ranked)
        key = tl.where(ids == pick, float("-inf"), key)
        tail_key = tl.where(tail == pick, float("-inf"), tail_key)
    write_row(TOPK_INDICES + h * stride_th + c * stride_tq, ranked, local, TOPK, TOPK_PAD)


def decode_topk(block_max, seq_lens, topk_indices, *, batch: int, num_q: int,
                max_pages: int, block_size: int) -> None:
    """``topk_indices [Hi, B*Q, K]`` from ``block_max [B*Q, Hi, max_pages]`` (overwritten
    with chunk results when the rows rank in chunks)."""
    b, nq = batch, num_q
    hi, topk = topk_indices.shape[0], topk_indices.shape[2]
    nchunk, chunk = topk_chunks(b * nq * hi, max_pages, topk)
    args = (block_max, seq_lens, topk_indices, block_max.stride(0), block_max.stride(1),
            topk_indices.stride(0), topk_indices.stride(1), max_pages)
    meta = dict(NQ=nq, BS=block_size, TOPK=topk, TOPK_PAD=next_pow2(topk), CHUNK=chunk)
    if nchunk == 0:                                   # one chunk covers the row
        decode_topk_kernel[(b * nq, hi, 1)](*args, **meta, NCHUNK=1,
                                            num_warps=8 if chunk > 4096 else 4)
    else:
        # one warp per program: the 15 rounds of max/min reductions then need no barriers
        decode_topk_kernel[(b * nq, hi, nchunk)](*args, **meta, NCHUNK=nchunk, num_warps=1)
        decode_topk_merge_kernel[(b * nq, hi)](*args, **meta, NCHUNK=nchunk,
                                               NCHUNK_PAD=next_pow2(nchunk), num_warps=1)


def topk_chunks(rows: int, max_pages: int, topk: int) -> Tuple[int, int]:
    """``(nchunk, chunk)``: the block maxima of each of ``rows`` (query, index head) rows
    ranked in ``nchunk`` whole chunks of ``chunk`` blocks (a power of two, at least
    ``max(256, 2 * topk_pad)``) so that about ``TARGET_PROGRAMS`` programs rank them,
    the rest merged by one program per row; ``nchunk = 0``: one program per row ranks all
    ``max_pages`` (``chunk`` of them, padded)."""
    per_row = TARGET_PROGRAMS // rows
    chunk = next_pow2(max(256, 2 * next_pow2(topk), -(-max_pages // max(1, per_row))))
    if per_row < 2 or chunk >= max_pages:
        return 0, next_pow2(max_pages)
    return max_pages // chunk, chunk
