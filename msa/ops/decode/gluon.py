"""Gluon FP8 paged decode attention for Hopper (sm_90): ``fp8_attn_kernel``.

Same contract as ``msa.ops.decode.triton.paged_decode_attn_kernel`` over e4m3 K/V pages
with fp32 row scales and 16-bit queries, when one program per (query row, KV head) walks
all its selected blocks (no split, no merge: many rows, e.g. 128K x 64 requests x 8
tokens). The ``tl.*`` kernel spends most of its instructions bringing the value tile to
the MMA: it is the B operand of ``P V`` with the keys as its reduction dimension, the
cache stores it token-major, so each of a thread's fp16 pairs needs bytes from two
rows, which Triton loads one byte at a time (docs/experiments.md). Here:

* each page's K and V (16 KB each) arrive by TMA (one thread issues two copies, an
  mbarrier per slot counts their bytes) and their scales by ``cp.async``, in two
  shared-memory slots (16-byte chunks swizzled by row: TMA's 128-byte swizzle), the next
  block's while this one is computed; its block id and page are loaded an iteration
  before. TMA copies whole pages: the value rows past the query (of the query's own
  block, or any rows for no block) are cleared in shared memory before use (a branch
  taken for at most one block per row), since ``0 * NaN`` would reach the output; the
  key rows past it are masked in the scores and their scales zero-filled;
* each of the 4 warps owns a quarter of every block's keys and keeps its own online
  softmax (a batched MMA: the warp is the batch dimension), so the loop has no
  cross-warp step; the four are merged by LSE once at the end;
* the head dimension is relabeled, a permutation of the columns (of Q and K for
  ``S = Q K^T``, of V and the output for ``P V``), so that the bytes a thread needs for
  its MMA fragments are contiguous in shared memory: 16-byte loads, then the e4m3 -> fp16
  conversion in registers, and for V a repacking of fp16 halves within the thread; the
  output leaves in the cache's column order, 16 consecutive columns a thread.

e4m3 values are exact in fp16: ``S`` is the fp16 MMA of the keys times the query rows
scaled into fp16 by a power of two, times the key scales; the probabilities meet the
value scales over their block maximum before the fp16 ``P V`` MMA (as the ``tl.*``
kernel's ``fp8_softmax_step``).
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..launch import on_hopper

WARPS = gl.constexpr(4)
BS = gl.constexpr(128)          # keys per page (block)
D = gl.constexpr(128)           # head dim
ROWS = gl.constexpr(16)         # MMA rows: the group's query heads, padded
KW = gl.constexpr(32)           # keys per warp
# a ring slot / TMA box: a page's 128 rows of 128 bytes, 16-byte chunks swizzled by row
PAGE_L = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2))


def phys_k(d: int) -> int:
    """Column of relabeled head-dim index ``d`` in ``S = Q K^T``: the 32 indices a thread
    holds in its K fragments (bits 0, 3-6 of ``d``) become 32 consecutive columns."""
    return (d & 1) | ((d >> 3) & 1) << 1 | ((d >> 4) & 7) << 2 | ((d >> 1) & 3) << 5


def phys_v(d: int) -> int:
    """Column of relabeled head-dim index ``d`` in ``P V`` and the output: the 16 a thread
    holds in its V fragments (bits 3-6) become 16 consecutive columns (the kernel's output
    store writes ``d = 8 a + b`` at ``16 b + a``, this map, as sums it can vectorize)."""
    return (d & 7) << 4 | d >> 3


def _slot_offset(row: int, col: int) -> int:
    """Byte offset of (key ``row``, column ``col``) in a ring slot: 16-byte chunks
    swizzled by the row (``PAGE_L``, TMA's 128-byte swizzle)."""
    return row * D.value + (((col >> 4) ^ (row & 7)) << 4) + (col & 15)


def _view(shape, coords_to_offset) -> gl.SharedLinearLayout:
    """The shared linear layout of a slot seen as ``shape`` (offset bit -> coordinates),
    from the map of coordinates to element offsets (a bijection, linear over GF(2))."""
    inv = {}
    idx = [0] * len(shape)

    def walk(dim):
        if dim == len(shape):
            inv[coords_to_offset(*idx)] = list(idx)
            return
        for i in range(shape[dim]):
            idx[dim] = i
            walk(dim + 1)
    walk(0)
    n = 1
    for x in shape:
        n *= x
    assert sorted(inv) == list(range(n))
    bases = [inv[1 << i] for i in range(n.bit_length() - 1)]
    for off, coords in ((3, inv[3]), (n - 1, inv[n - 1])):       # spot checks of linearity
        acc = [0] * len(shape)
        for i in range(n.bit_length() - 1):
            if off >> i & 1:
                acc = [a ^ c for a, c in zip(acc, bases[i])]
        assert acc == coords
    return gl.SharedLinearLayout(bases)


_W, _D, _KW, _R = WARPS.value, D.value, KW.value, ROWS.value
# a slot as the K^T fragments [warp, d, key] and the V fragments [warp, key, d]
K_VIEW = gl.constexpr(_view([_W, _D, _KW],
                            lambda w, k_d, k: _slot_offset(w * _KW + k, phys_k(k_d))))
V_VIEW = gl.constexpr(_view([_W, _KW, _D],
                            lambda w, k, v_d: _slot_offset(w * _KW + k, phys_v(v_d))))
# the query rows as stored [warp, row, d] (fp16) and as the MMA fragments read them
Q_ROWS = gl.constexpr(_view([_W, _R, _D], lambda w, r, q_d: (w * _R + r) * _D + q_d))
Q_VIEW = gl.constexpr(_view([_W, _R, _D], lambda w, r, q_d: (w * _R + r) * _D + phys_k(q_d)))
# mma.sync tiles batched over the warps: warp w computes batch entry w
MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[_W, 1, 1],
                                             instr_shape=[1, 16, 8]))
# V loaded 16 consecutive bytes per key per thread: the fragment layout with the
# registers over the head dim first (the same threads own the same elements)
V_LOAD = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 8], [0, 0, 16], [0, 0, 32], [0, 0, 64], [0, 1, 0], [0, 8, 0],
               [0, 16, 0]],
    lane_bases=[[0, 2, 0], [0, 4, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
    warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[4, 32, 128]))


@gluon.jit
def _block(TOPK_INDICES, PAGE_TABLE, sel_row, table_row, j, pos, TOPK: gl.constexpr):
    """Block ``j`` of the row's selection (``-1`` past the top-k or the query) and its
    page (0 for no block)."""
    blk = gl.load(TOPK_INDICES + sel_row + j, mask=j < TOPK, other=-1)
    blk = gl.where(blk * BS <= pos, blk, -1)
    return blk, gl.load(PAGE_TABLE + table_row + blk, mask=blk >= 0, other=0).to(gl.int64)


@gluon.jit
def _issue(K_DESC, V_DESC, KS, VS, k_ring, v_ring, ks_ring, vs_ring, bars, blk, page, s, pos,
           h, s_off, rows_per_page, rows_per_head, stride_sp, stride_sh):
    """Block ``blk``'s K/V page by TMA into ring slot ``s`` (page 0 for no block), its
    scales by ``cp.async`` (zero past the query and for no block)."""
    row = (page * rows_per_page + h * rows_per_head).to(gl.int32)
    bar = bars.index(s)
    mbarrier.expect(bar, 2 * BS * D)
    tma.async_copy_global_to_shared(K_DESC, [row, 0], bar, k_ring.index(s))
    tma.async_copy_global_to_shared(V_DESC, [row, 0], bar, v_ring.index(s))
    sbase = page * stride_sp + h * stride_sh
    slive = (blk >= 0) & (blk * BS + s_off <= pos)
    async_copy.async_copy_global_to_shared(ks_ring.index(s), KS + sbase + s_off, mask=slive)
    async_copy.async_copy_global_to_shared(vs_ring.index(s), VS + sbase + s_off, mask=slive)
    async_copy.commit_group()


@gluon.jit
def fp8_attn_kernel(
        Q, K_DESC, V_DESC, KS, VS, TOPK_INDICES, PAGE_TABLE, SEQ_LENS, OUT, LSE, scale_log2,
        rows_per_page, rows_per_head, stride_qt, stride_qh, stride_th, stride_tq,
        stride_tb, stride_ot, stride_oh, stride_lt, stride_sp, stride_sh,
        NQ: gl.constexpr, HS: gl.constexpr, G: gl.constexpr, TOPK: gl.constexpr,
        num_warps: gl.constexpr):
    """Query row ``c = b * NQ + i``, KV head ``h``: ``OUT [c, h*G:(h+1)*G, :]`` and its
    natural-log LSE over the ``TOPK`` selected blocks of ``TOPK_INDICES [hs, c, :]``;
    ``K_DESC, V_DESC``: TMA descriptors of the pages as rows of ``D`` bytes, token ``t``
    of head ``h`` of page ``p`` at row ``p * rows_per_page + h * rows_per_head + t``."""
    gl.static_assert(num_warps == WARPS)
    c = gl.program_id(0).to(gl.int64)
    h = gl.program_id(1)
    b = c // NQ
    pos = gl.load(SEQ_LENS + b) - NQ + (c % NQ)
    hs = h if HS > 1 else 0
    sel_row = hs * stride_th + c * stride_tq
    table_row = b * stride_tb
    k_ring = gl.allocate_shared_memory(gl.float8e4nv, [2, BS, D], PAGE_L)
    v_ring = gl.allocate_shared_memory(gl.float8e4nv, [2, BS, D], PAGE_L)
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bars.index(0), count=1)
    mbarrier.init(bars.index(1), count=1)
    sc_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    ks_ring = gl.allocate_shared_memory(gl.float32, [2, BS], sc_l)
    vs_ring = gl.allocate_shared_memory(gl.float32, [2, BS], sc_l)
    s_off = gl.arange(0, BS, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
    clear_l: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [WARPS, 1], [1, 0])
    clear_rows = gl.arange(0, BS, layout=gl.SliceLayout(1, clear_l))
    blk, page = _block(TOPK_INDICES, PAGE_TABLE, sel_row, table_row, 0, pos, TOPK)
    _issue(K_DESC, V_DESC, KS, VS, k_ring, v_ring, ks_ring, vs_ring, bars, blk, page, 0, pos,
           h, s_off, rows_per_page, rows_per_head, stride_sp, stride_sh)
    nxt, nxt_page = _block(TOPK_INDICES, PAGE_TABLE, sel_row, table_row, 1, pos, TOPK)

    # the query rows: each warp loads its own copy in 16-byte pieces, scales it into fp16
    # by a power of two per row and takes its MMA fragments (relabeled columns) through the
    # ring slot that the first block leaves free
    q_ld: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 2, 16], [WARPS, 1, 1], [2, 1, 0])
    qw = gl.arange(0, WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, q_ld)))
    qg = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, q_ld)))
    qd = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, q_ld)))
    q_ptr = Q + c * stride_qt + gl.expand_dims(gl.expand_dims((h * G + qg) * stride_qh, 0), 2) \
        + gl.expand_dims(gl.expand_dims(qd, 0), 1) + gl.expand_dims(gl.expand_dims(qw * 0, 1), 2)
    qf = gl.load(q_ptr, mask=gl.expand_dims(gl.expand_dims(qg < G, 0), 2),
                 other=0.0).to(gl.float32)
    amax = gl.max(gl.abs(qf), 2)
    e = ((amax.to(gl.int32, bitcast=True) >> 23) & 0xFF) - 127
    f = ((gl.minimum(gl.maximum(14 - e, -126), 127) + 127) << 23).to(gl.float32, bitcast=True)
    f = gl.where(amax > 0, f, 1.0)
    q_slot = k_ring.index(1)
    q_slot._reinterpret(gl.float16, [WARPS, ROWS, D], Q_ROWS).store(
        (qf * gl.expand_dims(f, 2)).to(gl.float16))
    gl.thread_barrier()
    a_l: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    q16 = q_slot._reinterpret(gl.float16, [WARPS, ROWS, D], Q_VIEW).load(a_l)
    row_l: gl.constexpr = gl.SliceLayout(2, MMA)
    q_scale = gl.convert_layout(scale_log2 / f, row_l)

    key_l: gl.constexpr = gl.SliceLayout(1, MMA)              # [warp, key]
    keys = gl.expand_dims(gl.arange(0, WARPS, layout=gl.SliceLayout(1, key_l)), 1) * KW + \
        gl.expand_dims(gl.arange(0, KW, layout=gl.SliceLayout(0, key_l)), 0)
    b_l: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
    m_i = gl.full([WARPS, ROWS], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([WARPS, ROWS], gl.float32, row_l)
    r_i = gl.full([WARPS, ROWS], 1.0, gl.float32, row_l)     # acc is in units of r_i
    acc = gl.zeros([WARPS, ROWS, D], gl.float32, MMA)
    for jj in range(TOPK):
        s = jj % 2
        mbarrier.wait(bars.index(s), (jj // 2) & 1)
        async_copy.wait_group(0)
        gl.thread_barrier()         # block jj landed for every thread; the other slot is free
        if (blk < 0) | (blk * BS + BS - 1 > pos):      # value rows past the query: cleared
            v_slot = v_ring.index(s)
            live = (blk >= 0) & (blk * BS + clear_rows <= pos)
            v_slot.store(gl.where(gl.expand_dims(live, 1), v_slot.load(clear_l),
                                  gl.zeros([BS, D], gl.float8e4nv, clear_l)))
            gl.thread_barrier()
        fence_async_shared()        # this thread's shared accesses before the next TMA
        # the ids of the block after next, used in the next iteration (their latency hidden)
        later, later_page = _block(TOPK_INDICES, PAGE_TABLE, sel_row, table_row, jj + 2, pos,
                                   TOPK)
        kt = k_ring.index(s)._reinterpret(gl.float8e4nv, [WARPS, D, KW], K_VIEW).load(b_l)
        ks = ks_ring.index(s).reshape([WARPS, KW]).load(key_l)
        qk = mma_v2(q16, kt.to(gl.float16), gl.zeros([WARPS, ROWS, KW], gl.float32, MMA))
        # the next block's loads into the other slot (behind this block's S)
        _issue(K_DESC, V_DESC, KS, VS, k_ring, v_ring, ks_ring, vs_ring, bars, nxt, nxt_page,
               1 - s, pos, h, s_off, rows_per_page, rows_per_head, stride_sp, stride_sh)
        kmask = (blk >= 0) & (blk * BS + keys <= pos)
        sc = qk * gl.expand_dims(q_scale, 2) * gl.expand_dims(ks, 1)
        sc = gl.where(gl.expand_dims(kmask, 1), sc, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(sc, 2))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(sc - gl.expand_dims(m_use, 2))
        l_i = l_i * alpha + gl.sum(p, 2)
        m_i = m_new
        vs = vs_ring.index(s).reshape([WARPS, KW]).load(key_l)
        v_max = gl.max(vs, 1)
        v_max = gl.where(v_max > 0, v_max, 1.0)
        pv = (p * gl.expand_dims(vs * gl.expand_dims(1.0 / v_max, 1), 1)).to(gl.float16)
        vt = v_ring.index(s)._reinterpret(gl.float8e4nv, [WARPS, KW, D], V_VIEW).load(V_LOAD)
        vt = gl.convert_layout(vt.to(gl.float16), b_l)
        v_row = gl.convert_layout(gl.expand_dims(v_max, 1), row_l)       # [warp, 1]
        acc = mma_v2(gl.convert_layout(pv, a_l), vt,
                     acc * gl.expand_dims(r_i * alpha / v_row, 2))
        r_i = gl.zeros([WARPS, ROWS], gl.float32, row_l) + v_row
        blk, nxt, nxt_page = nxt, later, later_page
    async_copy.wait_group(0)        # the copies issued for the block past the last
    mbarrier.wait(bars.index(TOPK % 2), (TOPK // 2) & 1)

    # the four warps' softmaxes merged by LSE
    m_all = gl.max(m_i, 0)
    m_use = gl.where(m_all == float("-inf"), 0.0, m_all)
    w = gl.exp2(m_i - gl.expand_dims(m_use, 0))
    l_all = gl.sum(l_i * w, 0)
    o_l: gl.constexpr = gl.SliceLayout(0, MMA)
    o = gl.sum(acc * gl.expand_dims(w * r_i, 2), 0) / gl.expand_dims(
        gl.convert_layout(gl.maximum(l_all, 1e-30), gl.SliceLayout(1, o_l)), 1)
    # stored 16 consecutive output columns a thread (relabeled index d = 8 a + b lands in
    # column phys_v(d) = 16 b + a), not one 2-byte store per element
    st_l: gl.constexpr = gl.BlockedLayout([1, 16, 1], [4, 1, 8], [WARPS, 1, 1], [1, 2, 0])
    o = gl.convert_layout(gl.reshape(o.to(OUT.dtype.element_ty), [ROWS, 16, 8]), st_l)
    og = gl.arange(0, ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(2, st_l)))
    oa = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, st_l)))
    ob = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, st_l)))
    og3 = gl.expand_dims(gl.expand_dims(og, 1), 2)
    gl.store(OUT + c * stride_ot + (h * G + og3) * stride_oh + gl.expand_dims(
        gl.expand_dims(oa, 0), 2) + gl.expand_dims(gl.expand_dims(ob * 16, 0), 1), o,
        mask=og3 < G)
    lse_g = gl.arange(0, ROWS, layout=gl.SliceLayout(0, row_l))
    lse = gl.where(l_all > 0, (m_all + gl.log2(l_all)) * 0.6931471805599453, float("-inf"))
    gl.store(LSE + c * stride_lt + h * G + lse_g, lse, mask=lse_g < G)


def tma_rows(x: torch.Tensor, row_stride: int) -> int:
    """Rows of ``row_stride`` elements from ``x``'s first element to its last (the extent
    a TMA descriptor of those rows may read), whatever view ``x`` is of them: a pool of
    pages, or a cache ``[B, H, T, D]`` read through pages of ``T``'s blocks."""
    last = sum((n - 1) * s for n, s in zip(x.shape, x.stride()))
    return last // row_stride + 1


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int,
              block_size: int, kv_strides) -> bool:
    """Whether ``fp8_attn_kernel`` runs these pages: a Hopper GPU (sm_90), 16-bit queries,
    e4m3 pages of 128 keys x head dim 128 whose rows are TMA rows (16-byte aligned, page
    and head strides whole multiples of the row stride: vLLM's K-then-V rows too, fewer
    than 2^31 rows), a group of at most 16 query heads."""
    if not on_hopper(q):
        return False
    sp, sh, st = kv_strides
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == torch.float8_e4m3fn
            and q.shape[-1] == D and block_size == BS and q.shape[1] // num_kv_heads <= ROWS
            and v.dtype == k.dtype and all(x % 16 == 0 for x in kv_strides)
            and sp % st == 0 and sh % st == 0 and tma_rows(k, st) < 2 ** 31
            and tma_rows(v, st) < 2 ** 31
            and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0)


def launch(q, k, v, k_scales, v_scales, topk_indices, page_table, seq_lens, out, lse, *,
           rows: int, num_q: int, num_kv_heads: int, scale_log2: float, kv_strides,
           scale_strides, maxnreg: int = 168) -> None:
    """``fp8_attn_kernel`` over grid (rows, KV heads) (``paged_attend``'s arguments; the
    pages ``k, v`` as TMA descriptors over their rows); ``maxnreg=168``: three programs
    per SM (no spills in the sm_90a build)."""
    topk = topk_indices.shape[2]
    sp, sh, st = kv_strides
    descs = [TensorDescriptor(x, [tma_rows(x, st), D.value], [st, 1], [BS.value, D.value],
                              PAGE_L.value) for x in (k, v)]
    fp8_attn_kernel[(rows, num_kv_heads)](
        q, *descs, k_scales, v_scales, topk_indices, page_table, seq_lens, out, lse,
        scale_log2, sp // st, sh // st, q.stride(0), q.stride(1), topk_indices.stride(0),
        topk_indices.stride(1), page_table.stride(0), out.stride(0), out.stride(1),
        lse.stride(0), *scale_strides,
        NQ=num_q, HS=topk_indices.shape[0], G=q.shape[1] // num_kv_heads, TOPK=topk,
        num_warps=WARPS.value, **({"maxnreg": maxnreg} if maxnreg else {}))
