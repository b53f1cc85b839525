"""Triton sparse attention backward, KV-outer (first version; not yet benchmarked).

``sparse_attn_bwd_kernel``: one program per work item of the forward planning (KV head,
KV block, slice of the queries that selected it). It loads K and V of the block once,
then for each tile of gathered (query, head) rows recomputes ``P = exp(S - lse)`` and

    dV += P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK += dS^T Q,   dQ += dS K

``dK``/``dV`` accumulate in registers over the item's tiles and are added once into fp32
buffers; ``dQ`` rows are added per tile. All adds are fp32 atomics (blocks split over
several items, and KV rows shared by fragments, sum correctly; the summation order, and
so the last bits, vary between runs). Keys no query selected keep exactly zero gradient.
``delta = rowsum(dO * O)`` is computed beforehand.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...varlen import Segments
from ..prepare import block_rows, plan_chunks
from .forward import INTERPRETER, LOG2E, _dot, _next_pow2, check_supported, load_item


@triton.jit
def sparse_attn_bwd_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV, POS, EDGE_Q,
        ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0, ITEM_E1, scale, scale_log2,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_lt,
        HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
        D: tl.constexpr, BS: tl.constexpr, BLOCK_Q: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    h, krow, t0, nk, e0, e1 = load_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                                        ITEM_E1, tl.program_id(0))
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    kmask = offs_n < nk
    kv_off = (krow + offs_n)[:, None] * stride_kt + h * stride_kh + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kmask[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=kmask[:, None], other=0.0)
    dk = tl.zeros((BS, D), dtype=tl.float32)
    dv = tl.zeros((BS, D), dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_Q * G_PAD)
    tok = offs_m // G_PAD
    g = offs_m % G_PAD
    for e in range(e0, e1, BLOCK_Q):
        eidx = e + tok
        emask = (eidx < e1) & (g < G)
        qg = tl.load(EDGE_Q + eidx, mask=emask, other=0).to(tl.int64)
        pos = tl.load(POS + qg, mask=emask, other=-1)
        head = h * G + g
        row_off = qg[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
        qt = tl.load(Q + row_off, mask=emask[:, None], other=0.0)
        do = tl.load(DO + row_off, mask=emask[:, None], other=0.0)
        lse = tl.load(LSE + qg * stride_lt + head, mask=emask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + qg * stride_lt + head, mask=emask, other=0.0)
        s = _dot(qt, tl.trans(k), PRECISION, UPCAST) * scale_log2
        allowed = ((t0 + offs_n)[None, :] <= pos[:, None]) & kmask[None, :] & emask[:, None]
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(qt.dtype)), qt, PRECISION, UPCAST)
        dq = _dot(ds.to(k.dtype), k, PRECISION, UPCAST) * scale
        tl.atomic_add(DQ + row_off, dq, mask=emask[:, None])
    tl.atomic_add(DK + kv_off, dk * scale, mask=kmask[:, None])
    tl.atomic_add(DV + kv_off, dv, mask=kmask[:, None])


def sparse_attn_bwd(q, k, v, topk, seg: Segments, out, lse, dout, *, block_size: int,
                    scale: float, q_per_item: int = 256):
    """Gradients ``(dq, dk, dv)`` (dtypes of q, k, v) of the sparse attention.

    q, dout, out: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]``; lse ``[total_q, Hq]``
    fp32 from the forward; topk ``[Hs, total_q, K]``.
    """
    q, k, v, dout = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, dout))
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    check_supported(q.dtype, d)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    if total_q:
        lse = lse.float().contiguous()
        delta = (dout.float() * out.float()).sum(-1).contiguous()       # [total_q, Hq]
        rows = block_rows(seg, block_size, q.device)
        topk = topk.to(torch.int32).contiguous()
        g = hq // hkv
        g_pad = _next_pow2(g)
        block_q = max(1, 64 // g_pad)
        for q0, _, plan in plan_chunks(topk, rows, 0, total_q, total_q, hkv, q_per_item):
            if not plan.num_items:
                continue
            sparse_attn_bwd_kernel[(plan.num_items,)](
                q, k, v, dout, lse, delta, dq, dk, dv, rows.q_pos, plan.edge_q,
                plan.item_h, plan.item_krow, plan.item_t0, plan.item_nk, plan.item_e0,
                plan.item_e1, scale, scale * LOG2E,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
                HQ=hq, HKV=hkv, G=g, G_PAD=g_pad, D=d, BS=block_size, BLOCK_Q=block_q,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST=INTERPRETER and q.dtype == torch.bfloat16, num_warps=4, num_stages=1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
