"""Gluon union forward for Hopper (sm_90): ``union_kernel``, the query-outer forward of
``msa.ops.attention.union`` as a warp-specialized kernel.

Same contract as ``union_fwd_kernel`` (one program per tile x KV head, the tile's union
walked with an online softmax, rows masked by their query's bits and position, the final
output and LSE written) for bf16 / fp16, head dim 128, blocks of 128 keys, contiguous
keys, tiles of 128 MMA rows (``tile_queries(G, K, 128)`` queries x the ``G`` heads).
A loader warp brings each union block's keys and values by TMA into a ring of
``STAGES`` slots (one mbarrier for the keys, one for the values); two attention
warpgroups own 64 rows each and both read every slot, so a block's bytes serve 128
rows; a warpgroup skips the blocks that none of its rows' queries selected. Each
warpgroup runs a block's ``S = Q K^T`` (wgmma from shared memory), the masked online
softmax and ``O += P V`` (wgmma, P from registers) in turn, and the two warpgroups
overlap each other (one's softmax during the other's MMAs); issuing the next block's
scores before the softmax (async wgmma, the FlashAttention-3 order) was slower
(docs/experiments.md).

Rows read by TMA past the tile's last query are loaded and given probability 0; they
are the segment's own later keys or zeros past the tensor: ``union.gluon_applies``
runs the kernel only where no segment's last, partial block reaches the next segment's
rows (``boxes_stay_in_segments``), whose values, were they inf or NaN, would reach this
tile's output.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                               tma, warpgroup_mma)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..launch import on_hopper
from ..plan import GLUON_TILE_ROWS as TILE_ROWS      # MMA rows per tile: 2 warpgroups of 64

STAGES = 2              # union blocks in flight (64 KB each: keys and values)
HALF = gl.constexpr(64)
TILE_L = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                           rank=2))


@gluon.jit
def union_loader(K_DESC, V_DESC, k_ring, v_ring, k_bar, v_bar, empty, ublocks, nu, kbase, h,
                 D: gl.constexpr, BS: gl.constexpr, STAGES: gl.constexpr):
    """Loader (one warp): block ``u`` of the union, keys and values by TMA into slot
    ``u % STAGES`` once both warpgroups released it."""
    for u in range(nu):
        s = u % STAGES
        mbarrier.wait(empty.index(s), ((u // STAGES) & 1) ^ 1)
        row = (kbase + gl.load(ublocks + u) * BS).to(gl.int32)
        mbarrier.expect(k_bar.index(s), BS * D * 2)
        tma.async_copy_global_to_shared(K_DESC, [row, h * D], k_bar.index(s), k_ring.index(s))
        mbarrier.expect(v_bar.index(s), BS * D * 2)
        tma.async_copy_global_to_shared(V_DESC, [row, h * D], v_bar.index(s), v_ring.index(s))


@gluon.jit
def _probabilities(s, u, m_i, l_i, ublocks, bits, rv, pos, offs_n, scale_log2,
                   BS: gl.constexpr):
    """Block ``u``'s scores ``s [64, BS]`` masked (the row's query selected it, keys up
    to the query) into probabilities against the running max: ``p``, the new max and
    sum, and the factor ``alpha`` that rescales the earlier output."""
    blk = gl.load(ublocks + u)
    word = gl.load(bits + u // 64, mask=rv, other=0)
    sel = ((word >> (u % 64)) & 1) != 0
    kpos = blk * BS + offs_n
    allowed = gl.expand_dims(sel, 1) & (gl.expand_dims(kpos, 0) <= gl.expand_dims(pos, 1))
    s = gl.where(allowed, s * scale_log2, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _attend(Q, OUT, LSE, q_smem, k_ring, v_ring, k_bar, v_bar, empty, ublocks, bits_base,
            half_bits, nu, q0, n, off, h, scale_log2, stride_qt, stride_qh, stride_ot, stride_oh,
            stride_lt, half, G: gl.constexpr, QT: gl.constexpr, D: gl.constexpr,
            BS: gl.constexpr, NW: gl.constexpr, STAGES: gl.constexpr,
            WARPS: gl.constexpr):
    """An attention warpgroup: rows ``64 * half ..`` of the tile (row ``r``: query ``r //
    G``, head ``h * G + r % G``), their query rows into ``q_smem``, the union walked
    slot by slot (a block none of its rows' queries selected, by ``half_bits``, only
    released), then the output and LSE."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BS, 16])
    st: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    # the query rows, once
    r_st = half * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, st))
    d_st = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, st)), 0)
    i_st = r_st // G
    rv_st = gl.expand_dims((r_st < QT * G) & (i_st < n), 1)
    q_rows = gl.expand_dims((q0 + i_st).to(gl.int64) * stride_qt + (h * G + r_st % G) *
                            stride_qh, 1)
    q_smem.store(gl.load(Q + q_rows + d_st, mask=rv_st, other=0.0))
    fence_async_shared()
    # the rows in the MMA layout
    r = half * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, mma))
    i = r // G
    rv = (r < QT * G) & (i < n)
    pos = off + i
    bits = bits_base + i.to(gl.int64) * NW
    offs_n = gl.arange(0, BS, layout=gl.SliceLayout(0, mma))
    zero = gl.zeros([HALF, BS], gl.float32, mma)
    m_i = gl.full([HALF], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
    l_i = gl.zeros([HALF], gl.float32, gl.SliceLayout(1, mma))
    acc = gl.zeros([HALF, D], gl.float32, mma)
    dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    for u in range(nu):
        slot = u % STAGES
        phase = (u // STAGES) & 1
        # every slot's barriers are waited on, skipped or not: a wait on a barrier two
        # phases behind would pass at once
        mbarrier.wait(k_bar.index(slot), phase)
        if ((gl.load(half_bits + u // 64) >> (u % 64)) & 1) != 0:
            s = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), zero, use_acc=False)
            p, m_i, l_i, alpha = _probabilities(s, u, m_i, l_i, ublocks, bits, rv, pos,
                                                offs_n, scale_log2, BS)
            acc = acc * gl.expand_dims(alpha, 1)
            p = gl.convert_layout(p.to(Q.dtype.element_ty), dot_a)
            mbarrier.wait(v_bar.index(slot), phase)
            acc = warpgroup_mma(p, v_ring.index(slot), acc)
        else:
            mbarrier.wait(v_bar.index(slot), phase)
        mbarrier.arrive(empty.index(slot), count=1)
    lse = gl.where(l_i > 0, (m_i + gl.log2(l_i)) * 0.6931471805599453, float("-inf"))
    gl.store(LSE + (q0 + i).to(gl.int64) * stride_lt + h * G + r % G, lse, mask=rv)
    out = acc / gl.expand_dims(gl.maximum(l_i, 1e-30), 1)
    o_rows = gl.expand_dims((q0 + i_st).to(gl.int64) * stride_ot + (h * G + r_st % G) *
                            stride_oh, 1)
    gl.store(OUT + o_rows + d_st, gl.convert_layout(out.to(OUT.dtype.element_ty), st),
             mask=rv_st)


@gluon.jit
def union_kernel(Q, K_DESC, V_DESC, U, NU, BITS, HALVES, TQ0, TN, TKBASE, TOFF, OUT, LSE, num_tiles,
                 scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                 HS: gl.constexpr, G: gl.constexpr, QT: gl.constexpr, D: gl.constexpr,
                 BS: gl.constexpr, W: gl.constexpr, NW: gl.constexpr, STAGES: gl.constexpr,
                 num_warps: gl.constexpr):
    """One tile x one KV head (grid: tiles, Hkv; ``msa.ops.attention.union.UnionPlan``'s
    arrays; ``K_DESC, V_DESC``: TMA descriptors over ``[total_k, Hkv * D]``, boxes of
    ``BS`` keys x ``D``)."""
    tile = gl.program_id(0)
    h = gl.program_id(1)
    urow = (h if HS > 1 else 0) * num_tiles + tile
    q0 = gl.load(TQ0 + tile)
    n = gl.load(TN + tile)
    kbase = gl.load(TKBASE + tile)
    off = gl.load(TOFF + tile)
    nu = gl.load(NU + urow)
    ublocks = U + urow.to(gl.int64) * W
    bits_base = BITS + urow.to(gl.int64) * QT * NW
    halves = HALVES + urow.to(gl.int64) * 2 * NW
    q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [2, HALF, D], TILE_L)
    k_ring = gl.allocate_shared_memory(Q.dtype.element_ty, [STAGES, BS, D], TILE_L)
    v_ring = gl.allocate_shared_memory(Q.dtype.element_ty, [STAGES, BS, D], TILE_L)
    bar_l: gl.constexpr = mbarrier.MBarrierLayout()
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(s), count=1)
        mbarrier.init(v_bar.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    fence_async_shared()
    gl.warp_specialize([
        (_attend, (Q, OUT, LSE, q_smem.index(0), k_ring, v_ring, k_bar, v_bar, empty, ublocks,
                   bits_base, halves, nu, q0, n, off, h, scale_log2, stride_qt, stride_qh,
                   stride_ot, stride_oh, stride_lt, 0, G, QT, D, BS, NW, STAGES, num_warps)),
        (_attend, (Q, OUT, LSE, q_smem.index(1), k_ring, v_ring, k_bar, v_bar, empty, ublocks,
                   bits_base, halves + NW, nu, q0, n, off, h, scale_log2, stride_qt,
                   stride_qh, stride_ot, stride_oh, stride_lt, 1, G, QT, D, BS, NW, STAGES,
                   4)),
        (union_loader, (K_DESC, V_DESC, k_ring, v_ring, k_bar, v_bar, empty, ublocks, nu,
                        kbase, h, D, BS, STAGES))],
        [4, 1], [232, 24])


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
              paged: bool) -> bool:
    """Whether ``union_kernel`` runs these inputs (``[T, H, D]``): a Hopper GPU (sm_90),
    bf16 / fp16, head dim 128, blocks of 128, a group of at most 128 heads, contiguous
    (not paged) keys whose heads are adjacent, rows 16-byte aligned."""
    if not on_hopper(q) or paged:
        return False
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
            and v.dtype == q.dtype and q.shape[-1] == 128 and block_size == 128
            and q.shape[1] % k.shape[1] == 0 and q.shape[1] // k.shape[1] <= TILE_ROWS
            and q.stride(-1) == 1 and q.stride(1) % 8 == 0
            and q.stride(0) % 8 == 0 and q.data_ptr() % 16 == 0
            and all(x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.stride(0) % 8 == 0
                    and x.data_ptr() % 16 == 0 and x.shape[0] > 0 for x in (k, v)))


def key_rows(x: torch.Tensor, block_size: int) -> TensorDescriptor:
    """A TMA descriptor over ``x [total_k, Hkv, D]`` as ``[total_k, Hkv * D]`` rows, boxes
    of ``block_size`` keys x ``D`` in ``TILE_L``."""
    t, h, d = x.shape
    return TensorDescriptor(x, [t, h * d], [x.stride(0), 1], [block_size, d], TILE_L.value)


def launch(q, k, v, up, out, lse, *, scale_log2: float, block_size: int, heads_sel: int,
           stages: int = STAGES) -> None:
    """``union_kernel`` over union plan ``up`` (tiles of ``TILE_ROWS`` rows) into ``out``
    and ``lse`` (``union_fwd``'s arguments)."""
    hkv = k.shape[1]
    union_kernel[(up.num_tiles, hkv)](
        q, key_rows(k, block_size), key_rows(v, block_size), up.blocks, up.count, up.bits,
        up.halves, up.tile_q0, up.tile_n, up.tile_kbase, up.tile_off, out, lse, up.num_tiles,
        scale_log2, q.stride(0), q.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        HS=heads_sel, G=q.shape[1] // hkv, QT=up.qt, D=q.shape[2], BS=block_size,
        W=up.blocks.shape[2], NW=up.bits.shape[3], STAGES=stages, num_warps=4)
