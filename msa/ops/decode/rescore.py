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
on random data). No candidate set is ranked to find them.

``paged_rescore_kernel``, grid (query row, index head, run of lists): each program finds
the candidates among its lists' keys, scores them again with the exact index keys (one
page each) and writes each list's exact ``pack`` keys, ranked, where the scan's list was (in
a buffer of the candidates' layout); the top-k merge then reads those lists as it reads
the scan's. The selection equals that of the exact keys whenever their ``topk - 1`` best
blocks are among the candidates.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..quant import FP8_CANDIDATES, INT4_CANDIDATES
from ..triton_utils import dot, next_pow2, precision, upcast
from .select import EMPTY, TARGET_PROGRAMS, block_id, pack, ranked_keys

PROGRAMS = TARGET_PROGRAMS          # runs of lists per program beyond that many programs
COMPARED = 1024         # keys each candidate is compared with at most
RUN_KEYS = 128          # keys of the lists of one program at most


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
def paged_rescore_kernel(
        CAND, QI, KI, PAGE_TABLE, EXACT, scale, n_lists,
        stride_cc, stride_ch, stride_qt, stride_qh, stride_kp, stride_kt, stride_tb,
        stride_ec, stride_eh, NQ: tl.constexpr, DI: tl.constexpr, BS: tl.constexpr,
        LS: tl.constexpr, KR: tl.constexpr, KR_OUT: tl.constexpr, NL_PAD: tl.constexpr,
        TOP: tl.constexpr, NC: tl.constexpr, RUN: tl.constexpr, CMP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Lists ``p, p + P, ..`` (``RUN`` of them, ``P`` programs on axis 2) of (query row
    ``c``, index head ``h``): the exact keys of each list's candidates, ranked, at
    ``EXACT[c, h, list * LS :][:KR_OUT]`` (``EMPTY`` padded). A key is a candidate when
    fewer than ``NC`` of the first ``TOP`` keys of every list exceed it (``TOP``:
    ``compared_keys``). The run's keys are loaded and compared at once, their pages
    looked up at once; then one page per candidate."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    p = tl.program_id(2)
    b = c // NQ
    lists = CAND + c * stride_cc + h * stride_ch
    offs_i = tl.arange(0, RUN)
    offs_k = tl.arange(0, KR)
    lst = p + offs_i * tl.num_programs(2)          # lists strided: the best ones spread
    live = lst < n_lists
    slots = lst[:, None] * LS + offs_k[None, :]                             # [RUN, KR]
    keys = tl.reshape(tl.load(lists + slots, mask=live[:, None], other=EMPTY), (RUN * KR,))
    above = tl.zeros((RUN * KR,), dtype=tl.int32)
    for t in range(0, NL_PAD * TOP, CMP):       # the compared keys, CMP at a time
        offs_t = t + tl.arange(0, CMP)
        top = tl.load(lists + (offs_t // TOP) * LS + offs_t % TOP,
                      mask=offs_t // TOP < n_lists, other=EMPTY)
        above += tl.sum((top[:, None] > keys[None, :]).to(tl.int32), 0)
    cand = (above < NC) & (keys != EMPTY)
    nth = tl.cumsum(cand.to(tl.int32), 0) - 1           # each candidate's place in the run
    blk = block_id(keys)
    page = tl.load(PAGE_TABLE + b * stride_tb + blk, mask=cand, other=0)
    offs_r = tl.arange(0, 16)
    qi = tl.load(QI + c * stride_qt + h * stride_qh + offs_r[:, None] * 0 +
                 tl.arange(0, DI)[None, :], mask=offs_r[:, None] == 0, other=0.0)
    exact = tl.full((RUN * KR,), EMPTY, dtype=tl.int64)
    n = tl.sum(cand.to(tl.int32), 0)
    for r in range(n):                  # one page per candidate
        at = cand & (nth == r)
        m = _block_max(KI, qi, tl.max(tl.where(at, page, 0), 0).to(tl.int64), stride_kp,
                       stride_kt, DI, BS, PRECISION, UPCAST) * scale
        exact = tl.where(at, tl.where(m != float("-inf"), pack(m, blk), EMPTY), exact)
    exact = tl.sort(tl.reshape(exact, (RUN, KR)), dim=1, descending=True)
    tl.store(EXACT + c * stride_ec + h * stride_eh + slots, exact,
             mask=live[:, None] & (offs_k[None, :] < KR_OUT))


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


def paged_rescore(candidates, lists, qi, ki, page_table, exact, *, num_q: int, topk: int,
                  block_size: int, index_scale: float, scan_dtype) -> Tuple[int, int, int]:
    """Re-score the candidates of each row (at least the scan's best ``num_candidates(topk,
    scan_dtype)`` blocks) with the exact index keys ``ki [P, page, Di]`` (the scan's page
    table) into ``exact`` (int64, the layout of ``candidates [B*Q, Hi, width]``); returns
    the lists ``(ls, n_lists, kr)`` of ranked exact keys for the top-k merge
    (``msa.ops.decode.select.merge_lists``). ``lists``: the scan's (``paged_scan`` with
    ``topk = num_candidates(...) + 1``) over a copy of dtype ``scan_dtype``."""
    ls, n_lists, kr = lists
    rows, hi = qi.shape[0], qi.shape[1]
    if exact.dtype != torch.int64 or exact.shape[:2] != candidates.shape[:2] or \
            exact.shape[2] < n_lists * ls or exact.stride(2) != 1:
        raise ValueError(f"exact must be int64 [{rows}, {hi}, >= {n_lists * ls}] with a "
                         f"contiguous last dim, got {tuple(exact.shape)} {exact.dtype}")
    kr_out = ranked_keys(topk, ls)      # the exact keys are ranked lists
    top = compared_keys(n_lists, kr)
    run = min(max(1, RUN_KEYS // kr), next_pow2(n_lists),
              next_pow2(-(-rows * hi * n_lists // PROGRAMS)))
    paged_rescore_kernel[(rows, hi, triton.cdiv(n_lists, run))](
        candidates, qi, ki, page_table, exact, index_scale, n_lists,
        candidates.stride(0), candidates.stride(1), qi.stride(0), qi.stride(1),
        ki.stride(0), ki.stride(1), page_table.stride(0), exact.stride(0), exact.stride(1),
        NQ=num_q, DI=qi.shape[-1], BS=block_size, LS=ls, KR=kr, KR_OUT=kr_out,
        NL_PAD=next_pow2(n_lists), TOP=top,
        NC=num_candidates(topk, scan_dtype), RUN=run,
        CMP=min(next_pow2(n_lists) * top, 32768 // (run * kr)), PRECISION=precision(qi.dtype),
        UPCAST=upcast(qi.dtype), num_warps=4)
    return ls, n_lists, kr_out
