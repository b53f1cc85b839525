"""Gluon decode index scan for Hopper (sm_90): ``paged_scan_kernel``.

Same contract as ``msa.ops.decode.select.paged_scan_kernel`` over index-key pages, e4m3
with fp32 key scales (``FP8``), packed int4 with fp16 group scales (``INT4``: int8 wgmmas
per group of 32 dims with the keys unpacked in registers, ``_int4_scores``; at most 32
query rows) or bf16: grid (request, page chunk), one int64 ``pack``
key per (query row, index head, block) into the chunk's list, the chunk's largest first;
or (``RANK``) the chunk's best ``KR`` keys, the largest first and the rest in no order
(all the merge, ``top_keys``, reads), kept in registers while the pages stream (each key
takes the place of its row's least when above it), so the list is written once at the
end with no pass over stored keys. The ``tl.*`` kernel's tile has ``Q x Hi`` rows (4
at one decode token), too few for Hopper's wgmma, so Triton lowers its product to
``mma.sync`` with the pages loaded by plain loads; over e4m3 keys sm_90 runs that through
fp16 MMAs after converting every key byte, and with several decode tokens that scan takes
longer than reading its bytes (docs/benchmarks.md). Here:

* the request's query rows are one wgmma operand in shared memory (``rows_padded``: 8,
  16, 32 or 64 rows; ``Q x Hi <= 64``), over e4m3 keys quantized by the ``tl.*`` kernel's
  rule;
* each page of 128 keys arrives by TMA into a ring of ``STAGES`` slots, e4m3 key scales
  by ``cp.async`` beside it, ``STAGES - 1`` pages ahead of the one scored; one mbarrier
  per slot tracks both (the copy's bytes and every thread's ``cp.async``), so one wait
  and one barrier per page order the ring; page ids are loaded two pages before their
  copy is issued;
* one wgmma per page with fp32 accumulators: up to 32 query rows ``S^T = K Q^T``
  (the keys as the MMA's rows, a few scores per thread; each warp stores its maxima over
  its own keys in shared memory before the page's barrier, and every row's block max is
  the max of the four after it; over whole chunks (no ranking), the maxima of every page
  stay there and the keys and the list come once per chunk), else
  ``S = Q K^T`` (64 rows: the max within lane quads); the key scales (e4m3) before the
  max, then each row's ``pack`` key.

The first page ids are loaded beside the request's length, not after it. Only the pages
before the last query's own block are read: no row ranks a later block
(the local one comes last, docs/semantics.md), so no page past a request's last token is
read either. Hopper's e4m3 tensor cores add the products with about 13 fractional bits,
not fp32's 24 (as Triton's own e4m3 MMA does from 64 rows up): near-equal block maxima
may rank either way (docs/semantics.md, tests/ops/decode/test_gluon_scan.py). Over
bf16 keys the sums are fp32's, in the tensor cores' order.
"""
from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.ampere.async_copy import mbarrier_arrive
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                               warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..launch import on_hopper
from .gluon import tma_rows

BS = gl.constexpr(128)          # keys per page (block)
DI = gl.constexpr(128)          # index head dim
MAX_ROWS = 64                   # query rows (Q x Hi) per request at most
WARPS = gl.constexpr(4)
# ring slots (pages in flight per program) by key bytes: 3 e4m3 pages (48 KB), 2 bf16 ones
# (64 KB: three programs per SM; faster than 3 or 4 slots, docs/experiments.md)
STAGES = {1: 3, 2: 2}
INT4_STAGES = 4                 # packed int4 pages: 8 KB a slot
EMPTY = gl.constexpr(-9223372036854775808)      # int64 min: no block


@functools.lru_cache(maxsize=None)
def page_layout(bits: int, swizzle: int = 128):
    """A ring slot / TMA box / the query operand of ``bits``-bit values: 128-byte swizzle
    (64 for packed int4 rows, 32 for an int4 scan's query groups)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=bits, rank=2)


@gluon.jit
def _pack(m, j):
    """``msa.ops.decode.select.pack``: block max ``m`` (fp32; NaN as the most negative
    finite value, -0 as +0) and block id ``j`` -> int64 key, larger = ranked first."""
    m = gl.where(m != m, -3.4028234663852886e38, m)
    m = gl.where(m == 0.0, 0.0, m)
    bits = m.to(gl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(gl.int64) << 32) | (0x7FFFFFFF - j).to(gl.int64)


@gluon.jit
def _issue(k_desc, KIS, ring, ks_ring, bars, page, s, rows_per_page, live,
           SCALED: gl.constexpr, ROW_BYTES: gl.constexpr):
    """Page ``page`` by TMA into slot ``s`` and its key scales by ``cp.async`` (when
    ``live``; ``SCALED``: one fp32 per e4m3 key, or an int4 key's four fp16 as one int64),
    both arriving on the slot's mbarrier (its count: the copy's arrival and one per
    thread)."""
    if live:
        mbarrier.expect(bars.index(s), BS * ROW_BYTES)
        tma.async_copy_global_to_shared(k_desc, [page * rows_per_page, 0], bars.index(s),
                                        ring.index(s))
        if SCALED:
            offs = gl.arange(0, BS, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
            async_copy.async_copy_global_to_shared(ks_ring.index(s),
                                                   KIS + page.to(gl.int64) * BS + offs)
            mbarrier_arrive(bars.index(s), increment_count=False)


@gluon.jit
def _page(PAGE_TABLE, table_row, j, end):
    """Page id of the request's page ``j`` (0 from ``end`` on: not read)."""
    return gl.load(PAGE_TABLE + table_row + j, mask=j < end, other=0)


@gluon.jit
def _queries(QI, b, scale, stride_qt, stride_qh, NQ: gl.constexpr, HI: gl.constexpr,
             R: gl.constexpr, FP8: gl.constexpr):
    """The request's ``NQ x HI`` index query rows (row ``i * HI + h``) ``[R, DI]`` (zero
    past them) and their factors ``[R]``: as they are and ``scale``, or (``FP8``) as e4m3,
    each divided by its scale ``amax / 448`` (as ``msa.ops.quant.quantize_e4m3``), and
    ``scale`` times those scales."""
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    r = gl.arange(0, R, layout=gl.SliceLayout(1, ld))
    d = gl.arange(0, DI, layout=gl.SliceLayout(0, ld))
    row = (b * NQ + r // HI).to(gl.int64) * stride_qt + (r % HI) * stride_qh
    q = gl.load(QI + gl.expand_dims(row, 1) + gl.expand_dims(d, 0),
                mask=gl.expand_dims(r < NQ * HI, 1), other=0.0)
    factor = gl.full([R], scale, gl.float32, gl.SliceLayout(1, ld))
    if FP8:
        qf = q.to(gl.float32)
        amax = gl.max(gl.abs(qf), 1)
        qs = gl.where(amax > 0, gl.div_rn(amax, gl.full_like(amax, 448.0)), 1.0)
        q = gl.div_rn(qf, gl.expand_dims(qs, 1) + gl.zeros_like(qf))
        q = gl.where(q != q, q, gl.minimum(gl.maximum(q, -448.0), 448.0))   # NaN stays NaN
        q = q.to(gl.float8e4nv)
        factor = qs * factor
    return q, factor


@gluon.jit
def _int8_group(QI, row, live, qs, q_smem, g: gl.constexpr, ld: gl.constexpr):
    """Group ``g``'s 32 dims of the query rows (``row`` offsets, ``live`` rows) as int8
    ``round(q / qs)`` (half to even, as torch) into ``q_smem.index(g)``; returns 8 x each
    row's sum of them ``[R]`` (the offset of keys read as ``x + 8``)."""
    d = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, ld)), 0)
    q = gl.load(QI + row + g * 32 + d, mask=live, other=0.0).to(gl.float32)
    y = gl.div_rn(q, gl.expand_dims(qs, 1) + gl.zeros_like(q))
    y = (y + 12582912.0) - 12582912.0       # 1.5 x 2^23: rounds |y| <= 127 half to even
    q8 = gl.minimum(gl.maximum(y, -127.0), 127.0).to(gl.int8)
    q_smem.index(g).store(q8)
    return 8 * gl.sum(q8.to(gl.int32), 1)


@gluon.jit
def _int8_queries(QI, b, scale, q_smem, stride_qt, stride_qh, NQ: gl.constexpr,
                  HI: gl.constexpr, R: gl.constexpr):
    """Int4 keys: the request's query rows as int8 (``msa.ops.quant.quantize_int8``:
    ``s = amax / 127``, NaN for a row with a NaN or inf), group ``g``'s dims into
    ``q_smem.index(g)`` ``[R, 32]``; returns the rows' factors ``scale * s`` ``[R]`` and
    the offsets of groups 0 and 1 (the low nibbles, ``_int8_group``)."""
    gl.static_assert(DI == 128)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    r = gl.arange(0, R, layout=gl.SliceLayout(1, ld))
    row = gl.expand_dims((b * NQ + r // HI).to(gl.int64) * stride_qt + (r % HI) * stride_qh, 1)
    live = gl.expand_dims(r < NQ * HI, 1)
    d = gl.expand_dims(gl.arange(0, DI, layout=gl.SliceLayout(0, ld)), 0)
    x = gl.load(QI + row + d, mask=live, other=0.0).to(gl.float32)
    amax = gl.max(gl.abs(x), 1)
    qs = gl.where(amax > 0, gl.div_rn(amax, gl.full_like(amax, 127.0)), 1.0)
    qs = gl.where(gl.sum(x * 0.0, 1) == 0.0, qs, float("nan"))   # a NaN or inf: all NaN
    o0 = _int8_group(QI, row, live, qs, q_smem, 0, ld)
    o1 = _int8_group(QI, row, live, qs, q_smem, 1, ld)
    _int8_group(QI, row, live, qs, q_smem, 2, ld)
    _int8_group(QI, row, live, qs, q_smem, 3, ld)
    return qs * scale, o0, o1


@gluon.jit
def _group_scale(ks, g: gl.constexpr):
    """Group ``g``'s fp16 scale of each key from its four packed in an int64, as fp32."""
    bits = ((ks >> (16 * g)) & 0xFFFF).to(gl.int16)
    return bits.to(gl.float16, bitcast=True).to(gl.float32)


@gluon.jit
def _int4_scores(page, q_smem, ks, o0, o1, zero, DOT_A: gl.constexpr):
    """``S^T = K Q^T [BS, R]`` fp32 of a page of packed int4 keys ``[BS, DI / 2]`` uint8
    (byte ``j``: dim ``j`` low, dim ``j + 64`` high, two's-complement nibbles): per group
    of 32 dims an int8 wgmma with the keys from registers (exact int32 sums), the low
    nibbles read as ``x + 8`` (``(w ^ 8) & 15``; the rows' offsets ``o_g [R]`` taken off
    after) and the high ones as ``16 x`` (``w & 0xF0``; a sixteenth of the scale), each
    one operation per four bytes; times the keys' group scales (``ks [BS]`` int64: four
    fp16)."""
    front = page.slice(0, 32, dim=1).load(DOT_A)        # bytes 0-31: dims 0-31, 64-95
    back = page.slice(32, 32, dim=1).load(DOT_A)        # bytes 32-63: dims 32-63, 96-127
    # two groups in flight at a time: four int32 accumulators of 32 rows took 237 registers
    a0 = warpgroup_mma(((front ^ 8) & 15).to(gl.int8, bitcast=True),
                       q_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    a1 = warpgroup_mma(((back ^ 8) & 15).to(gl.int8, bitcast=True),
                       q_smem.index(1).permute((1, 0)), zero, use_acc=False, is_async=True)
    a0, a1 = warpgroup_mma_wait(0, deps=[a0, a1])
    s = (a0 - gl.expand_dims(o0, 0)).to(gl.float32) * gl.expand_dims(_group_scale(ks, 0), 1)
    s += (a1 - gl.expand_dims(o1, 0)).to(gl.float32) * gl.expand_dims(_group_scale(ks, 1), 1)
    a2 = warpgroup_mma((front & 0xF0).to(gl.int8, bitcast=True),
                       q_smem.index(2).permute((1, 0)), zero, use_acc=False, is_async=True)
    a3 = warpgroup_mma((back & 0xF0).to(gl.int8, bitcast=True),
                       q_smem.index(3).permute((1, 0)), zero, use_acc=False, is_async=True)
    a2, a3 = warpgroup_mma_wait(0, deps=[a2, a3])
    hi = a2.to(gl.float32) * gl.expand_dims(_group_scale(ks, 2), 1)
    hi += a3.to(gl.float32) * gl.expand_dims(_group_scale(ks, 3), 1)
    return s + hi * 0.0625


@gluon.jit
def _row_lists(CAND, b, r, j0, stride_cc, stride_ch, NQ: gl.constexpr, HI: gl.constexpr):
    """Query rows ``r`` (row ``i * HI + h`` of request ``b``): where their lists of this
    chunk (page ``j0`` on) start in ``CAND``, and which rows are real."""
    lists = CAND + (b * NQ + r // HI).to(gl.int64) * stride_cc + (r % HI) * stride_ch + j0
    return lists, r < NQ * HI


@gluon.jit
def _scores(page, q_smem, zero, KEYS_M: gl.constexpr):
    """The page's e4m3 scores (asynchronous wgmma): ``S^T = K Q^T [BS, R]`` with the keys
    as the MMA rows (``KEYS_M``), else ``S = Q K^T [R, BS]``."""
    if KEYS_M:
        acc = warpgroup_mma(page, q_smem.permute((1, 0)), zero, use_acc=False, is_async=True)
    else:
        acc = warpgroup_mma(q_smem, page.permute((1, 0)), zero, use_acc=False, is_async=True)
    return acc


@gluon.jit
def _block_max(acc, ks, FP8: gl.constexpr):
    """Each query row's max over the page's keys of ``S = Q K^T [R, BS]`` (the rows as the
    MMA rows; times the key scales)."""
    if FP8:
        acc = acc * gl.expand_dims(ks, 0)
    return gl.max(acc, 1)


@gluon.jit
def _warp_maxima(acc, ks, dst, R: gl.constexpr, FP8: gl.constexpr):
    """``S^T [BS, R]`` (the keys as the MMA rows: warp ``w`` holds keys ``64 t + 16 w +
    i``) times the key scales: each warp's maxima over its own 32 keys, ``[WARPS, R]``
    into shared memory ``dst`` (no step across warps). The max over ``t`` (within each
    thread) comes first, so that the shuffles across lanes carry half the values."""
    if FP8:
        acc = acc * gl.expand_dims(ks, 1)
    dst.store(gl.max(gl.max(gl.reshape(acc, [2, WARPS, 16, R]), 0), 1))


@gluon.jit
def _largest_first(keys, place, axis: gl.constexpr):
    """``keys`` (distinct but for ``EMPTY``) with the largest along ``axis`` swapped into
    ``place == 0``."""
    head = gl.expand_dims(gl.max(keys, axis), axis)
    first = gl.expand_dims(gl.max(gl.where(place == 0, keys, EMPTY), axis), axis)
    return gl.where(place == 0, head, gl.where(keys == head, first, keys))


@gluon.jit
def _chunk_lists(maxima, CAND, b, j0, n, n_live, row_scale, stride_cc, stride_ch,
                 NQ: gl.constexpr, HI: gl.constexpr, R: gl.constexpr, PAGES: gl.constexpr):
    """The chunk's list of every row from the warps' maxima ``[PAGES, WARPS, R]`` in shared
    memory: the block maxima (across warps), their keys (``EMPTY`` for pages not read or
    not ranked), the largest key swapped to the front, stored once."""
    ml: gl.constexpr = gl.BlockedLayout([1, WARPS, 1], [1, 1, 32], [WARPS, 1, 1], [2, 1, 0])
    kl: gl.constexpr = gl.SliceLayout(1, ml)                        # [PAGES, R]
    m = gl.max(maxima.load(ml), 1) * gl.expand_dims(gl.convert_layout(
        row_scale, gl.SliceLayout(0, kl)), 0)
    p = gl.expand_dims(gl.arange(0, PAGES, layout=gl.SliceLayout(1, kl)), 1)
    r = gl.arange(0, R, layout=gl.SliceLayout(0, kl))
    local = gl.expand_dims((n - NQ + r // HI) // BS, 0)
    key = gl.where((p < n_live) & (j0 + p < local) & (m != float("-inf")), _pack(m, j0 + p),
                   EMPTY)
    # stored with the lanes along the pages: each row's list in whole 32-byte sectors (with
    # the lanes along the rows every store wrote 8 bytes of a sector)
    sl: gl.constexpr = gl.BlockedLayout([2, 1], [8, 4], [1, WARPS], [0, 1])
    key = gl.convert_layout(_largest_first(key, p, 0), sl)
    p = gl.expand_dims(gl.arange(0, PAGES, layout=gl.SliceLayout(1, sl)), 1)
    lists, rmask = _row_lists(CAND, b, gl.arange(0, R, layout=gl.SliceLayout(0, sl)), j0,
                              stride_cc, stride_ch, NQ, HI)
    gl.store(gl.expand_dims(lists, 0) + p, key, mask=gl.expand_dims(rmask, 0))


@gluon.jit
def paged_scan_kernel(QI, k_desc, KIS, PAGE_TABLE, SEQ_LENS, CAND, scale, rows_per_page,
                      table_width, stride_qt, stride_qh, stride_tb, stride_cc, stride_ch,
                      NQ: gl.constexpr, HI: gl.constexpr, PAGES: gl.constexpr,
                      KR: gl.constexpr, RANK: gl.constexpr, STAGES: gl.constexpr,
                      R: gl.constexpr, num_warps: gl.constexpr):
    """Chunk ``p`` of request ``b`` (``paged_scan_kernel``'s outputs at ``CAND``): pages
    of index keys through ``k_desc`` (TMA rows of ``DI`` values, token ``t`` of page
    ``P`` at row ``P * rows_per_page + t``), e4m3 with key scales ``KIS[P * BS + t]`` or
    bf16 (``KIS`` unused); ``R`` query rows (``rows_padded``); ``table_width``: page ids
    per request in ``PAGE_TABLE``."""
    gl.static_assert(num_warps == WARPS)
    FP8: gl.constexpr = k_desc.dtype == gl.float8e4nv
    INT4: gl.constexpr = k_desc.dtype == gl.uint8       # packed, DI / 2 bytes a key
    KW: gl.constexpr = DI // 2 if INT4 else DI          # a key's elements in the page
    KEYS_M: gl.constexpr = R <= 32          # S^T [keys, rows], else S [rows, keys]
    gl.static_assert(R <= 32 or not INT4)
    # whole chunks: the block maxima across warps, the keys and the list once per chunk,
    # from each page's maxima per warp kept in shared memory
    DEFER: gl.constexpr = KEYS_M and not RANK
    SM: gl.constexpr = BS if KEYS_M else R
    SN: gl.constexpr = R if KEYS_M else BS
    ACC: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1],
        instr_shape=[16, SN, 256 // k_desc.dtype.primitive_bitwidth])
    # [WARPS, R]: each warp's maxima over its own keys, all four in every thread
    WM: gl.constexpr = gl.BlockedLayout([WARPS, 1], [1, 32], [1, WARPS], [1, 0])
    ROW_L: gl.constexpr = gl.SliceLayout(0, WM) if KEYS_M else gl.SliceLayout(1, ACC)  # [R]
    KEY_L: gl.constexpr = gl.SliceLayout(1 if KEYS_M else 0, ACC)     # [BS]: keys
    b = gl.program_id(0)
    p = gl.program_id(1)
    n = gl.load(SEQ_LENS + b)
    table_row = b.to(gl.int64) * stride_tb
    j0 = p * PAGES
    # the pages before the last query's block: every row ranks at most those
    n_live = gl.minimum(gl.maximum((n - 1) // BS - j0, 0), PAGES)
    ring = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BS, KW], k_desc.layout)
    ks_ring = gl.allocate_shared_memory(gl.int64 if INT4 else gl.float32, [STAGES, BS],
                                        gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):       # the copy's arrival (+ each thread's cp.async)
        mbarrier.init(bars.index(i), count=1 + (32 * WARPS if FP8 or INT4 else 0))
    fence_async_shared()
    # the first page ids are loaded beside the length (bounded by the table, not by it)
    for i in gl.static_range(STAGES):
        _issue(k_desc, KIS, ring, ks_ring, bars,
               _page(PAGE_TABLE, table_row, j0 + i, table_width), i, rows_per_page,
               i < n_live, FP8 or INT4, KW * k_desc.dtype.primitive_bitwidth // 8)
    # the ids of the next two pages to issue, loaded ahead (their latency hidden)
    nxt = _page(PAGE_TABLE, table_row, j0 + STAGES, table_width)
    later = _page(PAGE_TABLE, table_row, j0 + STAGES + 1, table_width)
    if INT4:        # four int8 groups of 32 dims, and their offsets
        q_smem = gl.allocate_shared_memory(gl.int8, [DI // 32, R, 32],
                                           gl.NVMMASharedLayout(swizzle_byte_width=32,
                                                                element_bitwidth=8, rank=2))
        row_scale, o0, o1 = _int8_queries(QI, b, scale, q_smem, stride_qt, stride_qh, NQ,
                                          HI, R)
    else:
        qv, row_scale = _queries(QI, b, scale, stride_qt, stride_qh, NQ, HI, R, FP8)
        q_smem = gl.allocate_shared_memory(k_desc.dtype, [R, DI], k_desc.layout,
                                           qv.to(k_desc.dtype))
    fence_async_shared()
    if KEYS_M:
        # the warps' maxima of every page (DEFER) or of the last two: [NM, WARPS, R]
        # row-major, seen whole and page by page
        NM: gl.constexpr = PAGES if DEFER else 2
        maxima = gl.allocate_shared_memory(gl.float32, [NM, WARPS, R],
                                           gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0]))
        per_page = maxima._reinterpret(gl.float32, [NM, WARPS, R],
                                       gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))

    r = gl.arange(0, R, layout=ROW_L)
    lists, rmask = _row_lists(CAND, b, r, j0, stride_cc, stride_ch, NQ, HI)
    local = (n - NQ + r // HI) // BS
    row_scale = gl.convert_layout(row_scale, ROW_L)
    zero = gl.zeros([SM, SN], gl.int32 if INT4 else gl.float32, ACC)
    if INT4:
        DOT_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=4)
        OFF_L: gl.constexpr = gl.SliceLayout(0, ACC)           # [R]: the rows of S^T
        o0 = gl.convert_layout(o0, OFF_L)
        o1 = gl.convert_layout(o1, OFF_L)
    best = gl.full([R], EMPTY, gl.int64, ROW_L)         # the chunk's largest key so far,
    at = gl.zeros([R], gl.int32, ROW_L)                 # its place
    first = best                                        # and the first key
    # RANK: each row's best KR keys so far, in no order; the places not yet taken hold
    # distinct values below every key (EMPTY + place), so one of them is the row's least
    lst: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [WARPS, 1], [1, 0])
    offs_k = gl.expand_dims(gl.arange(0, KR, layout=gl.SliceLayout(0, lst)), 0)
    top = EMPTY + gl.zeros([R, KR], gl.int64, lst) + offs_k
    for jj in range(n_live):
        s = jj % STAGES
        mbarrier.wait(bars.index(s), (jj // STAGES) & 1)      # the page and its scales
        if INT4:            # scaled per group: the key scales are applied
            acc = _int4_scores(ring.index(s), q_smem, ks_ring.index(s).load(KEY_L), o0, o1,
                               zero, DOT_A)
            ks = gl.zeros([BS], gl.float32, KEY_L)
        else:
            acc = _scores(ring.index(s), q_smem, zero, KEYS_M)
            if FP8:
                ks = ks_ring.index(s).load(KEY_L)
            else:
                ks = gl.zeros([BS], gl.float32, KEY_L)
            acc = warpgroup_mma_wait(0, deps=[acc])
        if KEYS_M:
            _warp_maxima(acc, ks, per_page.index(jj if DEFER else jj % 2), R, FP8)
        # every warp read slot s before its next copies (and stored its maxima)
        gl.thread_barrier()
        _issue(k_desc, KIS, ring, ks_ring, bars, nxt, s, rows_per_page,
               jj + STAGES < n_live, FP8 or INT4, KW * k_desc.dtype.primitive_bitwidth // 8)
        nxt = later
        later = _page(PAGE_TABLE, table_row, j0 + jj + STAGES + 2, j0 + n_live)
        if not DEFER:
            # the block maxima: over the four warps' (two buffers: a warp may store the next
            # page's before every warp has read these), or within lane quads (rows as M)
            if KEYS_M:
                m = gl.max(per_page.index(jj % 2).load(WM), 0)
            else:
                m = _block_max(acc, ks, FP8)
            m = m * row_scale
            key = gl.where((j0 + jj < local) & (m != float("-inf")), _pack(m, j0 + jj),
                           EMPTY)
            if RANK:            # the key takes the place of its row's least, if above it
                new = gl.expand_dims(gl.convert_layout(key, gl.SliceLayout(1, lst)), 1)
                least = gl.expand_dims(gl.min(top, 1), 1)
                top = gl.where((new > least) & (top == least), new, top)
            else:
                gl.store(lists + jj, key, mask=rmask)
                first = gl.where(jj == 0, key, first)
                at = gl.where(key > best, jj, at)
                best = gl.maximum(best, key)

    lists2, rmask2 = _row_lists(CAND, b, gl.arange(0, R, layout=gl.SliceLayout(1, lst)), j0,
                                stride_cc, stride_ch, NQ, HI)
    lists2, rmask2 = gl.expand_dims(lists2, 1), gl.expand_dims(rmask2, 1)
    if DEFER:
        gl.thread_barrier()             # every warp's maxima of every page
        _chunk_lists(maxima, CAND, b, j0, n, n_live, row_scale, stride_cc, stride_ch, NQ,
                     HI, R, PAGES)
    elif not RANK:
        # the pages not read rank nothing; then the largest key first (after the stores)
        offs_p = gl.expand_dims(gl.arange(0, PAGES, layout=gl.SliceLayout(0, lst)), 0)
        gl.store(lists2 + offs_p, gl.full([R, PAGES], EMPTY, gl.int64, lst),
                 mask=rmask2 & (offs_p >= n_live))
        gl.thread_barrier()
        gl.store(lists + at, first, mask=rmask)
        gl.store(lists, best, mask=rmask)
    else:               # the chunk's best KR keys, the largest first (EMPTY padded)
        top = _largest_first(gl.where(top < EMPTY + KR, EMPTY, top), offs_k, 1)
        gl.store(lists2 + offs_k, top, mask=rmask2)


def rows_padded(rows: int) -> int:
    """The kernel's query rows for a request's ``rows = Q x Hi``: 8, 16 or 32 with the keys
    as the wgmma's M dimension (a few values per thread, their max across threads; over
    whole chunks each warp's maxima per page, the rest once per chunk), else 64
    with the rows as M (the max within lane quads: cheaper for many rows, see
    docs/experiments.md)."""
    return 8 if rows <= 8 else 16 if rows <= 16 else 32 if rows <= 32 else 64


def supported(qi: torch.Tensor, ki: torch.Tensor, ki_strides, block_size: int,
              num_q: int) -> bool:
    """Whether ``paged_scan_kernel`` scans these pages: a Hopper GPU (sm_90), index keys of
    head dim 128, e4m3, packed int4 (uint8, 64 bytes a key) or bf16 (with bf16 queries),
    in pages of 128 whose rows are TMA rows (16-byte aligned, the page stride a whole
    multiple of the row stride, fewer than 2^31 rows in ``ki``'s extent, ``tma_rows``), at
    most 64 query rows per request (``num_q x Hi``; 32 over int4 keys)."""
    if not on_hopper(qi):
        return False
    sp, st = ki_strides
    int4 = ki.dtype == torch.uint8
    dtype_ok = ki.dtype == torch.float8_e4m3fn or int4 or (
        ki.dtype == torch.bfloat16 and qi.dtype == ki.dtype)      # fp16 keys: the Triton scan
    return (dtype_ok and qi.shape[-1] == DI and block_size == BS
            and ki.shape[-1] == (DI // 2 if int4 else DI)
            and num_q * qi.shape[1] <= (32 if int4 else MAX_ROWS)
            and st * ki.element_size() % 16 == 0
            and sp % st == 0 and tma_rows(ki, st) < 2 ** 31 and ki.data_ptr() % 16 == 0)


def launch(qi, ki, ki_scales, ki_table, seq_lens, candidates, *, grid, num_q: int,
           index_scale: float, ki_strides, pages: int, kr: int, rank: bool,
           stages: int = None) -> None:
    """``paged_scan_kernel`` over ``grid = (requests, chunks)`` of ``pages`` pages
    (``msa.ops.decode.select.paged_scan``'s arguments; the pages as TMA rows; ``ki_scales``
    for e4m3 or int4 keys, else ``None``; ``stages`` ring slots, default ``STAGES`` or
    ``INT4_STAGES``)."""
    sp, st = ki_strides
    rows = rows_padded(num_q * qi.shape[1])
    int4 = ki.dtype == torch.uint8
    width = DI.value // 2 if int4 else DI.value
    desc = TensorDescriptor(ki, [tma_rows(ki, st), width], [st, 1], [BS.value, width],
                            page_layout(8, 64) if int4 else page_layout(8 * ki.element_size()))
    if int4:            # a key's four fp16 group scales, one int64 to copy
        ki_scales = ki_scales.view(torch.int64)
    paged_scan_kernel[grid](
        qi, desc, ki_table if ki_scales is None else ki_scales, ki_table, seq_lens,
        candidates, index_scale, sp // st, ki_table.shape[1],
        qi.stride(0), qi.stride(1), ki_table.stride(0), candidates.stride(0),
        candidates.stride(1), NQ=num_q, HI=qi.shape[1], PAGES=pages, KR=kr, RANK=rank,
        STAGES=stages or (INT4_STAGES if int4 else STAGES[ki.element_size()]), R=rows,
        num_warps=WARPS.value)
