"""Exact re-scoring of the candidates of a decode scan over a low-precision copy of the
index keys (``PagedDecoder.run(..., ki_scan=...)``: docs/semantics.md, "FP8 index
scoring" and "INT4 scan copy").

The scan (``msa.ops.decode.select.paged_scan``) reads a low-precision copy of the index
keys, e4m3 (half the bytes of bf16 ones) or int4 (a quarter, with group scales), and
leaves lists of its block keys. ``paged_rescore_kernel``, grid (query row, index head,
slice of the candidates): each program takes the row's ``num_candidates`` best keys of
the copy (``top_keys``: ``topk - 1 + FP8_CANDIDATES`` or ``+ INT4_CANDIDATES``),
scores its slice of those blocks again with the exact index keys (one page each) and
writes their exact ``pack`` keys; the top-k merge then ranks those keys as lists of one.
The selection equals that of the exact keys whenever their ``topk - 1`` best blocks are
among the candidates.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..quant import FP8_CANDIDATES, INT4_CANDIDATES
from ..triton_utils import dot, next_pow2, precision, upcast
from .select import EMPTY, TARGET_PROGRAMS, block_id, pack, top_keys

RESCORE_PROGRAMS = 2 * TARGET_PROGRAMS      # candidate slots per program: rows x heads x
# candidates over this, a power of two


@triton.jit
def paged_rescore_kernel(
        CAND, QI, KI, PAGE_TABLE, EXACT, scale, n_lists,
        stride_cc, stride_ch, stride_qt, stride_qh, stride_kp, stride_kt, stride_tb,
        stride_ec, stride_eh, NQ: tl.constexpr, DI: tl.constexpr, BS: tl.constexpr,
        LS: tl.constexpr, KR: tl.constexpr, NL_PAD: tl.constexpr, NC: tl.constexpr,
        NC_PAD: tl.constexpr, PER: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr):
    """Candidates ``p * PER ..`` of (query row ``c``, index head ``h``): the exact key of
    each at ``EXACT[c, h, slot]`` (``EMPTY`` for no block)."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    p = tl.program_id(2)
    b = c // NQ
    offs_c = tl.arange(0, NC_PAD)
    cand = top_keys(CAND + c * stride_cc + h * stride_ch, n_lists, LS, KR, NL_PAD, NC_PAD)
    blocks = tl.where(offs_c < NC, block_id(cand), -1)
    offs_r = tl.arange(0, 16)           # the query row, padded to an MMA tile
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, DI)
    qi = tl.load(QI + c * stride_qt + h * stride_qh + offs_r[:, None] * 0 + offs_d[None, :],
                 mask=offs_r[:, None] == 0, other=0.0)
    for s in range(PER):
        slot = p * PER + s
        blk = tl.max(tl.where(offs_c == slot, blocks, -1), 0)
        page = tl.load(PAGE_TABLE + b * stride_tb + blk, mask=blk >= 0, other=0).to(tl.int64)
        ki = tl.load(KI + page * stride_kp + offs_n[:, None] * stride_kt + offs_d[None, :],
                     mask=blk >= 0, other=0.0)
        # a candidate lies before the query's local block: every key of it is visible
        s_rows = tl.max(dot(qi, tl.trans(ki), PRECISION, UPCAST), 1)
        m = tl.max(tl.where(offs_r == 0, s_rows, float("-inf")), 0) * scale
        tl.store(EXACT + c * stride_ec + h * stride_eh + slot,
                 tl.where((blk >= 0) & (m != float("-inf")), pack(m, blk), EMPTY))


def num_candidates(topk: int, scan_dtype=torch.float8_e4m3fn) -> int:
    """Blocks a scan of a low-precision copy of the index keys (e4m3, or packed int4 as
    ``torch.uint8``) keeps per row for the exact re-scoring."""
    return topk - 1 + (INT4_CANDIDATES if scan_dtype == torch.uint8 else FP8_CANDIDATES)


def exact_width(topk: int, scan_dtype=torch.uint8) -> int:
    """Last dim of the exact-keys buffer ``[B*Q, Hi, width]`` int64 (default: wide enough
    for either copy)."""
    return next_pow2(num_candidates(topk, scan_dtype))


def paged_rescore(candidates, lists, qi, ki, page_table, exact, *, num_q: int, topk: int,
                  block_size: int, index_scale: float, scan_dtype) -> Tuple[int, int, int]:
    """Re-score the scan's best ``num_candidates(topk, scan_dtype)`` blocks of each row
    with the exact index keys ``ki [P, page, Di]`` (the scan's page table) into ``exact
    [B*Q, Hi, >= exact_width(topk, scan_dtype)]`` int64; returns the lists ``(ls, n_lists,
    kr)`` of one exact key each for the top-k merge (``msa.ops.decode.select.merge_lists``).
    ``lists``: the scan's (``paged_scan`` with ``topk = num_candidates(...) + 1``) over
    a copy of dtype ``scan_dtype``."""
    ls, n_lists, kr = lists
    rows, hi = qi.shape[0], qi.shape[1]
    nc, nc_pad = num_candidates(topk, scan_dtype), exact_width(topk, scan_dtype)
    if exact.dtype != torch.int64 or exact.shape[2] < nc_pad or exact.stride(2) != 1:
        raise ValueError(f"exact must be int64 with a contiguous last dim of >= {nc_pad}, "
                         f"got {tuple(exact.shape)} {exact.dtype}")
    # candidates per program: one each while rows are few (each program merges its row's
    # lists first: the latency of one merge and one page), more as rows grow
    per = max(1, min(nc_pad, next_pow2(rows * hi * nc // RESCORE_PROGRAMS)))
    spans = triton.cdiv(nc, per)
    paged_rescore_kernel[(rows, hi, spans)](
        candidates, qi, ki, page_table, exact, index_scale, n_lists,
        candidates.stride(0), candidates.stride(1), qi.stride(0), qi.stride(1),
        ki.stride(0), ki.stride(1), page_table.stride(0), exact.stride(0), exact.stride(1),
        NQ=num_q, DI=qi.shape[-1], BS=block_size, LS=ls, KR=kr, NL_PAD=next_pow2(n_lists),
        NC=nc, NC_PAD=nc_pad, PER=per, PRECISION=precision(qi.dtype), UPCAST=upcast(qi.dtype),
        num_warps=8 if n_lists > 4096 else 4)
    return 1, spans * per, 1        # slots past the candidates hold EMPTY
