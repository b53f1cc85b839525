"""Triton teacher of the indexer KL over each tile's union of selected blocks.

The teacher (docs/semantics.md, "Indexer KL") is, per (query, index head ``h``, selected
block), the main attention's probabilities over the block's keys averaged over the ``G``
query heads of KV head ``h``. The KV-outer teachers (``msa.ops.kl.gluon`` and the
Triton KL kernel's own half) gather each edge's ``G`` query rows; this kernel walks the
union plan of ``msa.ops.attention.union`` instead. One program per tile (``QT``
consecutive queries of one segment, each with ``GP`` rows: its ``G`` heads padded to a
power of two) and index head loads the tile's query rows once and each block of the
tile's union once, computes ``S = Q K^T`` and ``p = exp(scale S - lse)`` for all of the
tile's rows, sums each query's rows, and stores the row of every query that selected the
block at its place ``(query, h, slot)``: ``PT [chunk queries, Hi, K, BS]`` fp32 (the
student half, ``indexer_kl_bwd_kernel`` with ``PT_SLOT``, reads it by each edge's
query and slot). Like the union forward, it gains where consecutive queries share their
selections and loses where they do not. Runs where ``kernel="union"`` is asked for
(``msa.ops.kl.triton.indexer_kl_bwd``) or ``MSA_KL_KERNEL=union`` is set; one KV head
per index head (``Hkv == Hi``), contiguous keys.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..attention.union import union_plan
from ..launch import launch_fitting
from ..plan import SparsePlan, tile_queries
from ..triton_utils import LOG2E, dot, next_pow2, precision, upcast

ROWS = 128          # MMA rows of a tile (64 for head dim 256 or fp32: the score registers)


@triton.jit(do_not_specialize=["num_tiles", "c0", "c1"])
def union_teacher_kernel(
        Q, K, TLSE, TOPK, PT, U, NU, TQ0, TN, TKBASE, TOFF, num_tiles, c0, c1, scale_log2,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_tl, stride_th, stride_tq,
        G: tl.constexpr, GP: tl.constexpr, QT: tl.constexpr, D: tl.constexpr,
        BS: tl.constexpr, W: tl.constexpr, HI: tl.constexpr, TOPK_K: tl.constexpr,
        KP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One tile x one index head (grid: tiles, Hi), the queries ``c0 .. c1`` of the chunk
    only (other tiles return at once): rows ``r = query * GP + head``; ``PT`` row
    ``((query - c0) * HI + h) * TOPK_K + slot`` for each query that selected the block at
    ``slot`` (``KP``: ``TOPK_K`` padded to a power of two)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    q0 = tl.load(TQ0 + tile)
    n = tl.load(TN + tile)
    lo = tl.maximum(q0, c0)
    hi = tl.minimum(q0 + n, c1)
    if lo >= hi:
        return
    urow = h * num_tiles + tile
    kbase = tl.load(TKBASE + tile).to(tl.int64)
    off = tl.load(TOFF + tile)
    r = tl.arange(0, QT * GP)
    i = r // GP
    g = r % GP
    rv = (g < G) & (q0 + i >= lo) & (q0 + i < hi)
    qrow = (q0 + i).to(tl.int64)
    head = h * G + g
    d = tl.arange(0, D)
    qt = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                 mask=rv[:, None], other=0.0)
    lse = tl.load(TLSE + qrow * stride_tl + head, mask=rv, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # none: p = 0
    pos = off + i
    # each query's selection, to find the slot of a union block (ids are unique)
    iq = tl.arange(0, QT)
    kk = tl.arange(0, KP)
    qv = (q0 + iq >= lo) & (q0 + iq < hi)
    ids = tl.load(TOPK + h * stride_th + (q0 + iq).to(tl.int64)[:, None] * stride_tq
                  + kk[None, :], mask=qv[:, None] & (kk < TOPK_K)[None, :], other=-1)
    dst = ((q0 + iq - c0).to(tl.int64) * HI + h) * TOPK_K
    offs_n = tl.arange(0, BS)
    ublocks = U + urow.to(tl.int64) * W
    last = off + n - 1                          # the tile's last query: no later key
    for u in range(0, tl.load(NU + urow)):
        blk = tl.load(ublocks + u)
        kpos = blk * BS + offs_n
        kt = tl.load(K + (kbase + kpos)[:, None] * stride_kt + h * stride_kh + d[None, :],
                     mask=(kpos <= last)[:, None], other=0.0)
        s = dot(qt, tl.trans(kt), PRECISION, UPCAST)
        allowed = (kpos[None, :] <= pos[:, None]) & rv[:, None]
        p = tl.where(allowed, tl.exp2(s * scale_log2 - lse[:, None]), 0.0)
        pt = tl.sum(tl.reshape(p, (QT, GP, BS)), 1) * (1.0 / G)        # [QT, BS]
        slot = tl.max(tl.where(ids == blk, kk[None, :], -1), 1)
        tl.store(PT + (dst + slot)[:, None] * BS + offs_n[None, :], pt,
                 mask=(qv & (slot >= 0))[:, None])


def teacher_queries(group: int, topk: int, d: int, itemsize: int) -> int:
    """Queries per tile of ``union_teacher_kernel``: ``ROWS`` rows (64 for head dim 256 or
    fp32) of ``next_pow2(group)`` each, a power of two (``tile_queries``'s limits)."""
    rows = ROWS // 2 if d > 128 or itemsize > 2 else ROWS
    qt = tile_queries(next_pow2(group), topk, max(rows, next_pow2(group)))
    return 1 << (qt.bit_length() - 1)


def launch(q, k, teacher_lse, topk_indices, plan: SparsePlan, c0: int, c1: int, pt, *,
           scale: float) -> None:
    """The teacher's rows of the chunk's queries ``c0 .. c1`` into ``pt [(c1 - c0) * Hi *
    K, BS]`` fp32 (row ``((query - c0) * Hi + h) * K + slot``; rows of unselected or
    invalid entries are left as they are). ``q [total_q, Hq, D]``, ``k [total_k, Hkv,
    D]`` with ``Hkv == Hi``, ``teacher_lse [total_q, Hq]`` fp32, ``topk_indices [Hi,
    total_q, K]`` int32 contiguous over ``plan``'s segments (its union plan is built on
    first use and shared with the union forward where the tiles agree)."""
    hi, _, topk = topk_indices.shape
    if k.shape[1] != hi or plan.rows.paged:
        raise ValueError("the union KL teacher needs one KV head per index head (Hkv == Hi) "
                         f"and contiguous keys, got Hkv={k.shape[1]}, Hi={hi}"
                         f"{', paged keys' if plan.rows.paged else ''}; use kernel='triton'")
    g, d = q.shape[1] // k.shape[1], q.shape[2]
    gp = next_pow2(g)
    qt = teacher_queries(g, topk, d, q.dtype.itemsize)
    up = union_plan(topk_indices, plan, qt, gp)         # halves by rows of the padded group
    if not up.num_tiles:
        return
    launch_fitting(
        union_teacher_kernel, (up.num_tiles, hi),
        (q, k, teacher_lse, topk_indices, pt, up.blocks, up.count, up.tile_q0, up.tile_n,
         up.tile_kbase, up.tile_off, up.num_tiles, c0, c1, scale * LOG2E, q.stride(0),
         q.stride(1), k.stride(0), k.stride(1), teacher_lse.stride(0),
         topk_indices.stride(0), topk_indices.stride(1)),
        [dict(num_warps=max(4, qt * gp // 16), num_stages=s) for s in (2, 1)],
        G=g, GP=gp, QT=qt, D=d, BS=plan.block_size, W=up.blocks.shape[2], HI=hi,
        TOPK_K=topk, KP=next_pow2(topk), PRECISION=precision(q.dtype),
        UPCAST=upcast(q.dtype))
