"""FP8 index scan in two passes: block maxima in fp16, then the selection.

The one-pass scan (``msa.ops.indexer.triton.indexer_topk_kernel``) keeps each row's best
blocks in registers while it scores; that bookkeeping, not the MMA, bounds it
(docs/fp8_index.md). Here the scoring kernel keeps nothing:

* ``key_blocks``: the index keys quantized with one scale per key block (each block of
  every segment; blocks start at the segment's key base), laid out in whole blocks.
* ``block_max_kernel``: one program per query tile (``BLOCK_T`` queries x ``Hi`` index
  heads = ``ROWS`` rows, ``msa.ops.geometry.query_tiles``); per earlier key block one e4m3
  MMA accumulating in fp16, the max over the block's keys times the block's scale (fp16;
  rounding is monotone, so this is the max of the keys' scaled scores), stored to
  ``MAXB [block, row]`` (a chunk of tiles at a time, so the buffer is bounded). The
  operands are quantized to ``|x| <= fp16_bound(Di)`` so that no sum of ``Di`` products
  overflows fp16, and the block scales are divided by their maximum (a positive factor
  common to a row's scores ranks nothing). A scale per key instead would cost one fp16
  multiply per score (measured in docs/fp8_index.md).
* ``select_kernel``: per row the ``nrank`` best stored maxima of the blocks before the
  row's local block (score desc, id asc; NaN as the most negative fp16, -0 as +0),
  written as the one-pass scan writes them (ranked ids, the local block, then -1). Each
  block is a 32-bit key (the fp16 score's order bits, then the inverted block id), so
  keys are distinct and the largest keys are the answer. The blocks before the tile's
  first local block come in whole groups of ``GROUP`` with their maximum (stored by
  ``block_max_kernel``), which bounds each group's best key from below (with the group's
  last id) and above (its first id); the blocks after them, the tail, are read one by
  one. A threshold ``tau`` no larger than the ``nrank``-th key: the ``nrank``-th largest
  of ``BC`` bucket maxima of the groups' lower bounds and the tail's keys (each a
  distinct block's key or below it). The groups whose upper bound reaches ``tau`` are
  listed (at most ``CAP``; a program with a row over that reads every block instead),
  and the keys >= ``tau`` of their blocks and the tail's are compacted (``cumsum``) into
  ``CAP`` slots and sorted; a row with more than ``CAP`` of them raises ``tau`` to the
  ``nrank``-th largest of its first ``CAP`` (still no larger than the answer's last
  key, and at least ``CAP - nrank`` keys fewer pass) and compacts again. Programs take
  ``SELECT_ROWS`` rows of a tile.

The ranking differs from the one-pass FP8 scan's (fp32 sums, a scale per key) only by
quantization and rounding, on near-ties; the scan proposes candidates, which the inputs'
scores then decide (docs/semantics.md, "FP8 index scoring"). Block ids must stay below
``2^16 - 1`` (``supported``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...varlen import Segments, host_to_device
from ..geometry import query_tiles
from ..quant import E4M3, quantize_e4m3

MIN_KEY = tl.constexpr(-2 ** 31)        # no block (past the row's local block, padding)
MAX_BLOCKS = tl.constexpr(2 ** 16 - 1)  # block ids fit the low 16 bits of a key
BUDGET = 4 << 30        # bytes of block maxima per chunk of tiles, at most 1/16 of the GPU
SELECT_ROWS = 16                        # rows per program of the selection
GROUP = 8                               # blocks per group maximum


def fp16_bound(di: int) -> float:
    """Largest ``b`` with ``di * b^2 <= 65504`` (capped at e4m3's 448): ``|q|, |k| <= b``
    keeps every sum of ``di`` products finite in fp16."""
    return min(448.0, math.floor(math.sqrt(65504.0 / di)))


@triton.jit
def block_max_kernel(QI, KI, KS, TILE_Q0, TILE_N, TILE_KBASE, TILE_OFF, MAXB, MAXG,
                     stride_qt, stride_qh, stride_kt, stride_mb,
                     HI: tl.constexpr, DI: tl.constexpr, BS: tl.constexpr,
                     BLOCK_T: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """Tile ``pid`` of the chunk: ``MAXB[blk, pid * ROWS + r] = max_key (q8_r . k8_key) *
    KS[kbase / BS + blk]`` (fp16) for each key block ``blk`` before the tile's last local
    block (``ROWS``: ``BLOCK_T * HI`` rounded up to a power of two, the rows past it
    unused; ``kbase`` a multiple of ``BS``), and ``MAXG[g, ..]``: the largest of
    ``MAXB[g * GROUP .. g * GROUP + GROUP - 1, ..]`` (NaN as -65504, as it ranks) for each
    whole group ``g`` of computed blocks."""
    pid = tl.program_id(0)
    q0 = tl.load(TILE_Q0 + pid).to(tl.int64)
    n = tl.load(TILE_N + pid)
    kbase = tl.load(TILE_KBASE + pid).to(tl.int64)
    off = tl.load(TILE_OFF + pid)
    offs_m = tl.arange(0, ROWS)
    tok = offs_m // HI
    h = offs_m % HI
    rmask = (tok < n) & (offs_m < BLOCK_T * HI)
    qi = tl.load(QI + (q0 + tok)[:, None] * stride_qt + h[:, None] * stride_qh
                 + tl.arange(0, DI)[None, :], mask=rmask[:, None], other=0.0)
    offs_n = tl.arange(0, BS)
    col = pid.to(tl.int64) * ROWS + offs_m
    n_blocks = (off + n - 1) // BS
    none = tl.full((ROWS,), float("-inf"), tl.float32)
    gmax = none
    for blk in range(0, n_blocks):
        kt = tl.load(KI + (kbase + blk * BS + offs_n)[:, None] * stride_kt
                     + tl.arange(0, DI)[None, :])
        s = tl.dot(qi, tl.trans(kt), out_dtype=tl.float16)
        m = tl.max(s, 1) * tl.load(KS + kbase // BS + blk)
        tl.store(MAXB + blk * stride_mb + col, m)
        gmax = tl.maximum(gmax, tl.where(m != m, -65504.0, m.to(tl.float32)))
        if blk % GROUP == GROUP - 1:
            tl.store(MAXG + (blk // GROUP) * stride_mb + col, gmax.to(tl.float16))
            gmax = none


@triton.jit
def _order16(v):
    """fp16 -> int32 ordered as the values, with ``rank_key``'s conventions: -0 as +0,
    NaN as the most negative finite fp16 (-65504)."""
    b = v.to(tl.int16, bitcast=True).to(tl.int32)
    k = b ^ ((b >> 15) & 0x7FFF)
    k = tl.where(k == -1, 0, k)
    return tl.where(v != v, -31744, k)


@triton.jit
def _keys(MAXB, blk, col, stride_mb, local):
    """32-bit ranking keys of the stored maxima ``MAXB[blk, col]`` of the blocks before
    ``local``: the fp16 score's order (``_order16``) above the inverted block id, so keys
    are distinct; ``MIN_KEY`` for the other blocks."""
    valid = blk < local
    v = tl.load(MAXB + blk * stride_mb + col, mask=valid, other=0.0)
    return tl.where(valid, (_order16(v) << 16) | (MAX_BLOCKS - blk), MIN_KEY)


@triton.jit
def _kth_largest(x, K: tl.constexpr):
    """Per row of ``x [R, W]`` int32 the largest ``v`` with at least ``K`` entries ``>= v``
    (the ``K``-th largest entry; ``MIN_KEY`` when fewer than ``K`` entries exceed it),
    built bit by bit from the sign down."""
    v = tl.where(tl.sum((x >= 0).to(tl.int32), 1) >= K, 0, MIN_KEY)
    for b in tl.static_range(30, -1, -1):
        c = v | (1 << b)
        v = tl.where(tl.sum((x >= c[:, None]).to(tl.int32), 1) >= K, c, v)
    return v


@triton.jit
def _group_keys(MAXG, g, col, stride_mb, ng, first: tl.constexpr, GROUP: tl.constexpr):
    """Bounds on the best key of each whole group ``g < ng`` of blocks from its maximum
    ``MAXG[g, col]``: the largest block id of the group (``first=False``: a lower bound)
    or its smallest (``first=True``: an upper bound) under the maximum's order;
    ``MIN_KEY`` for ``g >= ng``."""
    valid = g < ng
    v = tl.load(MAXG + g * stride_mb + col, mask=valid, other=0.0)
    blk = g * GROUP + (0 if first else GROUP - 1)
    return tl.where(valid, (_order16(v) << 16) | (MAX_BLOCKS - blk), MIN_KEY)


@triton.jit
def _compact(MAXB, BUF, blk, col, stride_mb, local, tau, cnt, CAP: tl.constexpr):
    """Appends the keys ``>= tau`` of blocks ``blk [RS, BC]`` (those before ``local``) to
    each row's slots ``BUF[col, cnt ..]`` (at most ``CAP``); returns the new counts."""
    key = _keys(MAXB, blk, col[:, None], stride_mb, local[:, None])
    keep = (key >= tau[:, None]) & (key > MIN_KEY)
    at = cnt[:, None] + tl.cumsum(keep.to(tl.int32), 1) - 1
    tl.store(BUF + col[:, None] * CAP + at, key, mask=keep & (at < CAP))
    return cnt + tl.sum(keep.to(tl.int32), 1)


@triton.jit
def select_kernel(MAXB, MAXG, BUF, GBUF, OUT_ID, TILE_Q0, TILE_N, TILE_OFF, stride_mb,
                  stride_oh, stride_ot, HI: tl.constexpr, BS: tl.constexpr,
                  BLOCK_T: tl.constexpr, ROWS: tl.constexpr, RS: tl.constexpr,
                  NRANK: tl.constexpr, BC: tl.constexpr, CAP: tl.constexpr,
                  GROUP: tl.constexpr, KP2: tl.constexpr):
    """Rows ``RS * (pid % S) ..`` of tile ``pid // S`` of the chunk (``S = ROWS // RS``):
    each row's ``NRANK`` best blocks before its local block from ``MAXB`` and ``MAXG``
    (``block_max_kernel``), written to ``OUT_ID`` (pre-filled with -1); ``BUF [rows,
    CAP]`` and ``GBUF [rows, CAP]`` int32 scratch; ``KP2``: ``NRANK`` rounded up to a
    power of two, at most ``BC``. Whole groups of ``GROUP`` blocks before
    the tile's first local block are read through their maxima; the blocks after them
    (the tail) one by one."""
    pid = tl.program_id(0)
    t = pid // (ROWS // RS)
    q0 = tl.load(TILE_Q0 + t).to(tl.int64)
    n = tl.load(TILE_N + t)
    off = tl.load(TILE_OFF + t)
    r = (pid % (ROWS // RS)) * RS + tl.arange(0, RS)
    tok = r // HI
    h = r % HI
    rmask = (tok < n) & (r < BLOCK_T * HI)
    local = tl.where(rmask, (off + tok) // BS, 0)
    col = t.to(tl.int64) * ROWS + r
    n_blocks = (off + n - 1) // BS
    ng = tl.where(rmask, (off // BS) // GROUP, 0)        # whole groups before every row's
    tail = ((off // BS) // GROUP) * GROUP                # local block
    cols = tl.arange(0, BC)
    # tau: the NRANK-th largest bucket maximum of the groups' lower bounds and the tail's
    # keys (each a distinct block's key or below it); MIN_KEY with fewer than NRANK
    bmax = tl.full((RS, BC), MIN_KEY, tl.int32)
    for c0 in range(0, tail // GROUP, BC):
        bmax = tl.maximum(bmax, _group_keys(MAXG, c0 + cols[None, :], col[:, None],
                                            stride_mb, ng[:, None], False, GROUP))
    for c0 in range(tail, n_blocks, BC):
        bmax = tl.maximum(bmax, _keys(MAXB, c0 + cols[None, :], col[:, None], stride_mb,
                                      local[:, None]))
    top = tl.topk(bmax, KP2)                 # sorted, descending
    tau = tl.max(tl.where(tl.arange(0, KP2)[None, :] == NRANK - 1, top, MIN_KEY), 1)
    # the groups whose upper bound reaches tau hold every key >= tau before the tail
    gcnt = tl.zeros((RS,), tl.int32)
    for c0 in range(0, tail // GROUP, BC):
        g = c0 + cols[None, :]
        ub = _group_keys(MAXG, g, col[:, None], stride_mb, ng[:, None], True, GROUP)
        keep = (ub >= tau[:, None]) & (ub > MIN_KEY)
        at = gcnt[:, None] + tl.cumsum(keep.to(tl.int32), 1) - 1
        tl.store(GBUF + col[:, None] * CAP + at, g, mask=keep & (at < CAP))
        gcnt += tl.sum(keep.to(tl.int32), 1)
    # a row with more than CAP such groups: every program's row reads all blocks instead
    grouped = tl.max(gcnt, 0) <= CAP
    gspan = tl.where(grouped, tl.max(gcnt, 0) * GROUP, 0)
    slots = tl.arange(0, CAP)
    cand = tl.full((RS, CAP), MIN_KEY, tl.int32)
    over = tl.full([], 1, tl.int32)
    while over > 0:
        tl.debug_barrier()                  # GBUF written, the last round's BUF reads done
        cnt = tl.zeros((RS,), tl.int32)
        for c0 in range(0, gspan, BC):      # the blocks of the listed groups
            i = c0 + cols[None, :]
            g = tl.load(GBUF + col[:, None] * CAP + i // GROUP,
                        mask=i // GROUP < gcnt[:, None], other=0, cache_modifier=".cg")
            blk = tl.where(i // GROUP < gcnt[:, None], g * GROUP + i % GROUP, MAX_BLOCKS)
            cnt = _compact(MAXB, BUF, blk, col, stride_mb, local, tau, cnt, CAP)
        for c0 in range(0, tl.where(grouped, 0, tail), BC):     # or all of them
            blk = c0 + cols[None, :] + tl.zeros((RS, BC), tl.int32)
            cnt = _compact(MAXB, BUF, tl.where(blk < tail, blk, MAX_BLOCKS), col,
                           stride_mb, local, tau, cnt, CAP)
        for c0 in range(tail, n_blocks, BC):
            cnt = _compact(MAXB, BUF, c0 + cols[None, :] + tl.zeros((RS, BC), tl.int32),
                           col, stride_mb, local, tau, cnt, CAP)
        tl.debug_barrier()                  # BUF written by other threads of the program
        cand = tl.load(BUF + col[:, None] * CAP + slots[None, :],
                       mask=slots[None, :] < cnt[:, None], other=MIN_KEY, cache_modifier=".cg")
        tight = (cnt > CAP) & rmask
        # any CAP distinct keys >= tau: their NRANK-th largest is > tau and <= the answer's
        tau = tl.where(tight, _kth_largest(cand, NRANK), tau)
        over = tl.max(tight.to(tl.int32), 0)
    cand = tl.sort(cand, 1, descending=True)     # keys are distinct: sorted = ranked
    orow = h.to(tl.int64) * stride_oh + (q0 + tok) * stride_ot
    tl.store(OUT_ID + orow[:, None] + slots[None, :], MAX_BLOCKS - (cand & 0xFFFF),
             mask=rmask[:, None] & (slots[None, :] < NRANK) & (cand > MIN_KEY))
    tl.store(OUT_ID + orow + tl.minimum(local, NRANK), local, mask=rmask)


def supported(seg, block_size: int) -> bool:
    """Whether the two-pass scan ranks these segments: block ids below ``MAX_BLOCKS``."""
    return max(seg.k_len, default=0) // block_size < MAX_BLOCKS.value


def tile_rows(block_t: int, hi: int) -> int:
    """Rows a tile takes in the block maxima: ``block_t * hi`` rounded up to a power of
    two (Triton's ranges)."""
    return triton.next_power_of_2(block_t * hi)


def _chunks(nblk, rows: int, budget: int):
    """Consecutive tile ranges ``(t0, t1)`` of tiles sorted heaviest first (``nblk``:
    earlier key blocks per tile) whose block maxima (fp16, ``rows`` per tile) fit
    ``budget`` bytes (one tile at least)."""
    t0 = 0
    while t0 < len(nblk):
        t1 = min(len(nblk), t0 + max(1, budget // (2 * rows * max(nblk[t0], 1))))
        yield t0, t1
        t0 = t1


def key_blocks(ki: torch.Tensor, seg: Segments, block_size: int, bound: float):
    """Index keys ``ki [total_k, Di]`` in e4m3 with one scale per key block:
    ``(k8 [blocks * block_size, Di], ks16 [blocks], seg)``. Each distinct key base's keys
    (``k_base .. k_base + the longest k_len on it``) are copied to whole blocks, zero
    padded, so that segments whose key ranges overlap at different block offsets (chained
    fragments) still see one block layout per base; the returned ``seg`` has its key bases
    moved to the copies. A block's scale is ``max|k| / bound`` over its keys (``k8`` within
    ``bound``); ``ks16`` is the scales divided by the largest, in fp16, 0 for all-zero and
    non-finite blocks."""
    bs, di = block_size, ki.shape[-1]
    extent = {}
    for base, kl in zip(seg.k_base, seg.k_len):
        extent[base] = max(extent.get(base, 0), kl)
    bases = sorted(extent)
    nblocks = [-(-extent[b] // bs) for b in bases]
    starts = [0]
    for n in nblocks[:-1]:
        starts.append(starts[-1] + n * bs)
    moved = dict(zip(bases, starts))
    total = sum(nblocks) * bs
    out = Segments(seg.q_start, seg.q_len, [moved[b] for b in seg.k_base], seg.k_len,
                   seg.total_q, total)
    if not total:
        return ki.new_zeros(0, di, dtype=E4M3), ki.new_zeros(0, dtype=torch.float16), out
    base, ext, start, nblk = host_to_device([bases, [extent[b] for b in bases], starts,
                                             nblocks], ki.device).unbind(0)
    run = torch.repeat_interleave(torch.arange(len(bases), device=ki.device), nblk * bs,
                                  output_size=total)
    r = torch.arange(total, device=ki.device) - start[run]
    src = (base[run] + r).clamp(max=max(ki.shape[0] - 1, 0))
    kb = torch.where((r < ext[run])[:, None], ki[src].float(), 0.0).view(-1, bs * di)
    k8, scale = quantize_e4m3(kb, bound)                 # a block as one row
    amax = kb.abs().amax(-1)
    ks = torch.where(torch.isfinite(amax) & (amax > 0), scale, torch.zeros_like(scale))
    ks16 = (ks / ks.amax().clamp_min(torch.finfo(torch.float32).tiny)).half()
    return k8.view(total, di), ks16, out


def block_maxima(q8, k8, ks16, tiles, maxb, maxg, *, block_size: int, block_t: int,
                 num_warps: int = 4, num_stages: int = 2) -> int:
    """``block_max_kernel`` over ``tiles`` (``query_tiles`` rows, heaviest first) into
    ``maxb`` (fp16, at least ``blocks of tiles[0] x tiles x rows``) and ``maxg`` (group
    maxima, ``GROUP`` times fewer blocks): ``q8 [total_q, Hi, Di]`` e4m3 within
    ``fp16_bound(Di)``, ``k8, ks16`` from ``key_blocks`` (tiles of its segments). Returns
    the block stride of ``maxb`` and ``maxg`` (rows of the chunk)."""
    hi, di = q8.shape[1], q8.shape[2]
    stride_mb = tiles[0].numel() * tile_rows(block_t, hi)
    if tiles[0].numel():
        block_max_kernel[(tiles[0].numel(),)](
            q8, k8, ks16, *tiles, maxb, maxg, q8.stride(0), q8.stride(1), k8.stride(0),
            stride_mb, HI=hi, DI=di, BS=block_size, BLOCK_T=block_t,
            ROWS=tile_rows(block_t, hi), GROUP=GROUP, num_warps=num_warps,
            num_stages=num_stages)
    return stride_mb


def select(maxb, maxg, stride_mb: int, tiles, out, *, block_size: int, block_t: int,
           buf: torch.Tensor = None) -> torch.Tensor:
    """``select_kernel``: rows of ``out [Hi, total_q, topk]`` (pre-filled with -1) from
    the block and group maxima ``maxb``, ``maxg`` of ``tiles`` (``block_maxima``);
    ``buf`` int32 scratch of at least ``2 x tiles x rows x cap`` entries (allocated when
    not given; returned)."""
    hi, nrank = out.shape[0], out.shape[2] - 1
    bc = max(64, triton.next_power_of_2(nrank))
    cap = max(64, 2 * triton.next_power_of_2(nrank + 1))
    rows = tiles[0].numel() * tile_rows(block_t, hi)
    if buf is None or buf.numel() < 2 * rows * cap:
        buf = torch.empty(2 * rows * cap, dtype=torch.int32, device=out.device)
    rs = min(SELECT_ROWS, tile_rows(block_t, hi))
    if rows:
        select_kernel[(rows // rs,)](
            maxb, maxg, buf, buf[rows * cap:], out, tiles[0], tiles[1], tiles[3], stride_mb,
            out.stride(0), out.stride(1), HI=hi, BS=block_size, BLOCK_T=block_t,
            ROWS=tile_rows(block_t, hi), RS=rs, NRANK=nrank, BC=bc, CAP=cap, GROUP=GROUP,
            KP2=triton.next_power_of_2(nrank), num_warps=4)
    return buf


def scan_topk_two_pass(qi, ki, seg, *, block_size: int, topk: int, block_t: int,
                       budget: int = None, num_warps: int = 4,
                       num_stages: int = 2) -> torch.Tensor:
    """Rows ``[Hi, total_q, topk]`` int32 of the FP8 scan (the one-pass scan's contract):
    ``qi [total_q, Hi, Di]``, ``ki [total_k, Di]`` (one shared head), tiles of ``block_t``
    queries, ``topk >= 2``, at most ``budget`` bytes of block maxima at a time (one tile
    at least; default ``BUDGET``, at most 1/16 of the GPU's memory)."""
    total_q, hi, di = qi.shape
    rows = tile_rows(block_t, hi)
    bound = fp16_bound(di)
    q8 = quantize_e4m3(qi, bound)[0]
    k8, ks16, seg = key_blocks(ki, seg, block_size, bound)
    out = torch.full((hi, total_q, topk), -1, dtype=torch.int32, device=qi.device)
    host = query_tiles(seg, block_t, "cpu")
    if not host[0].numel():
        return out
    tiles = [t.to(qi.device) for t in host]
    nblk = ((host[3] + host[1] - 1) // block_size).tolist()       # heaviest first
    if budget is None:
        budget = BUDGET
        if qi.is_cuda:
            budget = min(budget, torch.cuda.get_device_properties(qi.device).total_memory // 16)
    chunks = list(_chunks(nblk, rows, budget))
    size = max(max(nblk[a], 1) * (b - a) * rows for a, b in chunks)
    maxb = torch.empty(size, dtype=torch.float16, device=qi.device)
    maxg = torch.empty(-(-size // GROUP), dtype=torch.float16, device=qi.device)
    buf = None
    for t0, t1 in chunks:
        part = [t[t0:t1] for t in tiles]
        stride_mb = block_maxima(q8, k8, ks16, part, maxb, maxg, block_size=block_size,
                                 block_t=block_t, num_warps=num_warps, num_stages=num_stages)
        buf = select(maxb, maxg, stride_mb, part, out, block_size=block_size,
                     block_t=block_t, buf=buf)
    return out
