"""Triton indexer KL over each tile's union of selected blocks: ``union_kl_kernel``.

The KL (docs/semantics.md, "Indexer KL") compares, per (query, index head ``h``,
selected block), the teacher (the main attention's probabilities over the block's keys,
averaged over the ``G`` query heads of KV head ``h``) with the student (the indexer's
probabilities). The KV-outer kernels (``msa.ops.kl.triton``, ``msa.ops.kl.gluon``)
gather each edge's ``G`` query rows and index query row, pass the teacher's rows
through memory and add each edge's ``dqi`` by atomics. This kernel walks the union plan
of ``msa.ops.attention.union`` instead: one program per tile (``QT`` consecutive
queries of one segment) and index head loads the tile's query rows (``GP`` rows a
query: its ``G`` heads padded to a power of two) and index query rows once, and for each
block of the tile's union, once:

    teacher  pt = mean over the query's heads of exp(scale q.k - teacher_lse)
    student  ps = exp(index_scale qi.ki - indexer_lse)
    dz       = loss_coeff / (Hi * total_q) * (ps - pt)      (the queries that selected it)

accumulating each query's ``dqi = index_scale dz @ ki`` in registers (written once, no
atomics) and its KL terms, and storing each selecting query's ``dz`` row at ``(query, h,
slot)`` for ``dki``, which ``kl_dki_kernel`` sums per block (``DZ_SLOT``). The student's
MMA rows are the queries, each repeated ``R`` times to fill 16 rows where the tile has
fewer queries. Like the union forward it gains where consecutive queries share their
selections and loses where they do not. Runs where ``kernel="union"`` is asked for
(``msa.ops.kl.triton.indexer_kl_bwd``) or ``MSA_KL_KERNEL=union`` is set; one KV head
per index head (``Hkv == Hi``), contiguous keys.
"""
from __future__ import annotations

import bisect

import torch
import triton
import triton.language as tl

from ..attention.union import union_plan
from ..launch import launch_fitting
from ..plan import SparsePlan, tile_queries
from ..triton_utils import LOG2E, dot, next_pow2, precision, upcast

ROWS = 128          # teacher MMA rows of a tile (64 for head dim 256 or fp32: registers)


@triton.jit(do_not_specialize=["num_tiles", "c0", "c1"])
def union_kl_kernel(
        Q, K, TLSE, QI, KI, ILSE, TOPK, DZ, DQI, LOSS, U, NU, TQ0, TN, TKBASE, TOFF, ORDER,
        SPAN, num_tiles, c0, c1, scale_log2, iscale, coeff,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_tl, stride_it, stride_ih,
        stride_kit, stride_lh, stride_th, stride_tq,
        G: tl.constexpr, GP: tl.constexpr, QT: tl.constexpr, R: tl.constexpr,
        D: tl.constexpr, DI: tl.constexpr, BS: tl.constexpr, W: tl.constexpr,
        HI: tl.constexpr, TOPK_K: tl.constexpr, KP: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr):
    """One tile x one index head (grid: at least the chunk's tiles, Hi): tile
    ``ORDER[SPAN[0] + program]`` (tiles in query order, ``SPAN``: the first and the
    next after those with queries in ``c0 .. c1``; programs past them return at once),
    its queries in ``c0 .. c1`` only. Teacher rows ``head * QT + query`` (the head
    sum then reduces across warps: rows of a query side by side spill registers at
    groups of 8 or fewer), student rows ``query * R + replica``. Writes ``DQI [total_q,
    Hi, DI]`` (fp32) of its queries, ``DZ`` row ``((query - c0) * HI + h) * TOPK_K +
    slot`` of each selecting query, and its KL terms times ``coeff`` at ``LOSS [h *
    num_tiles + tile]``."""
    t = tl.load(SPAN) + tl.program_id(0)
    if t >= tl.load(SPAN + 1):
        return
    tile = tl.load(ORDER + t)
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
    last = off + n - 1                          # the tile's last query: no later key
    d = tl.arange(0, D)
    di = tl.arange(0, DI)
    offs_n = tl.arange(0, BS)
    # teacher rows: the tile's query rows and attention LSEs (log2; none or padding: p = 0)
    r = tl.arange(0, QT * GP)
    i = r % QT
    g = r // QT
    rv = (g < G) & (q0 + i >= lo) & (q0 + i < hi)
    head = h * G + g
    qt = tl.load(Q + (q0 + i).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
                 + d[None, :], mask=rv[:, None], other=0.0)
    lse = tl.load(TLSE + (q0 + i).to(tl.int64) * stride_tl + head, mask=rv, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    pos = off + i
    # student rows: index query rows and selected LSEs (none: ps = 0), each query's
    # selection (to find a union block's slot; ids are unique)
    sr = tl.arange(0, QT * R)
    sq = sr // R
    sv = (q0 + sq >= lo) & (q0 + sq < hi)
    qrow = (q0 + sq).to(tl.int64)
    qi = tl.load(QI + qrow[:, None] * stride_it + h * stride_ih + di[None, :],
                 mask=sv[:, None], other=0.0)
    ilse = tl.load(ILSE + h * stride_lh + qrow, mask=sv, other=float("inf"))
    ilse = tl.where(ilse == float("-inf"), float("inf"), ilse)
    spos = off + sq
    kk = tl.arange(0, KP)
    ids = tl.load(TOPK + h * stride_th + qrow[:, None] * stride_tq + kk[None, :],
                  mask=sv[:, None] & (kk < TOPK_K)[None, :], other=-1)
    first = sv & (sr % R == 0)                  # one replica stores the query's rows
    dst = ((qrow - c0) * HI + h) * TOPK_K
    dqi = tl.zeros((QT * R, DI), dtype=tl.float32)
    loss = tl.zeros((QT * R,), dtype=tl.float32)        # per student row
    ublocks = U + urow.to(tl.int64) * W
    for u in range(0, tl.load(NU + urow)):
        blk = tl.load(ublocks + u)
        kpos = blk * BS + offs_n
        krow = (kbase + kpos)[:, None]
        kmask = (kpos <= last)[:, None]
        kt = tl.load(K + krow * stride_kt + h * stride_kh + d[None, :], mask=kmask, other=0.0)
        ki = tl.load(KI + krow * stride_kit + di[None, :], mask=kmask, other=0.0)
        # teacher: every row's probabilities, summed over each query's heads
        s = dot(qt, tl.trans(kt), PRECISION, UPCAST)
        p = tl.where((kpos[None, :] <= pos[:, None]) & rv[:, None],
                     tl.exp2(s * scale_log2 - lse[:, None]), 0.0)
        pt = tl.sum(tl.reshape(p, (GP, QT, BS)), 0) * (1.0 / G)
        pt = tl.reshape(tl.broadcast_to(pt[:, None, :], (QT, R, BS)), (QT * R, BS))
        # student, over the queries that selected the block
        slot = tl.max(tl.where(ids == blk, kk[None, :], -1), 1)
        sel = sv & (slot >= 0)
        pt = tl.where(sel[:, None], pt, 0.0)
        log_ps = dot(qi, tl.trans(ki), PRECISION, UPCAST) * iscale - ilse[:, None]
        ps = tl.where((kpos[None, :] <= spos[:, None]) & sel[:, None], tl.exp(log_ps), 0.0)
        log_pt = tl.log(tl.where(pt > 0, pt, 1.0))
        loss += tl.sum(tl.where(pt > 0, pt * (log_pt - log_ps), 0.0), 1)
        dz = (coeff * (ps - pt)).to(ki.dtype)
        dqi += dot(dz, ki, PRECISION, UPCAST)
        tl.store(DZ + (dst + slot)[:, None] * BS + offs_n[None, :], dz,
                 mask=(first & (slot >= 0))[:, None])
    tl.store(DQI + qrow[:, None] * (HI * DI) + h * DI + di[None, :], dqi * iscale,
             mask=first[:, None])
    tl.store(LOSS + urow, tl.sum(loss) * (coeff / R))


def tile_shape(group: int, topk: int, d: int, itemsize: int):
    """``(QT, R)`` of ``union_kl_kernel``: queries per tile, a power of two filling
    ``ROWS`` teacher rows (64 for head dim 256 or fp32) of ``next_pow2(group)`` each
    (``tile_queries``'s limits), and the replicas that fill 16 student rows."""
    rows = ROWS // 2 if d > 128 or itemsize > 2 else ROWS
    qt = tile_queries(next_pow2(group), topk, max(rows, next_pow2(group)))
    qt = 1 << (qt.bit_length() - 1)
    return qt, max(1, 16 // qt)


def query_order(up):
    """The union plan ``up``'s tiles in query order: ``(order, first query, end)``, the
    latter two ascending (tiles of a segment are consecutive and do not overlap)."""
    order = torch.argsort(up.tile_q0, stable=True)
    q0s = up.tile_q0[order]
    return order, q0s, q0s + up.tile_n[order]


def chunk_tiles(seg, qt: int, c0: int, c1: int) -> int:
    """At least the number of tiles of ``qt`` queries (tiles inside one segment,
    ``msa.ops.plan.query_tiles``) that hold a query of ``c0 .. c1``: each segment that
    reaches into the range adds at most one tile more than its queries there fill."""
    starts = seg.q_start
    first = max(0, bisect.bisect_right(starts, c0) - 1)
    return -(-(c1 - c0) // qt) + 2 * (bisect.bisect_left(starts, c1) - first) + 1


def launch(q, k, teacher_lse, qi, ki2, indexer_lse, topk_indices, plan: SparsePlan,
           c0: int, c1: int, dz, dqi, *, scale: float, index_scale: float,
           coeff: float) -> torch.Tensor:
    """``union_kl_kernel`` over the chunk's queries ``c0 .. c1``: their ``dqi`` rows into
    ``dqi [total_q, Hi, Di]`` (fp32), each selecting query's ``dz`` row into ``dz [(c1 -
    c0) * Hi * K, BS]`` (row ``((query - c0) * Hi + h) * K + slot``; others left as they
    are). Returns the chunk's KL loss (fp32, ``coeff`` applied; summed in a fixed order).

    ``q [total_q, Hq, D]``, ``k [total_k, Hkv, D]`` with ``Hkv == Hi``, ``teacher_lse
    [total_q, Hq]`` and ``indexer_lse [Hi, total_q]`` fp32, ``qi [total_q, Hi, Di]``,
    ``ki2 [total_k, Di]``, ``topk_indices [Hi, total_q, K]`` int32 contiguous over
    ``plan``'s segments (its union plan is built on first use and shared with the union
    forward where the tiles agree)."""
    hi, _, topk = topk_indices.shape
    if c1 <= c0:
        return torch.zeros((), dtype=torch.float32, device=q.device)
    if k.shape[1] != hi or plan.rows.paged:
        raise ValueError("the union KL needs one KV head per index head (Hkv == Hi) and "
                         f"contiguous keys, got Hkv={k.shape[1]}, Hi={hi}"
                         f"{', paged keys' if plan.rows.paged else ''}; use kernel='triton'")
    g, d, di = q.shape[1] // k.shape[1], q.shape[2], qi.shape[2]
    gp = next_pow2(g)
    qt, r = tile_shape(g, topk, max(d, di), q.dtype.itemsize)
    up = union_plan(topk_indices, plan, qt, gp)         # halves by rows of the padded group
    order, q0s, ends = plan.derived(("union_order", qt, gp), lambda: query_order(up))
    span = torch.stack((torch.searchsorted(ends, c0, right=True),
                        torch.searchsorted(q0s, c1)))
    losses = torch.zeros(hi * up.num_tiles, dtype=torch.float32, device=q.device)
    if up.num_tiles:
        launch_fitting(
            union_kl_kernel, (chunk_tiles(plan.seg, qt, c0, c1), hi),
            (q, k, teacher_lse, qi, ki2, indexer_lse, topk_indices, dz, dqi, losses,
             up.blocks, up.count, up.tile_q0, up.tile_n, up.tile_kbase, up.tile_off, order,
             span, up.num_tiles, c0, c1, scale * LOG2E, index_scale, coeff, q.stride(0),
             q.stride(1), k.stride(0), k.stride(1), teacher_lse.stride(0), qi.stride(0),
             qi.stride(1), ki2.stride(0), indexer_lse.stride(0), topk_indices.stride(0),
             topk_indices.stride(1)),
            [dict(num_warps=max(4, qt * gp // 16), num_stages=s) for s in (2, 1)],
            G=g, GP=gp, QT=qt, R=r, D=d, DI=di, BS=plan.block_size,
            W=up.blocks.shape[2], HI=hi, TOPK_K=topk, KP=next_pow2(topk),
            PRECISION=precision(q.dtype), UPCAST=upcast(q.dtype))
    return losses.sum()
