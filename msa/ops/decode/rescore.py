"""Exact re-scoring of the candidates of a decode scan over a low-precision copy of the
index keys (``PagedDecoder.run(..., ki_scan=...)``: docs/semantics.md, "FP8 index
scoring" and "INT4 scan copy").

The scan (``msa.ops.decode.select.paged_scan``) reads a low-precision copy of the index
keys, e4m3 (half the bytes of bf16 ones) or int4 (a quarter, with group scales), and
leaves one list of block keys per chunk, its largest key first. The candidates of a row
are the listed keys that fewer than ``NC`` of the compared keys exceed (``NC =
num_candidates``: ``topk - 1 + FP8_CANDIDATES`` or ``+ INT4_CANDIDATES``). The compared
keys are all listed keys while they are few (``COMPARED``): the candidates are then the
copy's ``NC`` best blocks. Past that they are the lists' heads: every one of the ``NC``
best blocks is still a candidate (the ``NC`` best heads are ``NC`` keys at least as
large as the ``NC``-th best key), and a few more blocks may be (87 for 79 at 1M tokens
on random data). A key is a candidate exactly when it is at least the ``NC``-th largest
compared key, so one sorting network over the compared keys finds them.

Two kernels:

- ``rescore_candidates_kernel``, grid (query row, index head): the row's candidates'
  scan keys, packed first in a buffer of the candidates' layout, and their number.
- ``rescore_pages_kernel``, grid (query row, index head, ``rescore_programs``): each
  program scores a strided share of the candidates again over their pages of exact
  index keys (one page each where rows are few, so that no program reads pages one
  after another), and the last program of a row to finish merges the exact keys into
  its top-k row.

The selection equals that of the exact keys whenever their ``topk - 1`` best blocks are
among the candidates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import FP8_CANDIDATES, INT4_CANDIDATES
from ..triton_utils import dot, next_pow2, precision, upcast
from .select import EMPTY, TARGET_PROGRAMS, block_id, merge_lists, pack

PROGRAMS = TARGET_PROGRAMS          # page-scoring programs: about two waves of them
MIN_SPLIT = 4           # page-scoring programs per row at least
COMPARED = 1024         # keys each candidate is compared with at most
SMALL = 128             # the final merge's tile while a row has at most that many candidates


@triton.jit
def _block_max(KI, qi, page, stride_kp, stride_kt, DI: tl.constexpr, BS: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The largest score of query row 0 of ``qi [16, DI]`` (the rest zero: an MMA tile)
    over the keys of ``page``, an earlier block (every key visible)."""
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, DI)
    ki = tl.load(KI + page * stride_kp + offs_n[:, None] * stride_kt + offs_d[None, :])
    s = tl.max(dot(qi, tl.trans(ki), PRECISION, UPCAST), 1)
    return tl.max(tl.where(tl.arange(0, 16) == 0, s, float("-inf")), 0)


@triton.jit
def rescore_candidates_kernel(
        CAND, EXACT, COUNTS, n_lists, stride_cc, stride_ch, stride_ec, stride_eh,
        stride_nc, stride_nh, LS: tl.constexpr, KR: tl.constexpr, NL_PAD: tl.constexpr,
        TOP: tl.constexpr, NC: tl.constexpr, NC_PAD: tl.constexpr):
    """The candidates of (query row ``c``, index head ``h``), their scan keys in list
    order at ``EXACT[c, h, :n]`` and their number ``n`` at ``COUNTS[c, h, 0]``: the
    listed keys at least as large as the ``NC``-th largest compared key (the first
    ``TOP`` keys of every list: all ``KR``, or the heads), the keys that fewer than ``NC``
    compared keys exceed. With every key compared they are the ``NC`` best; with the
    heads compared they lie in the lists of the ``NC`` best heads."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    lists = CAND + c * stride_cc + h * stride_ch
    out = EXACT + c * stride_ec + h * stride_eh
    NT: tl.constexpr = NL_PAD * TOP if NL_PAD * TOP > NC_PAD else NC_PAD
    offs_t = tl.arange(0, NT)
    top = tl.topk(tl.load(lists + (offs_t // TOP) * LS + offs_t % TOP,
                          mask=offs_t // TOP < n_lists, other=EMPTY), NC_PAD)
    offs_k = tl.arange(0, NC_PAD)
    if TOP == KR:                       # every listed key compared: the best NC
        keep = (offs_k < NC) & (top != EMPTY)
        tl.store(out + offs_k, top, mask=keep)
        n = tl.sum(keep.to(tl.int32), 0)
    else:                               # the heads: the lists of the best NC of them
        theta = tl.max(tl.where(offs_k == NC - 1, top, EMPTY), 0)
        live = (offs_k < NC) & (top != EMPTY)
        first = tl.where(live, block_id(top) // LS * LS, 0)
        offs_r = tl.arange(0, KR)
        keys = tl.reshape(tl.load(lists + first[:, None] + offs_r[None, :],
                                  mask=live[:, None], other=EMPTY), (NC_PAD * KR,))
        keep = (keys >= theta) & (keys != EMPTY)
        nth = tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + nth, keys, mask=keep)
        n = tl.sum(keep.to(tl.int32), 0)
    tl.store(COUNTS + c * stride_nc + h * stride_nh, n)


@triton.jit
def rescore_pages_kernel(
        EXACT, COUNTS, QI, KI, PAGE_TABLE, SEQ_LENS, TOPK_INDICES, scale,
        stride_ec, stride_eh, stride_nc, stride_nh, stride_qt, stride_qh, stride_kp,
        stride_kt, stride_tb, stride_th, stride_tq, NQ: tl.constexpr, DI: tl.constexpr,
        BS: tl.constexpr, SLOTS: tl.constexpr, MAXC_PAD: tl.constexpr,
        SMALL: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Candidates ``g, g + G, ..`` (``G`` programs on axis 2) of (query row ``c``, index
    head ``h``): each scored again over its page of exact index keys, its key replaced
    in place by the exact one; the last program of the row to finish merges the exact
    keys into the top-k row (``merge_lists``) at ``TOPK_INDICES[h, c]`` and resets the
    row's count of finished programs (``COUNTS[c, h, 1]``)."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    g = tl.program_id(2)
    n_prog = tl.num_programs(2)
    b = c // NQ
    row = EXACT + c * stride_ec + h * stride_eh
    count = COUNTS + c * stride_nc + h * stride_nh
    n = tl.load(count)
    offs_s = tl.arange(0, SLOTS)
    slot = g + offs_s * n_prog
    live = slot < n
    blk = block_id(tl.load(row + slot, mask=live, other=EMPTY))
    page = tl.load(PAGE_TABLE + b * stride_tb + blk, mask=live, other=0)
    offs_r = tl.arange(0, 16)
    qi = tl.load(QI + c * stride_qt + h * stride_qh + offs_r[:, None] * 0 +
                 tl.arange(0, DI)[None, :], mask=offs_r[:, None] == 0, other=0.0)
    for r in range(tl.sum(live.to(tl.int32), 0)):       # one page per candidate
        at = offs_s == r
        j = tl.max(tl.where(at, blk, -1), 0)
        m = _block_max(KI, qi, tl.max(tl.where(at, page, 0), 0).to(tl.int64), stride_kp,
                       stride_kt, DI, BS, PRECISION, UPCAST) * scale
        tl.store(row + g + r * n_prog, tl.where(m != float("-inf"), pack(m, j), EMPTY))
    tl.debug_barrier()                      # every store of this program ...
    done = tl.atomic_add(count + 1, 1, sem="acq_rel")         # ... then released
    if done == n_prog - 1:                  # the last: all exact keys are in place
        tl.store(count + 1, 0)                                  # ready for the next step
        local = (tl.load(SEQ_LENS + b) - NQ + (c % NQ)) // BS
        if MAXC_PAD <= SMALL:
            top = merge_lists(row, n, local, 1, 1, MAXC_PAD, TOPK, TOPK_PAD, True)
        elif n <= SMALL:
            top = merge_lists(row, n, local, 1, 1, SMALL, TOPK, TOPK_PAD, True)
        else:
            top = merge_lists(row, n, local, 1, 1, MAXC_PAD, TOPK, TOPK_PAD, True)
        offs_k = tl.arange(0, TOPK_PAD)
        tl.store(TOPK_INDICES + h * stride_th + c * stride_tq + offs_k, top,
                 mask=offs_k < TOPK)


def num_candidates(topk: int, scan_dtype=torch.float8_e4m3fn) -> int:
    """The copy's best blocks a row's candidates hold at least: those of a scan of a
    low-precision copy of the index keys (e4m3, or packed int4 as ``torch.uint8``)."""
    return topk - 1 + (INT4_CANDIDATES if scan_dtype == torch.uint8 else FP8_CANDIDATES)


def compared_keys(n_lists: int, kr: int) -> int:
    """How many keys of each list a candidate is compared with: all ``kr`` while the
    lists hold at most ``COMPARED`` keys together (the candidates are then exactly the
    best ``NC``), else the list's head, its largest (the rest of a list may be in any
    order)."""
    return kr if n_lists * kr <= COMPARED else 1


def max_candidates(n_lists: int, kr: int, nc: int) -> int:
    """Candidates of a row at most: ``nc`` with every listed key compared, else the keys
    of the lists of the ``nc`` best heads."""
    if compared_keys(n_lists, kr) == kr:
        return min(nc, n_lists * kr)
    return min(nc, n_lists) * kr


def rescore_programs(row_heads: int, nc: int) -> int:
    """Programs per (query row, index head) that score the candidates' pages, given
    ``row_heads`` such pairs: one page each where they are few (about two waves of
    ``PROGRAMS``), at least ``MIN_SPLIT``."""
    return max(MIN_SPLIT, min(next_pow2(nc), -(-2 * PROGRAMS // row_heads)))


def paged_rescore(candidates, lists, qi, ki, page_table, seq_lens, exact, counts,
                  topk_indices, *, num_q: int, block_size: int, index_scale: float,
                  scan_dtype) -> None:
    """The top-k rows ``topk_indices [Hi, B*Q, K]`` of the scan's candidates (at least
    its best ``num_candidates(K, scan_dtype)`` blocks) scored again with the exact index
    keys ``ki [P, page, Di]`` (the scan's page table). ``lists``: the scan's (``paged_scan``
    with ``topk = num_candidates(...) + 1``) over a copy of dtype ``scan_dtype`` in
    ``candidates [B*Q, Hi, width]``; ``exact``: int64 of the candidates' layout (their
    keys, then the exact ones); ``counts``: int32 ``[>= B*Q, Hi, 2]``, zero before the
    first step (each row's candidates and its finished programs, which are reset)."""
    ls, n_lists, kr = lists
    rows, hi = qi.shape[0], qi.shape[1]
    topk = topk_indices.shape[2]
    nc = num_candidates(topk, scan_dtype)
    maxc = max_candidates(n_lists, kr, nc)
    if exact.dtype != torch.int64 or exact.shape[:2] != candidates.shape[:2] or \
            exact.shape[2] < maxc or exact.stride(2) != 1:
        raise ValueError(f"exact must be int64 [{rows}, {hi}, >= {maxc}] with a "
                         f"contiguous last dim, got {tuple(exact.shape)} {exact.dtype}")
    if counts.dtype != torch.int32 or counts.shape[0] < rows or \
            tuple(counts.shape[1:]) != (hi, 2) or counts.stride(2) != 1:
        raise ValueError(f"counts must be int32 [>= {rows}, {hi}, 2] with a contiguous "
                         f"last dim, got {tuple(counts.shape)} {counts.dtype}")
    rescore_candidates_kernel[(rows, hi)](
        candidates, exact, counts, n_lists, candidates.stride(0), candidates.stride(1),
        exact.stride(0), exact.stride(1), counts.stride(0), counts.stride(1), LS=ls, KR=kr,
        NL_PAD=next_pow2(n_lists), TOP=compared_keys(n_lists, kr), NC=nc,
        NC_PAD=next_pow2(nc), num_warps=4)
    split = rescore_programs(rows * hi, nc)
    rescore_pages_kernel[(rows, hi, split)](
        exact, counts, qi, ki, page_table, seq_lens, topk_indices, index_scale,
        exact.stride(0), exact.stride(1), counts.stride(0), counts.stride(1), qi.stride(0),
        qi.stride(1), ki.stride(0), ki.stride(1), page_table.stride(0),
        topk_indices.stride(0), topk_indices.stride(1), NQ=num_q, DI=qi.shape[-1],
        BS=block_size, SLOTS=next_pow2(-(-maxc // split)), MAXC_PAD=next_pow2(maxc),
        SMALL=SMALL, TOPK=topk, TOPK_PAD=next_pow2(topk), PRECISION=precision(qi.dtype),
        UPCAST=upcast(qi.dtype), num_warps=4)
