"""Gluon teacher of the indexer KL for Hopper (sm_90): ``teacher_kernel``.

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
half's wgmma. Each tile's head average leaves as fp32 rows ``PT [edge, 128]``; the
student half (``indexer_kl_bwd_kernel`` with ``PT_IN``) reads them back. The
``tl.*`` kernel holding both halves needs 255 registers and spills at this shape. The
split is faster, deterministic mode included. A teacher in the union form, which gathers
no query rows, wrote the same rows no faster (measurements: docs/benchmarks.md,
docs/experiments.md).

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
from ..attention.gluon import (LOAD_WARPS, ROWS, block_smem, loader, ring_barriers, tile_edges,
                               work_item)
from ..triton_utils import next_pow2

STAGES = 4      # gathered query tiles in flight: one program per SM leaves the room


@gluon.jit
def _teacher(q_ring, k_smem, k_bar, ready, empty, PT, TLSE, POS, EDGE_Q, h, t0, nk, e0, e1,
             q0, edge0, scale_log2, stride_tl, first, G: gl.constexpr, GP: gl.constexpr,
             BS: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr,
             STEP: gl.constexpr, WARPS: gl.constexpr):
    """A warpgroup, tiles ``first, first + STEP, ...``: ``S^T = K Q^T`` (wgmma; each half
    of the block's keys as the MMA's 64 rows, the tile's query rows as its columns), ``p =
    exp(scale S - lse) / G`` over the allowed keys (``/ G`` in the exponent), summed over
    each query's ``G`` heads (``GP`` consecutive columns: two in each thread per 8, the
    rest within a lane quad; padding columns hold ``p = 0``), stored at the query's edge
    row of ``PT`` (edge ``e`` at row ``e - edge0``, the chunk's first edge). Tiles whose
    queries all see the whole block skip the mask."""
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
    pos, lse = _tile_rows(EDGE_Q, POS, TLSE, e0, e1, q0, first, tok, g, h, stride_tl, G,
                          BLOCK_Q)
    for t in range(first, n_tiles, STEP):
        pos_n, lse_n = _tile_rows(EDGE_Q, POS, TLSE, e0, e1, q0, t + STEP * AHEAD, tok, g, h,
                                  stride_tl, G, BLOCK_Q)
        if AHEAD == 0:
            pos, lse = pos_n, lse_n
        whole = (nk == BS) & (t0 + BS - 1 <= gl.min(pos, 0))
        s = t % STAGES
        mbarrier.wait(ready.index(s), (t // STAGES) & 1)
        fence_async_shared()
        q_t = q_ring.index(s).permute((1, 0))
        lo = warpgroup_mma(k_smem.slice(0, HALF), q_t, zero, use_acc=False, is_async=True)
        hi = warpgroup_mma(k_smem.slice(HALF, HALF), q_t, zero, use_acc=False, is_async=True)
        lo = warpgroup_mma_wait(1, deps=[lo])           # the first half under the second
        se = e0 + t * BLOCK_Q + st_tok
        rows = PT + gl.expand_dims((se - edge0).to(gl.int64), 0) * BS + st_n
        smask = gl.expand_dims(se < e1, 0)
        lse2 = gl.expand_dims(lse, 0)
        _head_means(lo, lse2, whole, key, pos, t0, nk, scale_log2, rows, smask, G, GP,
                    BLOCK_Q, HALF, st)
        hi = warpgroup_mma_wait(0, deps=[hi])
        mbarrier.arrive(empty.index(s), count=1)
        _head_means(hi, lse2, whole, key + HALF, pos, t0, nk, scale_log2, rows + HALF, smask,
                    G, GP, BLOCK_Q, HALF, st)
        pos, lse = pos_n, lse_n


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
                st: gl.constexpr):
    """Half a block's teacher rows: ``sc [HALF keys, ROWS]`` -> ``p``, the mean over each
    query's heads, stored at ``rows [HALF, BLOCK_Q]`` (layout ``st``)."""
    if whole:
        p = gl.exp2(sc * scale_log2 - lse)
    else:
        allowed = ((t0 + key) <= gl.expand_dims(pos, 0)) & (key < nk)
        p = gl.where(allowed, gl.exp2(sc * scale_log2 - lse), 0.0)
    pt = gl.sum(gl.reshape(p, [HALF, BLOCK_Q, GP]), 2)
    gl.store(rows, gl.convert_layout(pt, st), mask=smask)


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
        [4, LOAD_WARPS], [192, 64])


def supported(q: torch.Tensor, k: torch.Tensor, hi: int, block_size: int) -> bool:
    """Whether ``teacher_kernel`` runs these inputs (``q [total_q, Hq, D]``, ``k [total_k,
    Hkv, D]``, ``hi`` index heads): a Hopper GPU (sm_90), bf16 / fp16, head dim 128,
    blocks of 128, ``Hkv == Hi``, a group of at most 64 heads, rows 16-byte aligned."""
    if not on_hopper(q):
        return False
    g = q.shape[1] // k.shape[1]
    aligned = all(x.stride(-1) == 1 and x.stride(-2) % 8 == 0 and x.stride(-3) % 8 == 0
                  and x.data_ptr() % 16 == 0 for x in (q, k))
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
            and q.shape[2] == 128 and block_size == 128 and k.shape[1] == hi
            and g <= ROWS.value and aligned)


def launch(q, k, teacher_lse, q_pos, plan, q0: int, pt, *, scale_log2: float,
           block_size: int) -> None:
    """``teacher_kernel`` over one chunk's plan into ``pt [plan.num_edges, block_size]``
    (fp32); ``teacher_lse [total_q, Hq]`` fp32. Raises ``NotImplementedError`` where the
    kernel does not apply (``supported``)."""
    if not supported(q, k, int(plan.num_heads), block_size):
        raise NotImplementedError(
            "the Gluon KL teacher runs on Hopper (sm_90) with bf16 / fp16, head dim 128, "
            "blocks of 128, one KV head per index head, at most 64 heads per group and "
            "16-byte aligned rows; use kernel='triton'")
    g = q.shape[1] // k.shape[1]
    gp = next_pow2(g)                       # rows per query: the group, padded
    teacher_kernel[(plan.num_items,)](
        q, k, pt, teacher_lse, q_pos, plan.edge_q, plan.item_h, plan.item_krow,
        plan.item_t0, plan.item_nk, plan.item_e0, plan.item_e1, q0, plan.edge0, scale_log2,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), teacher_lse.stride(0), G=g,
        D=q.shape[2], BS=block_size, BLOCK_Q=ROWS.value // gp, STAGES=STAGES,
        LOAD_WARPS=LOAD_WARPS, num_warps=4, GP=gp)
