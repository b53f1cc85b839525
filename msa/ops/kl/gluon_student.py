"""The student half of the indexer KL in Gluon for Hopper (sm_90), run inside
``msa.ops.kl.gluon.kl_kernel`` after the teacher's tiles: per tile (or pair of tiles) of
a work item's edges, ``z^T = KI qi^T`` (the student's index scores, wgmma with the
queries as N), ``dz = coeff (p_student - p_teacher)`` from the teacher rows the warpgroup
left in shared memory, ``dqi^T = KI^T dz`` (wgmma, fp32 atomics), the edges' ``dz`` rows
for ``kl_dki_kernel`` and the loss terms; and the kernel's loader, which gathers the
index-query rows beside the teacher's query rows (docs/semantics.md, "Indexer KL").
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere.async_copy import (
    async_copy_global_to_shared, mbarrier_arrive)
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                               warpgroup_mma, warpgroup_mma_wait)

from ..attention.gluon import load_rows, tile_edges, tile_offsets


@gluon.jit
def student_cols(EDGE_Q, POS, ILSE, e0, e1, q0, t, c, h, stride_lh, BLOCK_Q: gl.constexpr):
    """Tile ``t``'s student columns ``c`` (its queries, then padding): each query's
    position (``-1`` off the tile: such a column sees no key), its selected index LSE
    (``+inf`` where it sees no key), global row (int64) and whether it is on the tile."""
    e, ok, ql = tile_edges(EDGE_Q, e0, e1, t, c, BLOCK_Q)
    qg = q0 + ql
    pos = gl.load(POS + qg, mask=ok, other=-1)
    ilse = gl.load(ILSE + h * stride_lh + qg, mask=ok, other=float("inf"))
    return pos, gl.where(ilse == float("-inf"), float("inf"), ilse), qg, ok


@gluon.jit
def student(zl, zh, pt_w, dz_w, ki_smem, DZ, DQI, loss, spos, silse, sq, sok, et, e1, edge0,
            t0, nk, h, iscale, coeff, HI: gl.constexpr, DI: gl.constexpr, BS: gl.constexpr,
            NS: gl.constexpr, BLOCK_Q: gl.constexpr, WARPS: gl.constexpr):
    """The student half of a tile (edges ``et ..``), from its index scores ``zl, zh [HALF
    keys, NS]`` (``z^T = KI qi^T``) and the teacher rows this warpgroup left in ``pt_w [BS,
    NS]``: ``dz = coeff (p_student - p_teacher)`` (to ``dz_w [NS, BS]`` in the index dtype,
    then to the edges' ``DZ`` rows for the ``dki`` pass), ``dqi^T = iscale KI^T dz`` (wgmma,
    fp32 atomics into ``DQI [total_q, HI, DI]``) and the loss terms ``p_t (log p_t - log
    p_s)`` summed into ``loss``, the Triton kernel's ``PT_IN`` half."""
    HALF: gl.constexpr = BS // 2
    z_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, NS, 16])
    gl.thread_barrier()                         # every thread's teacher rows are in pt_w
    key = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(1, z_l)), 1)
    pos = gl.expand_dims(spos, 0)
    ilse = gl.expand_dims(silse, 0)
    loss = _student_half(zl, pt_w.slice(0, HALF), dz_w.slice(0, HALF, dim=1), loss, key,
                         pos, ilse, t0, nk, iscale, coeff, z_l)
    loss = _student_half(zh, pt_w.slice(HALF, HALF), dz_w.slice(HALF, HALF, dim=1), loss,
                         key + HALF, pos, ilse, t0, nk, iscale, coeff, z_l)
    fence_async_shared()                        # generic stores, then wgmma reads
    gl.thread_barrier()
    zero = gl.zeros([HALF, NS], gl.float32, z_l)
    dz_t = dz_w.permute((1, 0))                                     # [BS keys, NS]
    da = warpgroup_mma(ki_smem.slice(0, HALF, dim=1).permute((1, 0)), dz_t, zero,
                       use_acc=False, is_async=True)               # index dims 0 .. HALF
    db = warpgroup_mma(ki_smem.slice(HALF, HALF, dim=1).permute((1, 0)), dz_t, zero,
                       use_acc=False, is_async=True)
    # the edges' dz rows (contiguous, keys fastest) while the MMAs run
    st: gl.constexpr = gl.BlockedLayout([1, 8], [NS // WARPS, 32 * WARPS // NS], [WARPS, 1],
                                        [1, 0])
    c = gl.arange(0, NS, layout=gl.SliceLayout(1, st))
    e = et + c
    n = gl.expand_dims(gl.arange(0, BS, layout=gl.SliceLayout(0, st)), 0)
    gl.store(DZ + gl.expand_dims((e - edge0).to(gl.int64), 1) * BS + n, dz_w.load(st),
             mask=gl.expand_dims((c < BLOCK_Q) & (e < e1), 1))
    da, db = warpgroup_mma_wait(0, deps=[da, db])
    d = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(1, z_l)), 1)
    row = DQI + gl.expand_dims(sq * (HI * DI) + h * DI, 0) + d
    ok = gl.expand_dims(sok, 0)
    gl.atomic_add(row, da * iscale, mask=ok, sem="relaxed")
    gl.atomic_add(row + HALF, db * iscale, mask=ok, sem="relaxed")
    return loss


@gluon.jit
def _student_half(z, pt_s, dz_s, loss, key, pos, ilse, t0, nk, iscale, coeff, z_l: gl.constexpr):
    """Half a block's keys (``key [HALF, 1]``) of ``student``: the teacher rows from
    ``pt_s [HALF, NS]``, ``dz`` into ``dz_s [NS, HALF]``; returns ``loss`` plus the terms."""
    allowed = ((t0 + key) <= pos) & (key < nk)          # padding columns have pos -1
    pt = gl.where(allowed, pt_s.load(z_l), 0.0)
    lps = z * iscale - ilse                             # log of the student's probability
    ps = gl.where(allowed, gl.exp2(lps * 1.4426950408889634), 0.0)
    loss += gl.where(pt > 0, pt * (gl.log(gl.where(pt > 0, pt, 1.0)) - lps), 0.0)
    dz_s.store(gl.permute((coeff * (ps - pt)).to(dz_s.dtype), (1, 0)))
    return loss


@gluon.jit
def kl_loader(Q, K, QI, KI, EDGE_Q, q_ring, k_smem, qi_ring, ki_smem, k_bar, ready, empty, h,
              krow, nk, e0, e1, q0, stride_qt, stride_qh, stride_kt, stride_kh, stride_it,
              stride_ih, stride_kit, G: gl.constexpr, GP: gl.constexpr, D: gl.constexpr,
              DI: gl.constexpr, BS: gl.constexpr, BLOCK_Q: gl.constexpr, NS: gl.constexpr,
              STAGES: gl.constexpr, WARPS: gl.constexpr, PAIR: gl.constexpr):
    """The fused kernel's loader: the block's keys and index keys (``k_bar``), then per
    tile its ``GP`` query rows per query (``tile_offsets``) into ring slot ``t % STAGES``,
    and with the first tile of every ``PAIR`` the ``NS`` index-query rows of their queries
    (head ``h``; rows past them zero). A last odd tile of a pair comes masked (zeros)."""
    load_rows(k_smem, K, krow, nk, h, 0, stride_kt, stride_kh, BS, D, WARPS)
    load_rows(ki_smem, KI, krow, nk, 0, 0, stride_kit, 0, BS, DI, WARPS)
    mbarrier_arrive(k_bar, increment_count=False)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [NS // WARPS, 32 * WARPS // NS], [WARPS, 1],
                                        [1, 0])
    cols = gl.expand_dims(gl.arange(0, DI, layout=gl.SliceLayout(0, ld)), 0)
    r = gl.arange(0, NS, layout=gl.SliceLayout(1, ld))
    n_units = (e1 - e0 + BLOCK_Q * PAIR - 1) // (BLOCK_Q * PAIR)
    for u in range(n_units):
        for j in gl.static_range(PAIR):
            t = u * PAIR + j
            s = t % STAGES
            mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)
            offs, mask = tile_offsets(EDGE_Q, e0, e1, q0, t, h, stride_qt, stride_qh, G, D,
                                      BLOCK_Q, WARPS, GP)
            async_copy_global_to_shared(q_ring.index(s), Q + offs, mask=mask)
            if j == 0:
                _, ok, ql = tile_edges(EDGE_Q, e0, e1, u, r, BLOCK_Q * PAIR)
                rows = gl.expand_dims((q0 + ql) * stride_it + h * stride_ih, 1)
                async_copy_global_to_shared(qi_ring.index(s), QI + rows + cols,
                                            mask=gl.expand_dims(ok, 1))
            mbarrier_arrive(ready.index(s), increment_count=False)
