"""Gluon kernels of the indexer KL for Hopper (sm_90): ``teacher_kernel`` and
``kl_kernel``.

The KL's costly half is the teacher: per edge (query, index head ``h``, selected block)
the main attention's probabilities over the block's 128 keys, averaged over the ``G``
query heads of KV head ``h`` (docs/semantics.md, "Indexer KL"): a ``(tokens x G heads)
x D x 128`` MMA and an exponential per score, the shape of the forward's ``S = Q K^T``.
This kernel computes it the way the Gluon forward (``msa.ops.attention.gluon``) does,
whose loader it runs: the block's keys on chip, each tile's gathered query rows in a
ring of ``STAGES`` shared-memory slots (``cp.async``), two warpgroups taking alternate
64-row tiles (``64 // GP`` queries x ``GP`` rows: the ``G`` heads, padded to the power of
two ``GP``). The scores come transposed, ``S^T = K Q^T`` (each half of the block's keys
as the wgmma's 64 rows, the tile's query rows as its columns), so that a query's ``GP``
heads are neighbouring columns and their sum stays mostly within a thread (two columns in
every eight, then a lane quad) instead of crossing every lane of a warp. Each tile's
queries' positions and LSEs are loaded a tile ahead, a tile whose queries all see the
whole block skips the mask, and the first half's exponentials run under the second
half's wgmma.

``teacher_kernel``: each tile's head average leaves as fp32 rows ``PT [edge, 128]``; the
student half (``indexer_kl_bwd_kernel`` with ``PT_IN``) reads them back. ``kl_kernel``
(groups of 3 to 16 heads, not deterministic; ``fuses``) keeps them on chip and runs the
student half after each tile (each two tiles at 4 queries a tile) in the same
warpgroup: the block's index keys on chip, the index-query rows gathered into a second
ring by the loader, ``z^T = KI qi^T`` and ``dqi^T = KI^T dz`` as wgmma with the queries as
the N columns (8 or 16), the teacher rows and ``dz`` through shared memory, ``dqi`` by
fp32 atomics, the edges' ``dz`` rows stored for the ``dki`` pass. The ``tl.*`` kernel
holding both halves needs 255 registers and spills at the MiniMax-M3 shape; ``kl_kernel``
is faster than the split (measurements: docs/benchmarks.md, docs/experiments.md). A
teacher in the union form, which gathers no query rows, wrote the same rows no faster.

Applies to: Hopper, bf16 / fp16, head dim 128, blocks of 128, one KV head per index head,
a group of at most 64 heads (``supported``); the ``tl.*`` kernel elsewhere.
"""
from __future__ import annotations

import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                               warpgroup_mma, warpgroup_mma_wait)

from ..launch import on_hopper
from ..attention.gluon import (LOAD_WARPS, ROWS, TILE_L, block_smem, loader, ring_barriers,
                               rows_aligned, tile_edges, work_item)
from .gluon_student import kl_loader, student, student_cols
from ..triton_utils import next_pow2

STAGES = 4      # gathered query tiles in flight: one program per SM leaves the room


@gluon.jit
def _teacher(q_ring, k_smem, k_bar, ready, empty, PT, TLSE, POS, EDGE_Q, h, t0, nk, e0, e1,
             q0, edge0, scale_log2, stride_tl, first, G: gl.constexpr, GP: gl.constexpr,
             BS: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr,
             STEP: gl.constexpr, WARPS: gl.constexpr, qi_ring=None, ki_smem=None, pt_w=None,
             dz_w=None, ILSE=None, DQI=None, DZ=None, LOSS=None, iscale=1.0, coeff=1.0,
             stride_lh=0, STUDENT: gl.constexpr = False, NS: gl.constexpr = 8,
             HI: gl.constexpr = 1, DI: gl.constexpr = 128, PAIR: gl.constexpr = 1):
    """A warpgroup, tiles ``first, first + STEP, ...``: ``S^T = K Q^T`` (wgmma; each half
    of the block's keys as the MMA's 64 rows, the tile's query rows as its columns), ``p =
    exp(scale S - lse) / G`` over the allowed keys (``/ G`` in the exponent), summed over
    each query's ``G`` heads (``GP`` consecutive columns: two in each thread per 8, the
    rest within a lane quad; padding columns hold ``p = 0``), stored at the query's edge
    row of ``PT`` (edge ``e`` at row ``e - edge0``, the chunk's first edge). Tiles whose
    queries all see the whole block skip the mask. ``STUDENT``: the rows go to this
    warpgroup's ``pt_w [BS, NS]`` instead, and ``student`` runs the student half on them
    (``NS`` student columns: the tile's queries, padded to 8; ``k_smem`` and ``ki_smem``
    are then ``[1, BS, 128]`` and ``dz_w [2, NS, BS]``, whose slot ``first`` is this
    warpgroup's)."""
    HALF: gl.constexpr = BS // 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, ROWS, 16])
    c = gl.arange(0, ROWS, layout=gl.SliceLayout(0, mma))     # the tile's query rows
    tok = c // GP
    g = c % GP
    key = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(1, mma)), 1)
    zero = gl.zeros([HALF, ROWS], gl.float32, mma)
    # a warp stores one query's 64 consecutive floats of each half
    st: gl.constexpr = gl.BlockedLayout([2, 1], [32, 1], [1, WARPS], [0, 1])
    st_tok = gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(0, st))
    st_n = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(1, st)), 1)
    n_tiles = (e1 - e0 + BLOCK_Q - 1) // BLOCK_Q
    mbarrier.wait(k_bar, 0)
    fence_async_shared()            # cp.async wrote through the generic proxy; wgmma reads
    # each tile's queries' positions and LSEs are loaded one tile ahead: their two
    # dependent loads (the edge's query, then its rows) would otherwise wait in the chain
    # (not with one head per query: 16 queries per thread would spill at 168 registers)
    AHEAD: gl.constexpr = 1 if G > 1 else 0
    pos, lse = _tile_rows(EDGE_Q, POS, TLSE, e0, e1, q0, first * PAIR, tok, g, h, stride_tl,
                          G, BLOCK_Q)
    # STUDENT: the student runs once per PAIR tiles (their queries side by side as its
    # columns, the first tile's ring slot holding their index-query rows)
    n_units = (n_tiles + PAIR - 1) // PAIR
    n_tiles = n_units * PAIR        # the loader fills a last odd tile with masked rows
    if STUDENT:
        z_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, NS, 16])
        zero_z = gl.zeros([HALF, NS], gl.float32, z_l)
        loss = gl.zeros([HALF, NS], gl.float32, z_l)
        sc_ = gl.arange(0, NS, layout=gl.SliceLayout(0, z_l))        # the student's columns
        spos, silse, sq, sok = student_cols(EDGE_Q, POS, ILSE, e0, e1, q0, first, sc_, h,
                                            stride_lh, BLOCK_Q * PAIR)
    for u in range(first, n_units, STEP):
        if STUDENT:
            spos_n, silse_n, sq_n, sok_n = student_cols(EDGE_Q, POS, ILSE, e0, e1, q0,
                                                        u + STEP * AHEAD, sc_, h, stride_lh,
                                                        BLOCK_Q * PAIR)
            if AHEAD == 0:
                spos, silse, sq, sok = spos_n, silse_n, sq_n, sok_n
        for j in gl.static_range(PAIR):
            t = u * PAIR + j
            if j + 1 < PAIR:
                t_next = t + 1
            else:
                t_next = (u + STEP) * PAIR
            pos_n, lse_n = _tile_rows(EDGE_Q, POS, TLSE, e0, e1, q0, t + AHEAD * (t_next - t),
                                      tok, g, h, stride_tl, G, BLOCK_Q)
            if AHEAD == 0:
                pos, lse = pos_n, lse_n
            whole = (nk == BS) & (t0 + BS - 1 <= gl.min(pos, 0))
            s = t % STAGES
            mbarrier.wait(ready.index(s), (t // STAGES) & 1)
            fence_async_shared()
            q_t = q_ring.index(s).permute((1, 0))
            if STUDENT:
                # views offset by a zero the compiler cannot prove (as in the backward):
                # made before the loop, their wgmma descriptors stay live and spill
                z = t // n_tiles
                k_t = k_smem.index(z)
            else:
                k_t = k_smem
            lo = warpgroup_mma(k_t.slice(0, HALF), q_t, zero, use_acc=False, is_async=True)
            hi = warpgroup_mma(k_t.slice(HALF, HALF), q_t, zero, use_acc=False,
                               is_async=True)
            se = e0 + t * BLOCK_Q + st_tok
            rows = PT + gl.expand_dims((se - edge0).to(gl.int64), 0) * BS + st_n
            smask = gl.expand_dims(se < e1, 0)
            lse2 = gl.expand_dims(lse, 0)
            if STUDENT and j == 0:   # z^T = KI qi^T, each half of the index keys as MMA rows
                ki_t = ki_smem.index(z)
                dz_t = dz_w.index(first + z)
                qi_t = qi_ring.index(s).permute((1, 0))
                zl = warpgroup_mma(ki_t.slice(0, HALF), qi_t, zero_z, use_acc=False,
                                   is_async=True)
                zh = warpgroup_mma(ki_t.slice(HALF, HALF), qi_t, zero_z, use_acc=False,
                                   is_async=True)
                lo = warpgroup_mma_wait(3, deps=[lo])       # the first half under the rest
                pt = _head_means(lo, lse2, whole, key, pos, t0, nk, scale_log2, rows, smask,
                                 G, GP, BLOCK_Q, HALF, st, True)
                pt_w.slice(0, HALF).slice(0, BLOCK_Q, dim=1).store(pt)
                hi, zl, zh = warpgroup_mma_wait(0, deps=[hi, zl, zh])
            else:
                lo = warpgroup_mma_wait(1, deps=[lo])       # the first half under the second
                pt = _head_means(lo, lse2, whole, key, pos, t0, nk, scale_log2, rows, smask,
                                 G, GP, BLOCK_Q, HALF, st, STUDENT)
                if STUDENT:
                    pt_w.slice(0, HALF).slice(j * BLOCK_Q, BLOCK_Q, dim=1).store(pt)
                hi = warpgroup_mma_wait(0, deps=[hi])
            mbarrier.arrive(empty.index(s), count=1)
            pt = _head_means(hi, lse2, whole, key + HALF, pos, t0, nk, scale_log2,
                             rows + HALF, smask, G, GP, BLOCK_Q, HALF, st, STUDENT)
            if STUDENT:
                pt_w.slice(HALF, HALF).slice(j * BLOCK_Q, BLOCK_Q, dim=1).store(pt)
            pos, lse = pos_n, lse_n
        if STUDENT:
            loss = student(zl, zh, pt_w, dz_t, ki_t, DZ, DQI, loss, spos, silse, sq, sok,
                           e0 + u * BLOCK_Q * PAIR, e1, edge0, t0, nk, h, iscale, coeff, HI,
                           DI, BS, NS, BLOCK_Q * PAIR, WARPS)
            spos, silse, sq, sok = spos_n, silse_n, sq_n, sok_n
    if STUDENT:
        gl.atomic_add(LOSS, gl.sum(gl.sum(loss, 1), 0) * coeff, sem="relaxed")


@gluon.jit
def _tile_rows(EDGE_Q, POS, TLSE, e0, e1, q0, t, tok, g, h, stride_tl, G: gl.constexpr,
               BLOCK_Q: gl.constexpr):
    """Tile ``t``'s columns (query ``tok``, head ``g``): the query's position (``2^30`` off
    the tile: such a column masks nothing), its LSE in log2 units less ``log2(G)`` (the
    exponentials come divided by ``G``; ``+inf`` for padding heads, columns off the tile
    and queries that see no key: ``p = 0``)."""
    e, emask, ql = tile_edges(EDGE_Q, e0, e1, t, tok, BLOCK_Q)
    pos = gl.load(POS + q0 + ql, mask=emask, other=1 << 30)
    lse = gl.load(TLSE + (q0 + ql) * stride_tl + h * G + g, mask=emask & (g < G),
                  other=float("inf"))
    lse = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634 \
        + math.log2(G)
    return pos, lse


@gluon.jit
def _head_means(sc, lse, whole, key, pos, t0, nk, scale_log2, rows, smask, G: gl.constexpr,
                GP: gl.constexpr, BLOCK_Q: gl.constexpr, HALF: gl.constexpr,
                st: gl.constexpr, KEEP: gl.constexpr = False):
    """Half a block's teacher rows: ``sc [HALF keys, ROWS]`` -> ``p``, the mean over each
    query's heads, stored at ``rows [HALF, BLOCK_Q]`` (layout ``st``), or returned
    (``KEEP``)."""
    if whole:
        p = gl.exp2(sc * scale_log2 - lse)
    else:
        allowed = ((t0 + key) <= gl.expand_dims(pos, 0)) & (key < nk)
        p = gl.where(allowed, gl.exp2(sc * scale_log2 - lse), 0.0)
    pt = gl.sum(gl.reshape(p, [HALF, BLOCK_Q, GP]), 2)
    if not KEEP:
        gl.store(rows, gl.convert_layout(pt, st), mask=smask)
    return pt


@gluon.jit
def teacher_kernel(Q, K, PT, TLSE, POS, EDGE_Q, ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK,
                   ITEM_E0, ITEM_E1, q0, edge0, scale_log2, stride_qt, stride_qh, stride_kt,
                   stride_kh, stride_tl, G: gl.constexpr, D: gl.constexpr, BS: gl.constexpr,
                   BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, LOAD_WARPS: gl.constexpr,
                   num_warps: gl.constexpr, GP: gl.constexpr):
    """One program per work item of the KL plan (index head = KV head ``h``, block, its
    edges ``e0 .. e1``): ``PT [e - edge0, :]`` for each edge, in tiles of ``BLOCK_Q``
    queries of ``GP`` rows (``G`` heads, padded to a power of two)."""
    h, krow, t0, nk, e0, e1 = work_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                                        ITEM_E1, gl.program_id(0))
    q_ring, k_smem, _ = block_smem(Q, K, K, STAGES, D, BS, WITH_V=False)
    k_bar, ready, empty = ring_barriers(STAGES, LOAD_WARPS, 1)
    fence_async_shared()
    gl.warp_specialize([
        (_teacher, (q_ring, k_smem, k_bar, ready, empty, PT, TLSE, POS, EDGE_Q, h, t0, nk,
                    e0, e1, q0, edge0, scale_log2, stride_tl, 0, G, GP, BS, BLOCK_Q, STAGES,
                    2, num_warps)),
        (_teacher, (q_ring, k_smem, k_bar, ready, empty, PT, TLSE, POS, EDGE_Q, h, t0, nk,
                    e0, e1, q0, edge0, scale_log2, stride_tl, 1, G, GP, BS, BLOCK_Q, STAGES,
                    2, 4)),
        (loader, (Q, K, K, EDGE_Q, q_ring, k_smem, k_smem, k_bar, ready, empty, h, krow, nk,
                 e0, e1, q0, stride_qt, stride_qh, stride_kt, stride_kh, stride_kt, stride_kh,
                 G, D, BS, BLOCK_Q, STAGES, LOAD_WARPS, False, None, None, 0, 0, GP))],
        [4, LOAD_WARPS], [200, 72])


@gluon.jit
def kl_kernel(Q, K, QI, KI, TLSE, ILSE, DQI, DZ, LOSS, POS, EDGE_Q, ITEM_H, ITEM_KROW,
              ITEM_T0, ITEM_NK, ITEM_E0, ITEM_E1, q0, edge0, scale_log2, iscale, coeff,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_tl, stride_it, stride_ih,
              stride_kit, stride_lh, G: gl.constexpr, D: gl.constexpr, DI: gl.constexpr,
              BS: gl.constexpr, BLOCK_Q: gl.constexpr, NS: gl.constexpr, HI: gl.constexpr,
              STAGES: gl.constexpr, LOAD_WARPS: gl.constexpr, num_warps: gl.constexpr,
              GP: gl.constexpr, PAIR: gl.constexpr = 1, REGS: gl.constexpr = 200,
              LOAD_REGS: gl.constexpr = 72):
    """Teacher and student in one program per work item of the KL plan: ``teacher_kernel``
    with ``student`` after each tile (its rows stay on chip): ``dqi`` (fp32 atomics into
    ``DQI``), the edges' ``dz`` rows (``DZ [e - edge0, :]``, for ``kl_dki_kernel``) and the
    loss (``LOSS``, fp32 atomic). ``QI [total_q, HI, DI]``, ``KI [total_k, DI]``, ``ILSE
    [HI, total_q]`` (the indexer's selected LSE)."""
    h, krow, t0, nk, e0, e1 = work_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                                        ITEM_E1, gl.program_id(0))
    q_ring = gl.allocate_shared_memory(Q.dtype.element_ty, [STAGES, ROWS, D], TILE_L)
    k_smem = gl.allocate_shared_memory(K.dtype.element_ty, [1, BS, D], TILE_L)
    qi_ring = gl.allocate_shared_memory(QI.dtype.element_ty, [STAGES, NS, DI], TILE_L)
    ki_smem = gl.allocate_shared_memory(KI.dtype.element_ty, [1, BS, DI], TILE_L)
    scratch: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    pt_s = gl.allocate_shared_memory(gl.float32, [2, BS, NS], scratch)     # per warpgroup
    dz_s = gl.allocate_shared_memory(QI.dtype.element_ty, [2, NS, BS], TILE_L)
    k_bar, ready, empty = ring_barriers(STAGES, LOAD_WARPS, 1)
    fence_async_shared()
    gl.warp_specialize([
        (_teacher, (q_ring, k_smem, k_bar, ready, empty, DZ, TLSE, POS, EDGE_Q, h, t0, nk,
                    e0, e1, q0, edge0, scale_log2, stride_tl, 0, G, GP, BS, BLOCK_Q, STAGES,
                    2, num_warps, qi_ring, ki_smem, pt_s.index(0), dz_s, ILSE, DQI,
                    DZ, LOSS, iscale, coeff, stride_lh, True, NS, HI, DI, PAIR)),
        (_teacher, (q_ring, k_smem, k_bar, ready, empty, DZ, TLSE, POS, EDGE_Q, h, t0, nk,
                    e0, e1, q0, edge0, scale_log2, stride_tl, 1, G, GP, BS, BLOCK_Q, STAGES,
                    2, 4, qi_ring, ki_smem, pt_s.index(1), dz_s, ILSE, DQI, DZ,
                    LOSS, iscale, coeff, stride_lh, True, NS, HI, DI, PAIR)),
        (kl_loader, (Q, K, QI, KI, EDGE_Q, q_ring, k_smem.index(0), qi_ring, ki_smem.index(0),
                     k_bar, ready, empty, h, krow, nk, e0, e1, q0, stride_qt, stride_qh,
                     stride_kt, stride_kh, stride_it, stride_ih, stride_kit, G, GP, D, DI, BS,
                     BLOCK_Q, NS, STAGES, LOAD_WARPS, PAIR))],
        [4, LOAD_WARPS], [REGS, LOAD_REGS])


def supported(q: torch.Tensor, k: torch.Tensor, hi: int, block_size: int) -> bool:
    """Whether ``teacher_kernel`` runs these inputs (``q [total_q, Hq, D]``, ``k [total_k,
    Hkv, D]``, ``hi`` index heads): a Hopper GPU (sm_90), bf16 / fp16, head dim 128,
    blocks of 128, ``Hkv == Hi``, a group of at most 64 heads, rows 16-byte aligned."""
    if not on_hopper(q):
        return False
    g = q.shape[1] // k.shape[1]
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
            and q.shape[2] == 128 and block_size == 128 and k.shape[1] == hi
            and g <= ROWS.value and rows_aligned(q, k))


def _require(q, k, hi: int, block_size: int) -> None:
    if not supported(q, k, hi, block_size):
        raise NotImplementedError(
            "the Gluon KL teacher runs on Hopper (sm_90) with bf16 / fp16, head dim 128, "
            "blocks of 128, one KV head per index head, at most 64 heads per group and "
            "16-byte aligned rows; use kernel='triton'")


def launch(q, k, teacher_lse, q_pos, plan, q0: int, pt, *, scale_log2: float,
           block_size: int) -> None:
    """``teacher_kernel`` over one chunk's plan into ``pt [plan.num_edges, block_size]``
    (fp32); ``teacher_lse [total_q, Hq]`` fp32. Raises ``NotImplementedError`` where the
    kernel does not apply (``supported``)."""
    _require(q, k, int(plan.num_heads), block_size)
    g = q.shape[1] // k.shape[1]
    gp = next_pow2(g)                       # rows per query: the group, padded
    teacher_kernel[(plan.num_items,)](
        q, k, pt, teacher_lse, q_pos, plan.edge_q, plan.item_h, plan.item_krow,
        plan.item_t0, plan.item_nk, plan.item_e0, plan.item_e1, q0, plan.edge0, scale_log2,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), teacher_lse.stride(0), G=g,
        D=q.shape[2], BS=block_size, BLOCK_Q=ROWS.value // gp, STAGES=STAGES,
        LOAD_WARPS=LOAD_WARPS, num_warps=4, GP=gp)


def fuses(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, ki2: torch.Tensor) -> bool:
    """Whether ``kl_kernel`` (teacher and student in one kernel) runs these inputs, where
    ``supported`` holds: index queries and keys of q's dtype, index head dim 128, rows
    16-byte aligned, and 4 to 16 rows per query (``G`` from 3 to 16: 16, 8 or 4 queries a
    tile). At 4 queries a tile the student runs once per two tiles: once per tile, its
    chain (two barriers, shared-memory round trips, a wgmma wait, atomics) made the KL at
    the MiniMax-M3 shape slower than the separate Triton student (docs/experiments.md).
    With fewer rows per query (32 or 64 queries a tile) its columns would not fit the
    registers."""
    return (qi.dtype == q.dtype and ki2.dtype == q.dtype and qi.shape[2] == 128
            and 4 <= next_pow2(q.shape[1] // k.shape[1]) <= 16 and rows_aligned(qi, ki2))


def launch_kl(q, k, qi, ki2, teacher_lse, indexer_lse, q_pos, plan, q0: int, dqi, dz, loss,
              *, scale_log2: float, index_scale: float, coeff: float, block_size: int) -> None:
    """``kl_kernel`` over one chunk's plan: adds the chunk's ``dqi`` into ``dqi [total_q,
    Hi, 128]`` and its loss terms (times ``coeff``) into ``loss`` (fp32, atomics), and
    writes its edges' ``dz`` rows into ``dz [plan.num_edges, block_size]`` (qi's dtype).
    ``qi [total_q, Hi, 128]``, ``ki2 [total_k, 128]``, ``teacher_lse [total_q, Hq]`` and
    ``indexer_lse [Hi, total_q]`` fp32. Needs ``fuses``; raises ``NotImplementedError``
    where ``supported`` does not hold."""
    _require(q, k, int(plan.num_heads), block_size)
    if not fuses(q, k, qi, ki2):
        raise NotImplementedError("the fused Gluon KL needs index queries and keys of q's "
                                  "dtype, index head dim 128, 16-byte aligned rows and "
                                  "groups of 3 to 16 heads")
    g = q.shape[1] // k.shape[1]
    gp = next_pow2(g)
    block_q = ROWS.value // gp
    pair = max(1, 8 // block_q)             # the student's columns: 8 or 16 queries
    kl_kernel[(plan.num_items,)](
        q, k, qi, ki2, teacher_lse, indexer_lse, dqi, dz, loss, q_pos, plan.edge_q,
        plan.item_h, plan.item_krow, plan.item_t0, plan.item_nk, plan.item_e0, plan.item_e1,
        q0, plan.edge0, scale_log2, index_scale, coeff, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), teacher_lse.stride(0), qi.stride(0), qi.stride(1),
        ki2.stride(0), indexer_lse.stride(0), G=g, D=q.shape[2], DI=qi.shape[2],
        BS=block_size, BLOCK_Q=block_q, NS=block_q * pair, HI=qi.shape[1], STAGES=STAGES,
        LOAD_WARPS=LOAD_WARPS, num_warps=4, GP=gp, PAIR=pair,
        REGS=216 if pair > 1 else 200, LOAD_REGS=56 if pair > 1 else 72)   # the fewest spills
