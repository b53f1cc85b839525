"""Decode selection: an index-key scan writes one ranking key per (query row, index head,
block), a merge of lists of them gives the top-k (docs/semantics.md, "Selection": score
desc, id asc, the local block last, then -1; NaN as the most negative finite value, -0 as
+0).

``paged_scan_kernel``, grid (request, page chunk): each program scores its chunk's pages of
index keys for all ``Q x Hi`` query rows of the request (one MMA per page) and stores, per
row and block, an int64 key (``pack``): the block max in the high word (ordered as a signed
integer), the complement of the block id in the low word, so one integer ``max`` ranks by
score, then by the smaller id; blocks that may not be ranked (the local block, later ones)
hold ``EMPTY``. Each chunk is a list whose first key is its largest. With few query rows
(``rank_in_scan``: one decode token at 1M tokens has 8192 blocks per row) the program
ranks its chunk's keys in place, so that the list is its best ``ranked_keys(K, chunk)``
in order (the Gluon scan keeps them in no order past the largest, all the merge reads),
where those are fewer than the chunk's blocks; else (many rows, or short chunks) it only
swaps the largest key to the front.

``merge_lists``: the top ``K`` heads of the lists by a sorting network (``tl.topk``), then
the top of the keys of those heads' lists (the best ``K-1`` keys lie there); over lists of
one block, ``K-1`` rounds of a ``max``. ``paged_merge_kernel`` writes the top-k rows; the
decode attention kernel merges for itself when its blocks are split over programs
(``msa.ops.decode.triton``).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..triton_utils import dot, next_pow2, precision, rank_key, to_e4m3, upcast

TARGET_PROGRAMS = 264           # about two waves on a 132-SM GPU
MAX_PAGES = 32                  # pages per scan program at most (the Gluon scan's, ranked)
EMPTY = tl.constexpr(-9223372036854775808)      # int64 min: no block


@triton.jit
def pack(m, j):
    """Block max ``m`` (fp32) and block id ``j`` -> int64 key, larger = ranked first."""
    bits = rank_key(m).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)            # float order as signed int
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - j).to(tl.int64)


@triton.jit
def block_id(key):
    """The block id of a ``pack`` key (``-1`` for ``EMPTY``)."""
    return tl.where(key == EMPTY, -1, 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32))


@triton.jit
def _int8_rows(x):
    """Rows ``x [R, D]`` as ``msa.ops.quant.quantize_int8``: int8 ``round(x / s)`` and
    ``s = max|x| / 127`` fp32 (1 for a row of zeros; NaN for a row with a NaN or inf,
    found by its sum, since the GPU's max skips NaN); rounding half to even."""
    xf = x.to(tl.float32)
    amax = tl.max(tl.abs(xf), 1)
    s = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)
    s = tl.where(tl.sum(xf * 0.0, 1) == 0.0, s, float("nan"))     # x * 0: NaN unless finite
    y = tl.math.div_rn(xf, s[:, None])
    y = (y + 12582912.0) - 12582912.0       # 1.5 * 2^23: rounds |y| <= 127 half to even
    return tl.clamp(y, -127.0, 127.0).to(tl.int8), s


@triton.jit
def paged_scan_kernel(
        QI, KI, KIS, PAGE_TABLE, SEQ_LENS, CAND, scale, max_pages,
        stride_qt, stride_qh, stride_kp, stride_kt, stride_tb, stride_cc, stride_ch,
        NQ: tl.constexpr, HI: tl.constexpr, ROWS: tl.constexpr, DI: tl.constexpr,
        BS: tl.constexpr, PAGES: tl.constexpr, KR: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, RANK: tl.constexpr, MASK_TAIL: tl.constexpr = False,
        FP8: tl.constexpr = False, INT4: tl.constexpr = False):
    """Chunk ``p`` of request ``b``: the key of block ``j`` of row ``(i, h)`` at
    ``CAND[b*Q + i, h, j]``, the chunk's largest swapped to its first place; ``RANK``:
    instead the chunk's ``KR`` best, ranked (``EMPTY`` padded), at
    ``CAND[b*Q + i, h, p*PAGES :][:KR]``. ``FP8``: e4m3 keys with row scales ``KIS[page
    * BS + n]``; ``INT4``: packed int4 keys (``DI / 2`` bytes a row) with group scales
    ``KIS[(page * BS + n) * NG + g]`` fp16 (``msa.ops.quant.quantize_int4``)."""
    b = tl.program_id(0)
    p = tl.program_id(1)
    n = tl.load(SEQ_LENS + b)
    offs_r = tl.arange(0, ROWS)
    i = offs_r // HI
    h = offs_r % HI
    rmask = offs_r < NQ * HI
    pos = n - NQ + i
    local = pos // BS
    qrow = (b * NQ + i).to(tl.int64)
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, DI)
    qi = tl.load(QI + qrow[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                 mask=rmask[:, None], other=0.0)
    row_scale = scale
    if FP8:                 # the queries quantized as msa.ops.quant.quantize_e4m3 does
        qf = qi.to(tl.float32)
        amax = tl.max(tl.abs(qf), 1)
        qs = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)      # IEEE, as torch
        q8 = to_e4m3(tl.clamp(tl.math.div_rn(qf, qs[:, None]), -448.0, 448.0,
                              propagate_nan=tl.PropagateNan.ALL))     # NaN stays NaN
        row_scale = qs * scale              # max commutes with a positive row factor
    if INT4:                # the queries as msa.ops.quant.quantize_int8, in groups
        q8, qs = _int8_rows(qi)
        row_scale = qs * scale
        NG: tl.constexpr = DI // 32
        q8 = tl.permute(tl.reshape(q8, (ROWS, NG, 32)), (1, 0, 2))      # [NG, ROWS, 32]
        offs_g = tl.arange(0, NG)
        low = offs_g < NG // 2          # groups in the low nibbles: read plus 8
        q_off = tl.where(low[:, None], 8 * tl.sum(q8.to(tl.int32), 2), 0)     # [NG, ROWS]
        k_mul = tl.where(low, 1.0, 0.0625)          # the high nibbles: read times 16
        offs_h = tl.arange(0, NG // 2)
        offs_i = tl.arange(0, 32)
    lists = CAND + qrow * stride_cc + h * stride_ch + p * PAGES       # [ROWS]: this chunk
    best = tl.full((ROWS,), EMPTY, dtype=tl.int64)          # the chunk's largest key so far,
    at = tl.zeros((ROWS,), dtype=tl.int32)                  # its place
    first = best                                            # and the first key
    for jj in range(PAGES):
        j = p * PAGES + jj
        live = j * BS < n                   # pages past the end: no loads
        page = tl.load(PAGE_TABLE + b * stride_tb + j, mask=live, other=0).to(tl.int64)
        if MASK_TAIL:                   # rows past the last token may lie past the tensor
            rows = live & (j * BS + offs_n < n)
        else:                           # whole pages of a pool: read them whole
            rows = live
        if INT4:            # [NG, ROWS, BS] exact int32 products per group x group scales
            w = tl.load(KI + page * stride_kp + offs_n[None, None, :] * stride_kt +
                        offs_h[:, None, None] * 32 + offs_i[None, :, None],
                        mask=(rows & (offs_n >= 0))[None, None, :], other=0)  # [NG/2, 32, BS]
            # two's-complement nibbles: the low ones as x + 8, the high ones as 16 x
            u = tl.join(((w ^ 8) & 15).to(tl.int8), (w & 0xF0).to(tl.int8, bitcast=True))
            u = tl.reshape(tl.permute(u, (3, 0, 1, 2)), (NG, 32, BS))
            ks = tl.load(KIS + (page * BS + offs_n[None, :]) * NG + offs_g[:, None],
                         mask=(rows & (offs_n >= 0))[None, :], other=0.0).to(tl.float32) * \
                k_mul[:, None]
            acc = tl.dot(q8, u, out_dtype=tl.int32) - q_off[:, :, None]
            s = tl.sum(acc.to(tl.float32) * ks[:, None, :], 0)
        else:
            ki = tl.load(KI + page * stride_kp + offs_n[:, None] * stride_kt +
                         offs_d[None, :], mask=rows[:, None], other=0.0)
            if FP8:                     # e4m3 x e4m3 products x the keys' row scales
                s = dot(q8, tl.trans(ki), "tf32", False) * \
                    tl.load(KIS + page * BS + offs_n, mask=rows, other=0.0)[None, :]
            else:
                s = dot(qi, tl.trans(ki), PRECISION, UPCAST)
        m = tl.max(s, 1) * row_scale        # earlier blocks only: every key visible
        key = tl.where((j < local) & (m != float("-inf")), pack(m, j), EMPTY)
        tl.store(lists + jj, key, mask=rmask)
        if not RANK:
            first = tl.where(jj == 0, key, first)
            at = tl.where(key > best, jj, at)
            best = tl.maximum(best, key)
    if not RANK:        # the largest key first (over the loop's stores: after a barrier)
        tl.debug_barrier()
        tl.store(lists + at, first, mask=rmask)
        tl.store(lists, best, mask=rmask)
    else:        # the chunk's keys back from global memory (this program's own stores)
        tl.debug_barrier()
        offs_p = tl.arange(0, PAGES)
        keys = tl.load(lists[:, None] + offs_p[None, :], mask=rmask[:, None], other=EMPTY)
        offs_k = tl.arange(0, KR)
        ranked = tl.full((ROWS, KR), EMPTY, dtype=tl.int64)
        for r in range(KR):             # keys are distinct: each round removes one
            best = tl.max(keys, 1)
            ranked = tl.where(offs_k[None, :] == r, best[:, None], ranked)
            keys = tl.where(keys == best[:, None], EMPTY, keys)
        tl.debug_barrier()
        tl.store(lists[:, None] + offs_k[None, :], ranked, mask=rmask[:, None])


@triton.jit
def top_keys(LISTS, n_lists, LS: tl.constexpr, KR: tl.constexpr, NL_PAD: tl.constexpr,
             K_PAD: tl.constexpr):
    """The ``K_PAD`` largest keys ``[K_PAD]`` int64 (descending, ``EMPTY`` padded) of
    ``n_lists`` lists ``LS`` apart from ``LISTS``: each of one key (``KR == 1``), the
    best ``KR`` of a chunk or the whole chunk (``KR == LS``), its largest key first
    (list ``p`` holds blocks of chunk ``p``, ``p = id // LS``); the first ``K`` of them
    are exact when ``KR >= min(K, LS)``. The best ``K`` keys
    lie in the lists of the ``K`` largest heads (any other list's keys have that many
    distinct keys above them), so two sorting networks (``tl.topk``) find them: over the
    heads, then over those lists' keys."""
    NH: tl.constexpr = NL_PAD if NL_PAD > K_PAD else K_PAD
    offs_h = tl.arange(0, NH)
    top = tl.topk(tl.load(LISTS + offs_h * LS, mask=offs_h < n_lists, other=EMPTY), K_PAD)
    if KR > 1:
        live = top != EMPTY
        first = tl.where(live, block_id(top) // LS * LS, 0)
        offs_r = tl.arange(0, KR)
        keys = tl.load(LISTS + first[:, None] + offs_r[None, :], mask=live[:, None],
                       other=EMPTY)
        top = tl.topk(tl.reshape(keys, (K_PAD * KR,)), K_PAD)
    return top


@triton.jit
def merge_lists(LISTS, n_lists, local, LS: tl.constexpr, KR: tl.constexpr,
                NL_PAD: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                CG: tl.constexpr):
    """The top-k row ``[TOPK_PAD]`` int32 (``-1`` past ``TOPK``) from ``n_lists`` lists of
    ``KR`` keys (``top_keys``), ``LS`` apart from ``LISTS``, and the local block ``local``
    (``CG``: lists of one key loaded past L1, where other programs of the grid wrote
    them)."""
    offs_k = tl.arange(0, TOPK_PAD)
    if KR == 1:         # lists of one key (a block each): k - 1 rounds of a max (faster
        # here than a sorting network over thousands of blocks)
        offs_l = tl.arange(0, NL_PAD)
        key = tl.load(LISTS + offs_l * LS, mask=offs_l < n_lists, other=EMPTY,
                      cache_modifier=".cg" if CG else "")
        ranked = tl.full((TOPK_PAD,), -1, dtype=tl.int32)
        for r in range(TOPK - 1):
            best = tl.max(key, 0)
            ranked = tl.where(offs_k == r, block_id(best), ranked)
            key = tl.where(key == best, EMPTY, key)
    else:
        ranked = block_id(top_keys(LISTS, n_lists, LS, KR, NL_PAD, TOPK_PAD))
    n_ranked = tl.minimum(local, TOPK - 1)
    return tl.where(offs_k == n_ranked, local, tl.where(offs_k > n_ranked, -1, ranked))


@triton.jit
def paged_merge_kernel(CAND, SEQ_LENS, TOPK_INDICES, n_lists, stride_cc, stride_ch,
                       stride_th, stride_tq, NQ: tl.constexpr, BS: tl.constexpr,
                       LS: tl.constexpr, KR: tl.constexpr, NL_PAD: tl.constexpr,
                       TOPK: tl.constexpr, TOPK_PAD: tl.constexpr):
    """The top-k row of (query row ``c``, index head ``h``)."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    local = (tl.load(SEQ_LENS + c // NQ) - NQ + (c % NQ)) // BS
    row = merge_lists(CAND + c * stride_cc + h * stride_ch, n_lists, local, LS, KR, NL_PAD,
                      TOPK, TOPK_PAD, False)
    offs_k = tl.arange(0, TOPK_PAD)
    tl.store(TOPK_INDICES + h * stride_th + c * stride_tq + offs_k, row, mask=offs_k < TOPK)


def unpack(candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``pack`` keys (int64) -> ``(block max fp32, block id int64)``; ``EMPTY`` gives
    ``(nan, -1)`` (for tests and inspection)."""
    ordered = (candidates >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    empty = candidates == torch.iinfo(torch.int64).min
    score = torch.where(empty, float("nan"), bits.view(torch.float32))
    return score, torch.where(empty, -1, 0x7FFFFFFF - (candidates & 0x7FFFFFFF))


def rank_in_scan(rows: int) -> bool:
    """Whether the scan ranks its chunks: when ``rows`` (query rows x index heads) are
    few, so that the programs have time to spare and the lists can be short (the decode
    attention then splits its blocks over programs and merges them itself,
    ``decode_splits``); else each list is its whole chunk, the largest key first."""
    return rows * 2 <= TARGET_PROGRAMS


def scan_chunks(rows: int, batch: int, max_pages: int, topk: int,
                pages_per_program: int = None, kernel: str = "triton"
                ) -> Tuple[int, int, int, int]:
    """``(pages, ls, n_lists, kr)``: pages per scan program (enough programs for about two
    waves; a power of two, at most 16, or ``MAX_PAGES`` for the Gluon scan where it ranks
    its chunks into lists shorter than that and the pages then fill one wave of programs:
    one long request, a wave instead of two and half the lists to merge, faster at 1M x 1
    and slower over many requests, docs/experiments.md), and the lists the merge reads per
    row: ``n_lists`` of ``kr`` keys, ``ls`` apart (one per chunk: its ranked best when the
    scan ranks them, else the whole chunk)."""
    long_chunks = (kernel == "gluon" and rank_in_scan(rows) and
                   ranked_keys(topk, MAX_PAGES) < MAX_PAGES and
                   batch * max_pages <= MAX_PAGES * TARGET_PROGRAMS)
    cap = MAX_PAGES if long_chunks else 16
    per = pages_per_program or \
        max(1, min(cap, next_pow2(-(-batch * max_pages // TARGET_PROGRAMS))))
    kr = ranked_keys(topk, per) if rank_in_scan(rows) else per
    return per, per, triton.cdiv(max_pages, per), kr


def ranked_keys(topk: int, chunk: int) -> int:
    """Keys of a ranked list of a chunk of ``chunk`` blocks, enough for the top-k merge
    (``top_keys``): the chunk's best ``topk - 1``, a power of two, or the whole chunk."""
    return min(next_pow2(topk - 1), chunk)


def scan_kernel(qi, ki, ki_strides, block_size: int, num_q: int) -> str:
    """The kernel of ``paged_scan``: ``"gluon"`` (``msa.ops.decode.gluon_scan``: Hopper,
    e4m3, int4 or bf16 index keys, at most 64 query rows per request, 32 over int4 keys)
    where it applies, else
    ``"triton"`` (``paged_scan_kernel``); ``MSA_DECODE_KERNEL=triton`` in the environment
    keeps the Triton kernel."""
    from ..attention.forward import choose_kernel
    return choose_kernel("MSA_DECODE_KERNEL", "msa.ops.decode.gluon_scan", qi, ki, ki_strides,
                         block_size, num_q)


def candidates_width(max_pages: int, pages_per_program: int = None) -> int:
    """Last dim of the candidates buffer ``[B*Q, Hi, width]`` int64 any batch needs
    (``max_pages`` rounded up to whole chunks: of the default at most ``MAX_PAGES`` pages,
    or of ``pages_per_program``)."""
    per = max(MAX_PAGES, pages_per_program or MAX_PAGES)
    return -(-max_pages // per) * per


def paged_scan(qi, ki, ki_table, seq_lens, candidates, *, batch: int, num_q: int,
               max_pages: int, topk: int, block_size: int, index_scale: float,
               ki_strides=None, mask_tail: bool = False, pages_per_program: int = None,
               index_stages: int = None, ki_scales=None) -> Tuple[int, int, int]:
    """Launch the scan into ``candidates [B*Q, Hi, >= max_pages rounded up to the chunk]``
    int64; returns the lists ``(ls, n_lists, kr)`` for the merge (``scan_chunks``).
    Arguments as ``msa.ops.decode.triton.paged_decode``."""
    b, nq, hi = batch, num_q, qi.shape[1]
    ki_strides = ki_strides or (ki.stride(0), ki.stride(1))
    kernel = scan_kernel(qi, ki, ki_strides, block_size, nq)
    per, ls, n_lists, kr = scan_chunks(b * nq * hi, b, max_pages, topk, pages_per_program,
                                       kernel)
    chunks = triton.cdiv(max_pages, per)
    if candidates.dtype != torch.int64 or candidates.shape[2] < chunks * per or \
            candidates.stride(2) != 1:
        raise ValueError(f"candidates must be int64 with a contiguous last dim of >= "
                         f"{chunks * per}, got {tuple(candidates.shape)} {candidates.dtype}")
    rank = kr < per         # a ranked list as long as its chunk would keep every key
    int4 = ki.dtype == torch.uint8
    if kernel == "gluon":
        from . import gluon_scan
        gluon_scan.launch(qi, ki, ki_scales, ki_table, seq_lens, candidates, grid=(b, chunks),
                          num_q=nq, index_scale=index_scale, ki_strides=ki_strides,
                          pages=per, kr=kr, rank=rank, stages=index_stages)
        return ls, n_lists, kr
    paged_scan_kernel[(b, chunks)](
        qi, ki, ki_scales, ki_table, seq_lens, candidates, index_scale, max_pages,
        qi.stride(0), qi.stride(1), ki_strides[0], ki_strides[1],
        ki_table.stride(0), candidates.stride(0), candidates.stride(1),
        NQ=nq, HI=hi, ROWS=max(16, next_pow2(nq * hi)), DI=qi.shape[-1],
        BS=block_size, PAGES=per, KR=kr, PRECISION=precision(qi.dtype),
        UPCAST=upcast(qi.dtype), RANK=rank, MASK_TAIL=mask_tail,
        FP8=ki_scales is not None and not int4, INT4=int4, num_warps=4,
        # Triton 3.6 keeps one page in flight at 2-4 stages, two at 5-6: two pay over
        # e4m3 pages, not over bf16 ones (their 70 KB cost programs per SM)
        num_stages=index_stages or (3 if ki_scales is None else 5))
    return ls, n_lists, kr


def paged_select(qi, ki, ki_table, seq_lens, *, batch: int, num_q: int, max_pages: int,
                 candidates, topk_indices, block_size: int, index_scale: float,
                 ki_strides=None, mask_tail: bool = False, pages_per_program: int = None,
                 index_stages: int = None, ki_scales=None) -> None:
    """The selection of a decode step alone: ``topk_indices [Hi, B*Q, K]`` int32 (any
    strides with a contiguous last dim), through ``candidates`` (``paged_scan``)."""
    topk = topk_indices.shape[2]
    lists = paged_scan(
        qi, ki, ki_table, seq_lens, candidates, batch=batch, num_q=num_q,
        max_pages=max_pages, topk=topk, block_size=block_size, index_scale=index_scale,
        ki_strides=ki_strides, mask_tail=mask_tail, pages_per_program=pages_per_program,
        index_stages=index_stages, ki_scales=ki_scales)
    paged_merge(candidates, seq_lens, topk_indices, lists, num_q=num_q,
                block_size=block_size)


def paged_merge(candidates, seq_lens, topk_indices, lists, *, num_q: int,
                block_size: int) -> None:
    """``topk_indices [Hi, rows, K]`` from the scan's ``lists = (ls, n_lists, kr)``."""
    ls, n_lists, kr = lists
    hi, rows, topk = topk_indices.shape
    paged_merge_kernel[(rows, hi)](
        candidates, seq_lens, topk_indices, n_lists, candidates.stride(0),
        candidates.stride(1), topk_indices.stride(0), topk_indices.stride(1),
        NQ=num_q, BS=block_size, LS=ls, KR=kr, NL_PAD=next_pow2(n_lists), TOPK=topk,
        TOPK_PAD=next_pow2(topk), num_warps=2 if kr > 1 else 8 if n_lists > 4096 else 4)
