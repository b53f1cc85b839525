"""Gluon KV-outer sparse attention backward for Hopper (sm_90): ``bwd_kernel``, the
backward's kernel there (``msa.ops.attention.backward.backward_kernel``), with the Triton
backward's contract (``msa.ops.attention.backward``) and the gathered rows loaded by
warps of their own.

One program per work item (KV head, KV block of 128 keys, slice of the queries that
selected it; bf16 / fp16, head dim 128). A loader partition (4 warps) gathers the block's
K and V, then each tile's 64 rows (``64 // G`` queries x the ``G`` heads of the group)
of Q and dO, into a ring of shared-memory slots with ``cp.async``. Two attention
warpgroups own 64 keys each and take every tile, with the query rows as the MMA rows (so
the row statistics ``lse``, ``delta`` and positions stay two values per thread):

    S = Q K_w^T,  dP = dO V_w^T,  P = exp(S - lse),  dS = P (dP - delta)
    dV_w += P^T dO,  dK_w += dS^T Q   (P and dS through shared memory, read transposed)
    dQ[:, cols_w] = dS_0 K_0[:, cols_w] + dS_1 K_1[:, cols_w]   (both warpgroups' dS)

The MMAs are issued asynchronously: S with dP, then dV, dK and dQ. With ``EARLY_DV``
(groups of 8 heads or more) P's exponentials run under dP and dV under dS; with fewer
heads that order spills more and was slower (docs/experiments.md). ``dQ`` goes to one
slot per (query, KV head, top-k slot) in the dtype of q, summed by the Triton
``dq_sum_kernel``; ``dK``/``dV`` leave once per program by fp32 atomics, or
(deterministic) into one slot per work item, as in the Triton backward.

With ``TEACHER`` (``launch(..., teacher_rows=pt)``) the kernel also writes the indexer
KL's teacher rows (docs/semantics.md, "Indexer KL"): one more wgmma ``P^T E`` per tile,
``E [64 rows, NPT]`` a constant in shared memory with a one where a row is one of the
query's heads, gives each query's head sum over the warpgroup's 64 keys, stored as fp32
``PT [edge - edge0, key] = mean over the G heads of P`` (``P`` rounded to the inputs'
dtype, as it reaches ``dV``). The KL's student then runs on these rows
(``msa.ops.kl.deferred``) and no kernel recomputes ``P`` for the KL. The rows' MMA is
waited with the tile's last wait and the rows stored after ``dQ``, out of the path from
``dP`` to ``dS`` (docs/experiments.md). Its times against the Triton backward are in
docs/benchmarks.md.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                               warpgroup_mma, warpgroup_mma_wait)

from ..triton_utils import next_pow2
from .gluon import ROWS, loader, ring_barriers, tile_edges, work_item

STAGES = 2              # gathered (Q, dO) tiles in flight (32 KB each)
LOAD_WARPS = 4
HALF = gl.constexpr(64)  # keys per attention warpgroup
EARLY_DV_GROUP = 8      # smallest group issuing dV before dS
TEACHER_GROUPS = (4, 64)  # groups whose tiles write the KL's teacher rows (teaches)


def teaches(g: int) -> bool:
    """Whether ``bwd_kernel`` writes the KL's teacher rows for groups of ``g`` heads
    (below 4 the rows' accumulator, 64 // g queries wide, would hold more registers than
    the warpgroups have spare)."""
    return TEACHER_GROUPS[0] <= g <= TEACHER_GROUPS[1]


@gluon.jit
def _store_teacher(pt, PT, edge0, e0, e1, t, W: gl.constexpr, G: gl.constexpr,
                   BS: gl.constexpr, BLOCK_Q: gl.constexpr, NPT: gl.constexpr,
                   pt_l: gl.constexpr):
    """Tile ``t``'s teacher rows: ``pt [64 keys, NPT queries]`` (head sums) / G to
    ``PT [(e - edge0), W * 64 + key]`` for the tile's edges ``e``."""
    n = gl.arange(0, NPT, layout=gl.SliceLayout(0, pt_l))
    key = W * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, pt_l))
    e = e0 + t * BLOCK_Q + n
    off = gl.expand_dims((e - edge0).to(gl.int64) * BS, 0) + gl.expand_dims(key, 1)
    mask = gl.expand_dims(key < BS, 1) & gl.expand_dims((n < BLOCK_Q) & (e < e1), 0)
    gl.store(PT + off, pt * (1.0 / G), mask=mask)


@gluon.jit
def _teacher_mma(p_w, e_smem, NPT: gl.constexpr, pt_l: gl.constexpr):
    """Issue ``P^T E`` (asynchronous): the tile's head sums ``[64 keys, NPT queries]`` from
    the warpgroup's ``P [64 rows, 64 keys]`` in shared memory."""
    return warpgroup_mma(p_w.permute((1, 0)), e_smem.permute((1, 0)),
                         gl.zeros([HALF, NPT], gl.float32, pt_l), use_acc=False, is_async=True)


@gluon.jit
def _grads(q_ring, do_ring, k_smem, v_smem, p_smem, ds_smem, e_smem, kv_bar, ready, empty,
           ds_ready, ds_free, LSE, DELTA, DQ, DK, DV, PT, POS, EDGE_Q, EDGE_SLOT, pid, h,
           krow, t0, nk, e0, e1, q0, edge0, scale, scale_log2, stride_lt, W: gl.constexpr,
           HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr,
           BS: gl.constexpr, TOPK: gl.constexpr, BLOCK_Q: gl.constexpr,
           STAGES: gl.constexpr, DET: gl.constexpr, EARLY_DV: gl.constexpr,
           TEACHER: gl.constexpr, NPT: gl.constexpr, WARPS: gl.constexpr):
    """Attention warpgroup ``W``: keys ``W * 64 ..`` of the block for ``S, dP, dK, dV``
    and columns ``W * 64 ..`` of ``dQ`` (over all 128 keys: it reads both warpgroups' dS
    from shared memory, ``ds_ready`` / ``ds_free``), every tile. The MMAs run
    asynchronously: ``S`` with ``dP``, then ``dV``, ``dK`` and ``dQ`` (``EARLY_DV``: ``P``
    computed under ``dP``, ``dV`` issued before ``dS`` is computed). ``TEACHER``: the
    rows' ``P^T E`` is issued before ``dV`` and waited with the tile's last wait."""
    M: gl.constexpr = ROWS
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, HALF, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, D, 16])
    pt_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                   instr_shape=[16, NPT, 16])
    st: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    st_h: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [WARPS, 1], [1, 0])
    rows_l: gl.constexpr = gl.SliceLayout(1, s_l)
    r = gl.arange(0, M, layout=rows_l)
    tok = r // G
    g = r % G
    dk = gl.zeros([HALF, D], gl.float32, o_l)
    dv = gl.zeros([HALF, D], gl.float32, o_l)
    key = W * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, s_l))
    st_c = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(0, st_h)), 0)
    n_tiles = (e1 - e0 + BLOCK_Q - 1) // BLOCK_Q
    mbarrier.wait(kv_bar, 0)
    fence_async_shared()            # cp.async wrote through the generic proxy; wgmma reads
    for t in range(n_tiles):
        s = t % STAGES
        # The block's views are taken here, offset by a zero the compiler cannot prove
        # (z): made once before the loop, their ~40 wgmma descriptors (64 bits each)
        # were kept live and spilled to local memory (ptxas: 784 -> 196 bytes).
        z = t // n_tiles
        k_w = k_smem.index(z).slice(W * HALF, HALF, dim=0)      # [64 keys, D]
        v_w = v_smem.index(z).slice(W * HALF, HALF, dim=0)
        p_w = p_smem.index(W + z)                               # [M, 64 keys]
        ds_w = ds_smem.index(W + z)
        kc = k_smem.index(z).slice(W * HALF, HALF, dim=1)       # [128 keys, its 64 columns]
        e, emask, ql = tile_edges(EDGE_Q, e0, e1, t, tok, BLOCK_Q)
        qg = q0 + ql
        head = h * G + g
        pos = gl.load(POS + qg, mask=emask, other=-1)
        lse = gl.load(LSE + qg * stride_lt + head, mask=emask, other=float("inf"))
        lse = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = gl.load(DELTA + qg * stride_lt + head, mask=emask, other=0.0)
        mbarrier.wait(ready.index(s), (t // STAGES) & 1)
        fence_async_shared()
        zero_s = gl.zeros([M, HALF], gl.float32, s_l)      # made here: not live across tiles
        q_s = q_ring.index(s)
        do_s = do_ring.index(s)
        sc = warpgroup_mma(q_s, k_w.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_s, v_w.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        if EARLY_DV:
            sc = warpgroup_mma_wait(1, deps=[sc])            # P's exponentials under dP
        else:
            sc, dp = warpgroup_mma_wait(0, deps=[sc, dp])
        allowed = (gl.expand_dims(t0 + key, 0) <= gl.expand_dims(pos, 1)) & \
            gl.expand_dims(key < nk, 0)
        p = gl.where(allowed, gl.exp2(sc * scale_log2 - gl.expand_dims(lse, 1)), 0.0)
        # dV += P^T dO, dK += dS^T Q: P and dS read transposed as the A operand
        if EARLY_DV:        # dV under dS (P's slot: only this warpgroup's last dV read it)
            p_w.store(p.to(p_w.dtype))
            fence_async_shared()
            gl.thread_barrier()
            if TEACHER:
                pt = _teacher_mma(p_w, e_smem, NPT, pt_l)
            dv = warpgroup_mma(p_w.permute((1, 0)), do_s, dv, is_async=True)
            if TEACHER:
                dp = warpgroup_mma_wait(2, deps=[dp])       # P^T E and dV in flight
            else:
                dp = warpgroup_mma_wait(1, deps=[dp])
        ds = p * (dp - gl.expand_dims(delta, 1))
        mbarrier.wait(ds_free, (t & 1) ^ 1)                  # both read the last tile's dS
        if not EARLY_DV:
            p_w.store(p.to(p_w.dtype))
        ds_w.store(ds.to(ds_w.dtype))
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(ds_ready, count=1)
        if not EARLY_DV:
            if TEACHER:
                pt = _teacher_mma(p_w, e_smem, NPT, pt_l)
            dv = warpgroup_mma(p_w.permute((1, 0)), do_s, dv, is_async=True)
        dk = warpgroup_mma(ds_w.permute((1, 0)), q_s, dk, is_async=True)
        slot = gl.load(EDGE_SLOT + e, mask=emask, other=0)
        sidx = ((ql * HKV + h) * TOPK + slot) * G + g
        sidx = gl.expand_dims(gl.convert_layout(sidx, gl.SliceLayout(1, st_h)), 1)
        smask = gl.expand_dims(gl.convert_layout(emask, gl.SliceLayout(1, st_h)), 1)
        mbarrier.wait(ds_ready, t & 1)                       # the other warpgroup's dS
        fence_async_shared()
        dq = warpgroup_mma(ds_smem.index(z), kc.slice(0, HALF, dim=0), zero_s, use_acc=False,
                           is_async=True)
        dq = warpgroup_mma(ds_smem.index(1 + z), kc.slice(HALF, HALF, dim=0), dq, is_async=True)
        if TEACHER:
            dv, dk, dq, pt = warpgroup_mma_wait(0, deps=[dv, dk, dq, pt])
        else:
            dv, dk, dq = warpgroup_mma_wait(0, deps=[dv, dk, dq])
        mbarrier.arrive(empty.index(s), count=1)             # Q and dO of slot s are read
        mbarrier.arrive(ds_free, count=1)
        dq = gl.convert_layout((dq * scale).to(DQ.dtype.element_ty), st_h)
        gl.store(DQ + sidx * D + W * HALF + st_c, dq, mask=smask)
        if TEACHER:
            _store_teacher(pt, PT, edge0, e0, e1, t, W, G, BS, BLOCK_Q, NPT, pt_l)
    krl: gl.constexpr = gl.SliceLayout(1, st)
    st_d = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, st)), 0)
    n = W * HALF + gl.arange(0, HALF, layout=krl)
    nmask = gl.expand_dims(n < nk, 1)
    dk = gl.convert_layout(dk * scale, st)
    dv = gl.convert_layout(dv, st)
    if DET:
        off = gl.expand_dims(pid.to(gl.int64) * BS + n, 1) * D + st_d
        gl.store(DK + off, dk, mask=nmask)
        gl.store(DV + off, dv, mask=nmask)
    else:
        off = gl.expand_dims((krow + n) * (HKV * D) + h * D, 1) + st_d   # contiguous fp32
        gl.atomic_add(DK + off, dk, mask=nmask, sem="relaxed")
        gl.atomic_add(DV + off, dv, mask=nmask, sem="relaxed")


@gluon.jit
def bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, PT, POS, EDGE_Q, EDGE_SLOT, ITEM_H,
               ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0, ITEM_E1, q0, edge0, scale, scale_log2,
               stride_qt, stride_qh, stride_dt, stride_dh, stride_kt, stride_kh, stride_vt,
               stride_vh, stride_lt, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr,
               BS: gl.constexpr, TOPK: gl.constexpr, BLOCK_Q: gl.constexpr,
               STAGES: gl.constexpr, DET: gl.constexpr, EARLY_DV: gl.constexpr,
               TEACHER: gl.constexpr, NPT: gl.constexpr, LOAD_WARPS: gl.constexpr,
               num_warps: gl.constexpr):
    """One program per work item of the plan: its block's K and V in shared memory, its
    edges ``e0 .. e1`` in tiles of ``BLOCK_Q`` queries. ``Q, DO``: ``[total_q, Hq, D]``;
    ``LSE, DELTA``: ``[total_q, Hq]`` fp32; ``DQ``: slots; ``DK, DV``: fp32
    ``[total_k, Hkv, D]`` (atomics) or ``[items, BS, D]`` (``DET``). ``TEACHER``: the
    KL's teacher rows to ``PT [chunk edges, BS]`` fp32 (edge ``e`` at row ``e - edge0``;
    ``NPT``: the tile's queries padded to 8 or more, a power of two)."""
    pid = gl.program_id(0)
    h, krow, t0, nk, e0, e1 = work_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                                        ITEM_E1, pid)
    M: gl.constexpr = ROWS
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                rank=2)
    q_ring = gl.allocate_shared_memory(Q.dtype.element_ty, [STAGES, M, D], layout)
    do_ring = gl.allocate_shared_memory(DO.dtype.element_ty, [STAGES, M, D], layout)
    k_smem = gl.allocate_shared_memory(K.dtype.element_ty, [1, BS, D], layout)
    v_smem = gl.allocate_shared_memory(V.dtype.element_ty, [1, BS, D], layout)
    p_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [2, M, HALF], layout)
    ds_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [2, M, HALF], layout)
    kv_bar, ready, empty = ring_barriers(STAGES, LOAD_WARPS, 2)   # both attention warpgroups
    bar_l: gl.constexpr = mbarrier.MBarrierLayout()
    ds_ready = gl.allocate_shared_memory(gl.int64, [1], bar_l)
    ds_free = gl.allocate_shared_memory(gl.int64, [1], bar_l)
    mbarrier.init(ds_ready, count=2)
    mbarrier.init(ds_free, count=2)
    if TEACHER:         # E^T [NPT queries, 64 rows]: one where row // G is the query
        e_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [NPT, M], layout)
        e_bl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        en = gl.arange(0, NPT, layout=gl.SliceLayout(1, e_bl))
        er = gl.arange(0, M, layout=gl.SliceLayout(0, e_bl))
        one = gl.expand_dims(en, 1) == gl.expand_dims(er // G, 0)
        e_smem.store(gl.where(one, 1.0, 0.0).to(Q.dtype.element_ty))
        gl.thread_barrier()
    else:
        e_smem = p_smem
    fence_async_shared()
    gl.warp_specialize([
        (_grads, (q_ring, do_ring, k_smem, v_smem, p_smem, ds_smem, e_smem, kv_bar, ready,
                  empty, ds_ready, ds_free, LSE, DELTA, DQ, DK, DV, PT, POS, EDGE_Q,
                  EDGE_SLOT, pid, h, krow, t0, nk, e0, e1, q0, edge0, scale, scale_log2,
                  stride_lt, 0, HKV, G, D, BS, TOPK, BLOCK_Q, STAGES, DET, EARLY_DV, TEACHER,
                  NPT, num_warps)),
        (_grads, (q_ring, do_ring, k_smem, v_smem, p_smem, ds_smem, e_smem, kv_bar, ready,
                  empty, ds_ready, ds_free, LSE, DELTA, DQ, DK, DV, PT, POS, EDGE_Q,
                  EDGE_SLOT, pid, h, krow, t0, nk, e0, e1, q0, edge0, scale, scale_log2,
                  stride_lt, 1, HKV, G, D, BS, TOPK, BLOCK_Q, STAGES, DET, EARLY_DV, TEACHER,
                  NPT, 4)),
        (loader, (Q, K, V, EDGE_Q, q_ring, k_smem.index(0), v_smem.index(0), kv_bar, ready,
                  empty, h, krow, nk, e0, e1, q0, stride_qt, stride_qh, stride_kt, stride_kh,
                  stride_vt, stride_vh, G, D, BS, BLOCK_Q, STAGES, LOAD_WARPS, True, DO,
                  do_ring, stride_dt, stride_dh))],
        [4, LOAD_WARPS], [232, 40])


def launch(q, k, v, dout, lse, delta, slots, dk, dv, rows, plan, q0: int, *, scale: float,
           scale_log2: float, topk: int, block_size: int, deterministic: bool,
           teacher_rows=None) -> None:
    """``bwd_kernel`` over one chunk's plan (``sparse_attn_bwd``'s buffers: ``dk, dv`` the
    fp32 gradients or, ``deterministic``, the per-item slots). ``teacher_rows``: fp32
    ``[plan.num_edges, block_size]``, filled with the KL's teacher rows (``teaches``)."""
    hkv = int(plan.num_heads)
    g = q.shape[1] // hkv
    if teacher_rows is not None and not teaches(g):
        raise ValueError(f"the backward writes teacher rows for groups of {TEACHER_GROUPS[0]} "
                         f"to {TEACHER_GROUPS[1]} heads, got {g}")
    bwd_kernel[(plan.num_items,)](
        q, k, v, dout, lse, delta, slots, dk, dv,
        lse if teacher_rows is None else teacher_rows, rows.q_pos, plan.edge_q,
        plan.edge_slot, plan.item_h, plan.item_krow, plan.item_t0, plan.item_nk,
        plan.item_e0, plan.item_e1, q0, plan.edge0, scale, scale_log2, q.stride(0),
        q.stride(1), dout.stride(0), dout.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), lse.stride(0), HKV=hkv, G=g, D=q.shape[2], BS=block_size, TOPK=topk,
        BLOCK_Q=ROWS.value // g, STAGES=STAGES, DET=deterministic,
        EARLY_DV=g >= EARLY_DV_GROUP, TEACHER=teacher_rows is not None,
        NPT=max(8, next_pow2(ROWS.value // g)), LOAD_WARPS=LOAD_WARPS, num_warps=4)
