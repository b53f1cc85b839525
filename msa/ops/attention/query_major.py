"""Triton query-major sparse attention forward, for few queries (decode-like shapes).

One program per (query, KV head): the ``G`` query heads of the group form the MMA rows
(padded to 16), and the program walks the query's selected blocks with an online softmax,
writing the final output and LSE directly: no planning, no partials, no combine. It
re-reads each selected K/V block once per query, so it loses to the KV-outer kernel once
many queries share blocks (see ``QUERY_MAJOR_MAX_QUERIES`` in ``forward.py``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_utils import LN2, LOG2E, next_pow2, online_softmax_step, precision, upcast


@triton.jit(do_not_specialize=["stride_th"])
def sparse_attn_qmajor_kernel(
        Q, K, V, TOPK_INDICES, POS, KBASE, NBLK, OUT, LSE, scale_log2,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_th, stride_tq, stride_ot, stride_oh, stride_lt,
        HKV: tl.constexpr, HS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
        D: tl.constexpr, BS: tl.constexpr, TOPK: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    q = (pid // HKV).to(tl.int64)
    h = pid % HKV
    hs = h if HS > 1 else 0
    pos = tl.load(POS + q)
    kbase = tl.load(KBASE + q).to(tl.int64)
    nb = tl.load(NBLK + q)
    offs_g = tl.arange(0, G_PAD)
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    qt = tl.load(Q + q * stride_qt + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                 mask=gmask[:, None], other=0.0)
    m_i = tl.zeros((G_PAD,), dtype=tl.float32) - float("inf")
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    for j in range(TOPK):
        blk = tl.load(TOPK_INDICES + hs * stride_th + q * stride_tq + j)
        if (blk >= 0) & (blk < nb) & (blk * BS <= pos):
            t = blk * BS + offs_n
            kmask = t <= pos
            rows = kbase + t
            kt = tl.load(K + rows[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                         mask=kmask[:, None], other=0.0)
            vt = tl.load(V + rows[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
                         mask=kmask[:, None], other=0.0)
            m_i, l_i, acc = online_softmax_step(qt, kt, vt, kmask[None, :], m_i, l_i, acc,
                                                scale_log2, PRECISION, UPCAST, True)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(OUT + q * stride_ot + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=gmask[:, None])
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * LN2, float("-inf"))
    tl.store(LSE + q * stride_lt + h * G + offs_g, lse, mask=gmask)


def sparse_attn_fwd_query_major(q, k, v, topk_indices, rows, out, lse, *, scale: float) -> None:
    """Write ``out [total_q, Hq, D]`` and ``lse [total_q, Hq]`` (see module docstring).

    ``rows``: ``msa.ops.geometry.block_rows`` of the layout; topk_indices ``[Hs, total_q, K]``
    int32;
    the block size is ``rows``'s.
    """
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    sparse_attn_qmajor_kernel[(total_q * hkv,)](
        q, k, v, topk_indices, rows.q_pos, rows.q_kbase, rows.q_nblocks, out, lse, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        topk_indices.stride(0), topk_indices.stride(1), out.stride(0), out.stride(1),
        lse.stride(0),
        HKV=hkv, HS=topk_indices.shape[0], G=g, G_PAD=max(16, next_pow2(g)), D=d,
        BS=rows.block_size, TOPK=topk_indices.shape[2], PRECISION=precision(q.dtype),
        UPCAST=upcast(q.dtype), num_warps=4, num_stages=2)
