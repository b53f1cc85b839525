"""Triton indexer-KL backward, KV-outer.

One program per work item of the planning over the *index* top-k (index head ``h``, KV
block, slice of the queries that selected it). For each tile of ``BLOCK_T`` gathered
tokens it recomputes, over the block's causally visible keys,

    teacher = mean over the Q heads served by index head h of exp(scale q.k - teacher_lse)
    student = exp(index_scale qi.ki - indexer_lse)
    dz      = loss_coeff / (Hi * total_q) * (student - teacher)

and adds ``index_scale * dz @ ki`` to ``dqi`` (per tile) and ``index_scale * dz^T @ qi``
to ``dki`` (once per item), plus the KL terms to the loss; all fp32 atomics. The student
GEMMs need 16 MMA rows, so each token's row is replicated ``R`` times with weight ``1/R``.
The LSEs are trusted (attention forward LSE and the indexer's selected LSE over the same
selection).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...varlen import Segments
from ..attention.forward import (INTERPRETER, LOG2E, _dot, _next_pow2, check_supported,
                                 load_item)
from ..prepare import block_rows, plan_chunks


@triton.jit
def indexer_kl_bwd_kernel(
        Q, K, TLSE, QI, KI, ILSE, DQI, DKI, LOSS, POS, EDGE_Q,
        ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0, ITEM_E1,
        scale_log2, iscale, iscale_log2, coeff,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_tl, stride_it, stride_ih,
        stride_kit, stride_lh,
        G: tl.constexpr, G_PAD: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
        DI: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr, R: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    h, krow, t0, nk, e0, e1 = load_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                                        ITEM_E1, tl.program_id(0))
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    offs_di = tl.arange(0, DI)
    kmask = offs_n < nk
    ki = tl.load(KI + (krow + offs_n)[:, None] * stride_kit + offs_di[None, :],
                 mask=kmask[:, None], other=0.0)
    dki = tl.zeros((BS, DI), dtype=tl.float32)
    # teacher rows: (token, q head of the group); student rows: (token, replica)
    offs_m = tl.arange(0, BLOCK_T * G_PAD)
    tok_m = offs_m // G_PAD
    g_m = offs_m % G_PAD
    offs_r = tl.arange(0, BLOCK_T * R)
    tok_r = offs_r // R
    loss = 0.0
    for e in range(e0, e1, BLOCK_T):
        # student
        er = e + tok_r
        rmask = er < e1
        qr = tl.load(EDGE_Q + er, mask=rmask, other=0).to(tl.int64)
        pos_r = tl.load(POS + qr, mask=rmask, other=-1)
        qi = tl.load(QI + qr[:, None] * stride_it + h * stride_ih + offs_di[None, :],
                     mask=rmask[:, None], other=0.0)
        ilse = tl.load(ILSE + h * stride_lh + qr, mask=rmask, other=float("inf"))
        ilse = tl.where(ilse == float("-inf"), float("inf"), ilse)
        z = _dot(qi, tl.trans(ki), PRECISION, UPCAST)
        allowed_r = ((t0 + offs_n)[None, :] <= pos_r[:, None]) & kmask[None, :] & \
            rmask[:, None]
        log_ps = z * iscale - ilse[:, None]
        ps = tl.where(allowed_r, tl.exp(log_ps), 0.0)                 # [BLOCK_T*R, BS]
        # teacher, accumulated over the KV heads and Q heads of index head h
        em = e + tok_m
        mmask = (em < e1) & (g_m < G)
        qm = tl.load(EDGE_Q + em, mask=em < e1, other=0).to(tl.int64)
        pos_m = tl.load(POS + qm, mask=em < e1, other=-1)
        allowed_m = ((t0 + offs_n)[None, :] <= pos_m[:, None]) & kmask[None, :] & \
            mmask[:, None]
        sel = (tok_r[:, None] == tok_m[None, :]).to(tl.float32)       # [BLOCK_T*R, M]
        pt_r = tl.zeros((BLOCK_T * R, BS), dtype=tl.float32)
        for j in range(NKV):
            kh = h * NKV + j
            kt = tl.load(K + (krow + offs_n)[:, None] * stride_kt + kh * stride_kh
                         + offs_d[None, :], mask=kmask[:, None], other=0.0)
            head = kh * G + g_m
            qt = tl.load(Q + qm[:, None] * stride_qt + head[:, None] * stride_qh
                         + offs_d[None, :], mask=mmask[:, None], other=0.0)
            tlse = tl.load(TLSE + qm * stride_tl + head, mask=mmask, other=float("inf"))
            tlse = tl.where(tlse == float("-inf"), float("inf"), tlse) * 1.4426950408889634
            s = _dot(qt, tl.trans(kt), PRECISION, UPCAST) * scale_log2
            p = tl.where(allowed_m, tl.exp2(s - tlse[:, None]), 0.0)
            # head sum onto the replicated student rows as one MMA: pt_r = A @ p
            pt_r += _dot(sel, p, PRECISION, UPCAST)
        pt_r = pt_r / (G * NKV)
        log_pt = tl.log(tl.where(pt_r > 0, pt_r, 1.0))
        loss += tl.sum(tl.sum(tl.where(pt_r > 0, pt_r * (log_pt - log_ps), 0.0), 1)) / R
        dz = (coeff / R) * (ps - pt_r)                               # replicas share 1/R
        dqi = _dot(dz.to(ki.dtype), ki, PRECISION, UPCAST) * iscale
        tl.atomic_add(DQI + qr[:, None] * stride_it + h * stride_ih + offs_di[None, :], dqi,
                      mask=rmask[:, None], sem="relaxed")
        dki += _dot(tl.trans(dz.to(qi.dtype)), qi, PRECISION, UPCAST)
    tl.atomic_add(DKI + (krow + offs_n)[:, None] * DI + offs_di[None, :], dki * iscale,
                  mask=kmask[:, None], sem="relaxed")
    tl.atomic_add(LOSS, loss * coeff, sem="relaxed")


def indexer_kl_bwd(q, k, teacher_lse, qi, ki, indexer_lse, topk, seg: Segments, *,
                   block_size: int, scale: float, index_scale: float, loss_coeff: float = 1.0,
                   q_per_item: int = 256, block_t: int = None, num_warps: int = 8,
                   num_stages: int = 2, fp32_grads: bool = False):
    """KL loss and gradients ``(loss, dqi, dki)`` (spec 7.2, fp32 ``dz``); the gradients
    have the dtypes of qi / ki, or stay fp32 with ``fp32_grads`` (for callers that sum
    several calls).

    q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, teacher_lse ``[total_q, Hq]`` (the
    attention forward LSE), qi ``[total_q, Hi, Di]``, ki ``[total_k, 1, Di]``,
    indexer_lse ``[Hi, total_q]`` (selected LSE), topk ``[Hi, total_q, K]``.
    ``block_t`` (tokens per tile), ``num_warps``, ``num_stages``: launch parameters; the
    defaults (64-row teacher tiles, 8 warps, 2 stages) were the fastest of a sweep on an
    H100 at 64K tokens (``benchmarks/results/sweep_attention_bwd_h100_2026-11-26.json``).
    """
    total_q, hq, d = q.shape
    hkv, hi, di = k.shape[1], qi.shape[1], qi.shape[2]
    check_supported(q.dtype, max(d, di))
    if ki.shape[1] != 1:
        raise NotImplementedError("the Triton KL backward needs one shared index-key head")
    q, k, qi = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, qi))
    ki2 = ki[:, 0].contiguous()
    dqi = torch.zeros(qi.shape, dtype=torch.float32, device=q.device)
    dki = torch.zeros((ki.shape[0], di), dtype=torch.float32, device=q.device)
    loss = torch.zeros((), dtype=torch.float32, device=q.device)
    if total_q:
        tlse, ilse = teacher_lse.float().contiguous(), indexer_lse.float().contiguous()
        g, nkv = hq // hkv, hkv // hi
        g_pad = _next_pow2(g)
        block_t = block_t or max(1, 64 // g_pad)
        rep = max(1, 16 // block_t)
        rows = block_rows(seg, block_size, q.device)
        topk = topk.to(torch.int32).contiguous()
        coeff = loss_coeff / (hi * total_q)
        for _, _, plan in plan_chunks(topk, rows, 0, total_q, total_q, hi, q_per_item):
            if not plan.num_items:
                continue
            indexer_kl_bwd_kernel[(plan.num_items,)](
                q, k, tlse, qi, ki2, ilse, dqi, dki, loss, rows.q_pos, plan.edge_q,
                plan.item_h, plan.item_krow, plan.item_t0, plan.item_nk, plan.item_e0,
                plan.item_e1, scale * LOG2E, index_scale, index_scale * LOG2E, coeff,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), tlse.stride(0),
                qi.stride(0), qi.stride(1), ki2.stride(0), ilse.stride(0),
                G=g, G_PAD=g_pad, NKV=nkv, D=d, DI=di, BS=block_size, BLOCK_T=block_t,
                R=rep, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST=INTERPRETER and q.dtype == torch.bfloat16, num_warps=num_warps,
                num_stages=num_stages)
    dki = dki.view(ki.shape)
    if fp32_grads:
        return loss, dqi, dki
    return loss, dqi.to(qi.dtype), dki.to(ki.dtype)
