"""Gluon KV-outer sparse attention forward for Hopper (sm_90): ``fwd_kernel``, the
forward's kernel there (``msa.ops.attention.forward.forward_kernel``).

Same contract as the Triton KV-outer kernel (``msa.ops.attention.forward``, one program
per work item = KV head, KV block, slice of the queries that selected it; a partial
output normalised by its own sum and its natural-log LSE per (query, slot, head)), for
bf16 / fp16, head dim 128, blocks of 128 keys, 64-row tiles (``64 // G`` queries x the
``G`` heads of the group: a group of 6 fills 60 rows, not 8 queries x 8 padded heads)
and the whole block on chip. A loader partition (4 warps) gathers the block's K and V
rows and then each tile's query rows into a ring of shared-memory slots with ``cp.async``
(each row from any token) and signals them with mbarriers; two attention warpgroups
take alternate tiles and run ``S = Q K^T`` and ``O = P V`` as wgmma from shared memory
(P from registers) with the softmax in between, so one warpgroup's softmax overlaps the
other's MMAs, while the loads of the next tiles overlap both. Where each query's ``G``
rows start at a whole period of the 128-byte swizzle (``G`` a multiple of 8) the
warpgroups hand each tile's partial rows to a storer warp through shared-memory slots,
which stores them by TMA (one store of ``G`` rows per query), so that the stores leave
the warpgroups' per-tile chain; otherwise they store the rows themselves. The ``tl.*``
kernel cannot be built this way (Triton 3.6 warp-specializes TMA loads only, and TMA
cannot gather rows on Hopper).

Measurements against the Triton kernel, per group size, and the variants that were slower
(one attention warpgroup, more ring slots): docs/benchmarks.md, docs/experiments.md.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere.async_copy import (
    async_copy_global_to_shared, mbarrier_arrive)
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                               tma, warpgroup_mma)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..launch import on_hopper

STAGES = 2              # gathered query tiles in flight (16 KB each)
LOAD_WARPS = 4
ROWS = gl.constexpr(64)  # MMA rows per tile: 64 // G queries x the G heads of the group
OSLOTS = gl.constexpr(2)  # output tiles in flight to the storer, per attention warpgroup
WARPGROUPS = gl.constexpr(2)  # attention warpgroups of the forward, taking tiles in turn
TILE_L = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                           rank=2))


@gluon.jit
def load_rows(smem, X, row0, n, h, col0, stride_t, stride_h, NROWS: gl.constexpr,
              COLS: gl.constexpr, WARPS: gl.constexpr):
    """``cp.async`` of rows ``row0 ..`` (the first ``n``; the rest zero-filled), head ``h``,
    columns ``col0 ..`` of ``X`` into ``smem [NROWS, COLS]`` (a block's keys or values)."""
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    cols = gl.expand_dims(gl.arange(0, COLS, layout=gl.SliceLayout(0, ld)), 0)
    r = gl.arange(0, NROWS, layout=gl.SliceLayout(1, ld))
    rows = gl.expand_dims((row0 + r).to(gl.int64), 1)
    async_copy_global_to_shared(smem, X + rows * stride_t + h * stride_h + col0 + cols,
                                mask=gl.expand_dims(r < n, 1))


@gluon.jit
def work_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0, ITEM_E1, pid):
    """Work item ``pid`` of a plan: KV head, first key row (int64), first key position,
    keys, edge range ``e0 .. e1``."""
    return (gl.load(ITEM_H + pid), gl.load(ITEM_KROW + pid).to(gl.int64),
            gl.load(ITEM_T0 + pid), gl.load(ITEM_NK + pid), gl.load(ITEM_E0 + pid),
            gl.load(ITEM_E1 + pid))


@gluon.jit
def ring_barriers(STAGES: gl.constexpr, LOAD_WARPS: gl.constexpr, CONSUMERS: gl.constexpr):
    """Initialised mbarriers of a loader and its consumers: ``kv_bar`` (the block's rows
    landed), ``ready [STAGES]`` (a ring slot landed; one ``cp.async`` arrival per loader
    thread each) and ``empty [STAGES]`` (``CONSUMERS`` arrivals free a slot)."""
    bar_l: gl.constexpr = mbarrier.MBarrierLayout()
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], bar_l)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    mbarrier.init(kv_bar, count=32 * LOAD_WARPS)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=32 * LOAD_WARPS)
        mbarrier.init(empty.index(i), count=CONSUMERS)
    return kv_bar, ready, empty


@gluon.jit
def block_smem(Q, K, V, STAGES: gl.constexpr, D: gl.constexpr, BS: gl.constexpr,
               WITH_V: gl.constexpr = True):
    """Shared memory of a program: the ring of gathered query tiles ``[STAGES, ROWS, D]``
    and the block's keys ``[BS, D]`` and values (without ``WITH_V`` no values: the keys
    stand in, unused)."""
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                rank=2)
    q_ring = gl.allocate_shared_memory(Q.dtype.element_ty, [STAGES, ROWS, D], layout)
    k_smem = gl.allocate_shared_memory(K.dtype.element_ty, [BS, D], layout)
    if WITH_V:
        v_smem = gl.allocate_shared_memory(V.dtype.element_ty, [BS, D], layout)
    else:
        v_smem = k_smem
    return q_ring, k_smem, v_smem


@gluon.jit
def tile_scores(q_ring, k_smem, ready, empty, t, zero, STAGES: gl.constexpr):
    """``S = Q K^T`` of tile ``t`` (wgmma from its ring slot, once the loader filled it;
    the slot is released right after) into ``zero``'s layout."""
    s = t % STAGES
    mbarrier.wait(ready.index(s), (t // STAGES) & 1)
    fence_async_shared()
    sc = warpgroup_mma(q_ring.index(s), k_smem.permute((1, 0)), zero, use_acc=False)
    mbarrier.arrive(empty.index(s), count=1)
    return sc


@gluon.jit
def tile_edges(EDGE_Q, e0, e1, t, tok, BLOCK_Q: gl.constexpr):
    """Tile ``t``'s rows (query ``tok`` of the tile; any layout): edge ids, row mask
    (rows past the tile's ``BLOCK_Q`` queries or the item's edges are off), chunk-relative
    query (int64)."""
    e = e0 + t * BLOCK_Q + tok
    emask = (e < e1) & (tok < BLOCK_Q)
    ql = gl.load(EDGE_Q + e, mask=emask, other=0).to(gl.int64)
    return e, emask, ql


@gluon.jit
def tile_offsets(EDGE_Q, e0, e1, q0, t, h, stride_qt, stride_qh, G: gl.constexpr,
                 D: gl.constexpr, BLOCK_Q: gl.constexpr, WARPS: gl.constexpr,
                 GP: gl.constexpr = 0):
    """Element offsets ``[ROWS, D]`` of tile ``t``'s gathered query rows (row ``r``: query
    ``r // G`` of edges ``e0 + t * BLOCK_Q ..``, head ``r % G`` of group ``h``) and their
    row mask ``[ROWS, 1]``, for the loaders' ``cp.async``. ``GP > G``: ``GP`` rows per
    query instead (rows of heads ``>= G`` masked)."""
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    cols = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, ld)), 0)
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld))
    RP: gl.constexpr = G if GP == 0 else GP
    g = r % RP
    e, emask, ql = tile_edges(EDGE_Q, e0, e1, t, r // RP, BLOCK_Q)
    if RP != G:
        emask = emask & (g < G)
    rows = gl.expand_dims((q0 + ql) * stride_qt + (h * G + g) * stride_qh, 1)
    return rows + cols, gl.expand_dims(emask, 1)


@gluon.jit
def loader(Q, K, V, EDGE_Q, q_ring, k_smem, v_smem, kv_bar, ready, empty, h, krow, nk, e0, e1,
           q0, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
           G: gl.constexpr, D: gl.constexpr, BS: gl.constexpr,
           BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr,
           WITH_V: gl.constexpr = True, DO=None, do_ring=None, stride_dt=0, stride_dh=0,
           GP: gl.constexpr = 0):
    """Loader: the block's K and V rows (``kv_bar``; K only without ``WITH_V``), then the
    query rows of tile ``t`` into slot ``t % STAGES`` (with ``DO``: its rows of ``DO`` too,
    into ``do_ring``) once the consumers released it (``ready``/``empty``). ``GP``: rows
    per query (``tile_offsets``)."""
    load_rows(k_smem, K, krow, nk, h, 0, stride_kt, stride_kh, BS, D, WARPS)
    if WITH_V:
        load_rows(v_smem, V, krow, nk, h, 0, stride_vt, stride_vh, BS, D, WARPS)
    mbarrier_arrive(kv_bar, increment_count=False)
    n_tiles = (e1 - e0 + BLOCK_Q - 1) // BLOCK_Q
    for t in range(n_tiles):
        s = t % STAGES
        mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)
        offs, mask = tile_offsets(EDGE_Q, e0, e1, q0, t, h, stride_qt, stride_qh, G,
                                  D, BLOCK_Q, WARPS, GP)
        async_copy_global_to_shared(q_ring.index(s), Q + offs, mask=mask)
        if DO is not None:
            offs, mask = tile_offsets(EDGE_Q, e0, e1, q0, t, h, stride_dt, stride_dh, G,
                                      D, BLOCK_Q, WARPS)
            async_copy_global_to_shared(do_ring.index(s), DO + offs, mask=mask)
        mbarrier_arrive(ready.index(s), increment_count=False)


@gluon.jit
def _out_slot(t):
    """Tile ``t``'s output slot (warpgroup ``t % WARPGROUPS`` owns slots ``OSLOTS`` apart
    from the next's; its tiles take them in turn) and the slot's mbarrier phase."""
    i = t // WARPGROUPS
    return (t % WARPGROUPS) * OSLOTS + i % OSLOTS, (i // OSLOTS) & 1


@gluon.jit
def _attend(q_ring, k_smem, v_smem, kv_bar, ready, empty, o_smem, o_ready, o_free, PO, PL,
            POS, EDGE_Q, EDGE_SLOT, h, t0, nk, e0, e1, q0, scale_log2, first,
            HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BS: gl.constexpr,
            TOPK: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr,
            WARPS: gl.constexpr, TMA_OUT: gl.constexpr):
    """An attention warpgroup, tiles ``first, first + WARPGROUPS, ...``: per tile ``S = Q K^T``
    (wgmma), the masked softmax of the tile's rows, ``O = P V`` (wgmma, P in registers),
    the LSEs stored and the partial rows handed to the storer through ``o_smem`` slots
    ``first * OSLOTS ..`` (``TMA_OUT``; ``o_ready`` / ``o_free``), else stored by row.
    With two such warpgroups one's softmax runs while the other's MMAs do."""
    M: gl.constexpr = ROWS
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BS, 16])
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    r = gl.arange(0, M, layout=rows_l)
    tok = r // G
    g = r % G
    offs_n = gl.arange(0, BS, layout=gl.SliceLayout(0, mma))
    st: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    st_d = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, st)), 0)
    key_ok = gl.expand_dims(offs_n < nk, 0)
    zero = gl.zeros([M, BS], gl.float32, mma)
    n_tiles = (e1 - e0 + BLOCK_Q - 1) // BLOCK_Q
    mbarrier.wait(kv_bar, 0)
    fence_async_shared()            # cp.async wrote through the generic proxy; wgmma reads
    for t in range(first, n_tiles, WARPGROUPS):
        e, emask, ql = tile_edges(EDGE_Q, e0, e1, t, tok, BLOCK_Q)
        slot = gl.load(EDGE_SLOT + e, mask=emask, other=0)
        pos = gl.load(POS + q0 + ql, mask=emask, other=-1)
        sc = tile_scores(q_ring, k_smem, ready, empty, t, zero, STAGES)
        allowed = (gl.expand_dims(t0 + offs_n, 0) <= gl.expand_dims(pos, 1)) & key_ok
        sc = gl.where(allowed, sc * scale_log2, float("-inf"))
        m = gl.max(sc, 1)
        m = gl.where(m == float("-inf"), 0.0, m)
        p = gl.exp2(sc - gl.expand_dims(m, 1))
        den = gl.sum(p, 1)
        pa = gl.convert_layout(p.to(PO.dtype.element_ty),
                               gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2))
        o = warpgroup_mma(pa, v_smem, zero, use_acc=False)
        o = o / gl.expand_dims(gl.maximum(den, 1e-30), 1)
        lse = gl.where(den > 0, (m + gl.log2(den)) * 0.6931471805599453, float("-inf"))
        pidx = ((ql * HKV + h) * TOPK + slot) * G + g
        gl.store(PL + pidx, lse, mask=emask)
        if TMA_OUT:
            oslot, phase = _out_slot(t)
            mbarrier.wait(o_free.index(oslot), phase ^ 1)
            o_smem.index(oslot).store(o.to(PO.dtype.element_ty))
            fence_async_shared()            # the storer's TMA reads through the async proxy
            mbarrier.arrive(o_ready.index(oslot), count=1)
        else:
            # rows leave in 16-byte pieces: the MMA layout would store 4 bytes per thread
            o = gl.convert_layout(o.to(PO.dtype.element_ty), st)
            pidx = gl.expand_dims(gl.convert_layout(pidx, gl.SliceLayout(1, st)), 1)
            emask = gl.expand_dims(gl.convert_layout(emask, gl.SliceLayout(1, st)), 1)
            gl.store(PO + pidx * D + st_d, o, mask=emask)


@gluon.jit
def _storer(o_smem, o_ready, o_free, PO_DESC, EDGE_Q, EDGE_SLOT, h, e0, e1,
            HKV: gl.constexpr, G: gl.constexpr, TOPK: gl.constexpr, BLOCK_Q: gl.constexpr):
    """Storer (one warp): tile ``t``'s partial rows, from the slot its warpgroup filled
    (``_out_slot``), one TMA store of ``G`` rows per query; the slot is freed once the
    stores have read it."""
    n_tiles = (e1 - e0 + BLOCK_Q - 1) // BLOCK_Q
    for t in range(n_tiles):
        oslot, phase = _out_slot(t)
        mbarrier.wait(o_ready.index(oslot), phase)
        for j in gl.static_range(BLOCK_Q):
            e = e0 + t * BLOCK_Q + j
            if e < e1:
                row = ((gl.load(EDGE_Q + e) * HKV + h) * TOPK + gl.load(EDGE_SLOT + e)) * G
                tma.async_copy_shared_to_global(PO_DESC, [row, 0],
                                                o_smem.index(oslot).slice(j * G, G))
        tma.store_wait(0)
        mbarrier.arrive(o_free.index(oslot), count=1)


@gluon.jit
def fwd_kernel(Q, K, V, PO, PO_DESC, PL, POS, EDGE_Q, EDGE_SLOT, ITEM_H, ITEM_KROW, ITEM_T0,
               ITEM_NK, ITEM_E0, ITEM_E1, q0, scale_log2, stride_qt, stride_qh, stride_kt,
               stride_kh, stride_vt, stride_vh, HKV: gl.constexpr, G: gl.constexpr,
               D: gl.constexpr, BS: gl.constexpr, TOPK: gl.constexpr, BLOCK_Q: gl.constexpr,
               STAGES: gl.constexpr, LOAD_WARPS: gl.constexpr, num_warps: gl.constexpr):
    """One program per work item of the plan (``msa.ops.plan``): the item's KV block
    in shared memory, its edges ``e0 .. e1`` in tiles of ``BLOCK_Q`` queries. With a
    TMA descriptor ``PO_DESC`` of the partial rows (``G`` rows a box) a storer warp
    stores them; without (``None``) the attention warpgroups do."""
    h, krow, t0, nk, e0, e1 = work_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                                        ITEM_E1, gl.program_id(0))
    q_ring, k_smem, v_smem = block_smem(Q, K, V, STAGES, D, BS)
    kv_bar, ready, empty = ring_barriers(STAGES, LOAD_WARPS, 1)
    TMA_OUT: gl.constexpr = PO_DESC is not None
    if TMA_OUT:
        o_smem = gl.allocate_shared_memory(PO.dtype.element_ty, [WARPGROUPS * OSLOTS, ROWS, D],
                                            TILE_L)
        bar_l: gl.constexpr = mbarrier.MBarrierLayout()
        o_ready = gl.allocate_shared_memory(gl.int64, [WARPGROUPS * OSLOTS, 1], bar_l)
        o_free = gl.allocate_shared_memory(gl.int64, [WARPGROUPS * OSLOTS, 1], bar_l)
        for i in gl.static_range(WARPGROUPS * OSLOTS):
            mbarrier.init(o_ready.index(i), count=1)
            mbarrier.init(o_free.index(i), count=1)
    else:
        o_smem, o_ready, o_free = q_ring, empty, empty          # unused
    fence_async_shared()
    # the two lists are spelled out: Triton 3.6 keeps the constexprs of a partition's
    # arguments only in tuples written in the call (held in a variable, they become tensors)
    if TMA_OUT:
        gl.warp_specialize([
            (_attend, (q_ring, k_smem, v_smem, kv_bar, ready, empty, o_smem, o_ready, o_free,
                       PO, PL, POS, EDGE_Q, EDGE_SLOT, h, t0, nk, e0, e1, q0, scale_log2, 0,
                       HKV, G, D, BS, TOPK, BLOCK_Q, STAGES, num_warps, True)),
            (_attend, (q_ring, k_smem, v_smem, kv_bar, ready, empty, o_smem, o_ready, o_free,
                       PO, PL, POS, EDGE_Q, EDGE_SLOT, h, t0, nk, e0, e1, q0, scale_log2, 1,
                       HKV, G, D, BS, TOPK, BLOCK_Q, STAGES, 4, True)),
            (loader, (Q, K, V, EDGE_Q, q_ring, k_smem, v_smem, kv_bar, ready, empty, h, krow,
                      nk, e0, e1, q0, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                      stride_vh, G, D, BS, BLOCK_Q, STAGES, LOAD_WARPS)),
            (_storer, (o_smem, o_ready, o_free, PO_DESC, EDGE_Q, EDGE_SLOT, h, e0, e1, HKV, G,
                       TOPK, BLOCK_Q))],
            [4, LOAD_WARPS, 1], [192, 64, 40])
    else:
        gl.warp_specialize([
            (_attend, (q_ring, k_smem, v_smem, kv_bar, ready, empty, o_smem, o_ready, o_free,
                       PO, PL, POS, EDGE_Q, EDGE_SLOT, h, t0, nk, e0, e1, q0, scale_log2, 0,
                       HKV, G, D, BS, TOPK, BLOCK_Q, STAGES, num_warps, False)),
            (_attend, (q_ring, k_smem, v_smem, kv_bar, ready, empty, o_smem, o_ready, o_free,
                       PO, PL, POS, EDGE_Q, EDGE_SLOT, h, t0, nk, e0, e1, q0, scale_log2, 1,
                       HKV, G, D, BS, TOPK, BLOCK_Q, STAGES, 4, False)),
            (loader, (Q, K, V, EDGE_Q, q_ring, k_smem, v_smem, kv_bar, ready, empty, h, krow,
                      nk, e0, e1, q0, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                      stride_vh, G, D, BS, BLOCK_Q, STAGES, LOAD_WARPS))],
            [4, LOAD_WARPS], [192, 64])


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    """Whether ``fwd_kernel`` runs these inputs (``[..., T, H, D]``): a Hopper GPU (sm_90),
    bf16 / fp16, head dim 128, blocks of 128, a group of at most 64 heads, rows 16-byte
    aligned."""
    if not on_hopper(q):
        return False
    g = q.shape[-2] // k.shape[-2]
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
            and v.dtype == q.dtype and q.shape[-1] == 128 and block_size == 128
            and g <= ROWS.value and rows_aligned(q, k, v))


def rows_aligned(*xs: torch.Tensor) -> bool:
    """Whether each tensor's rows can be gathered by 16-byte ``cp.async``: unit last
    stride, its two strides before that (those it has) multiples of 8 elements, and a
    16-byte aligned base."""
    return all(x.stride(-1) == 1 and all(s % 8 == 0 for s in x.stride()[-3:-1])
               and x.data_ptr() % 16 == 0 for x in xs)


def partial_rows_desc(po: torch.Tensor, g: int, d: int):
    """A TMA descriptor of the partial outputs ``po`` as rows of ``d``, ``g`` rows a box,
    where each query's ``g`` rows start at a whole period (8 rows) of the tile's 128-byte
    swizzle (``g % 8 == 0``); else ``None`` (the attention warpgroups store by row)."""
    if g % 8:
        return None
    rows = po.view(-1, d)
    return TensorDescriptor(rows, list(rows.shape), [d, 1], [g, d], TILE_L.value)


def launch(q, k, v, rows, plan, q0: int, po, pl, *, scale_log2: float, topk: int,
           block_size: int) -> None:
    """``fwd_kernel`` over one chunk's plan (``launch_partials``' arguments)."""
    hkv = int(plan.num_heads)
    g, d = q.shape[1] // hkv, q.shape[2]
    fwd_kernel[(plan.num_items,)](
        q, k, v, po, partial_rows_desc(po, g, d), pl, rows.q_pos, plan.edge_q,
        plan.edge_slot, plan.item_h, plan.item_krow, plan.item_t0, plan.item_nk,
        plan.item_e0, plan.item_e1, q0, scale_log2, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), HKV=hkv, G=g, D=d, BS=block_size, TOPK=topk,
        BLOCK_Q=ROWS.value // g, STAGES=STAGES, LOAD_WARPS=LOAD_WARPS, num_warps=4)
