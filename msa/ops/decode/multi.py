"""Multi-token decode attention: one program per (request, KV head, split) over the union
of the blocks its ``Q`` query tokens selected.

``Q`` tokens of a request mostly select the same blocks. ``paged_decode_attn_kernel``
runs one program per token, so a block selected by all ``Q`` tokens is read (and, for
FP8 pages, dequantized) ``Q`` times, each time for the ``G`` heads of one token (an MMA
of ``G`` rows). ``paged_decode_union_kernel`` reads each distinct block once and scores
it for all ``Q x G`` rows of the request at once (rows of tokens that did not select it,
and keys past a token's position, masked), the online softmax per row as before. The
selected entries ``[Q, K]`` are walked in order; a block is attended at its first
occurrence, by the split that holds that entry. Partial outputs use the layout of
``paged_decode_combine_kernel``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .topk import TARGET_PROGRAMS
from ..triton_utils import LN2, next_pow2, online_softmax_step

MAX_ROWS = 128          # Q x G rows per program (the accumulator stays in registers)


@triton.jit
def paged_decode_union_kernel(
        Q, K, V, KS, VS, TOPK_INDICES, PAGE_TABLE, SEQ_LENS, OUT, LSE, PO, PL, scale_log2,
        stride_qt, stride_qh, stride_kp, stride_kh, stride_kt, stride_th, stride_tq,
        stride_tb, stride_ot, stride_oh, stride_lt, stride_sp, stride_sh,
        NQ: tl.constexpr, NQ_PAD: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr,
        G: tl.constexpr, G_ROWS: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        BS: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
        PER_SPLIT: tl.constexpr, NSPLIT: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, FP8: tl.constexpr = False):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    hs = h if HS > 1 else 0
    n = tl.load(SEQ_LENS + b)
    # the request's selection [NQ_PAD, TOPK_PAD] (-1: none) and its flat entry order
    sel_t = tl.arange(0, NQ_PAD)
    sel_s = tl.arange(0, TOPK_PAD)
    sel = tl.load(TOPK_INDICES + hs * stride_th + (b * NQ + sel_t)[:, None] * stride_tq
                  + sel_s[None, :], mask=(sel_t[:, None] < NQ) & (sel_s[None, :] < TOPK),
                  other=-1)
    flat = sel_t[:, None] * TOPK + sel_s[None, :]
    # rows: token r // G_ROWS, head r % G_ROWS of the group
    R: tl.constexpr = NQ_PAD * G_ROWS
    offs_r = tl.arange(0, R)
    tok = offs_r // G_ROWS
    g = offs_r % G_ROWS
    rmask = (tok < NQ) & (g < G)
    pos = n - NQ + tok
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    qt = tl.load(Q + (b * NQ + tok)[:, None] * stride_qt + (h * G + g)[:, None] * stride_qh
                 + offs_d[None, :], mask=rmask[:, None], other=0.0)
    m_i = tl.zeros((R,), dtype=tl.float32) - float("inf")
    l_i = tl.zeros((R,), dtype=tl.float32)
    acc = tl.zeros((R, D), dtype=tl.float32)
    for jj in range(PER_SPLIT):
        e = sp * PER_SPLIT + jj
        et = e // TOPK
        blk = tl.load(TOPK_INDICES + hs * stride_th + (b * NQ + et) * stride_tq + e % TOPK,
                      mask=e < NQ * TOPK, other=-1)
        seen = tl.max(tl.where((flat < e) & (sel == blk), 1, 0))     # an earlier entry
        if (blk >= 0) & (seen == 0):
            picked = tl.max(tl.where(sel == blk, 1, 0), 1)           # [NQ_PAD]: who chose it
            row_on = tl.sum(tl.where(sel_t[None, :] == tok[:, None], picked[None, :], 0), 1)
            page = tl.load(PAGE_TABLE + b * stride_tb + blk).to(tl.int64)
            key = blk * BS + offs_n
            live = key < n
            off = page * stride_kp + h * stride_kh + offs_n[:, None] * stride_kt + \
                offs_d[None, :]
            kt = tl.load(K + off, mask=live[:, None], other=0.0)
            vt = tl.load(V + off, mask=live[:, None], other=0.0)
            if FP8:                 # e4m3 rows x their scales (token stride 1)
                soff = page * stride_sp + h * stride_sh + offs_n
                kt = (kt.to(tl.float32) * tl.load(KS + soff, mask=live, other=0.0)[:, None]
                      ).to(qt.dtype)
                vt = (vt.to(tl.float32) * tl.load(VS + soff, mask=live, other=0.0)[:, None]
                      ).to(qt.dtype)
            kmask = (row_on > 0)[:, None] & (key[None, :] <= pos[:, None])
            m_i, l_i, acc = online_softmax_step(qt, kt, vt, kmask, m_i, l_i, acc,
                                                scale_log2, PRECISION, UPCAST, True)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * LN2, float("-inf"))
    c = b * NQ + tok
    if NSPLIT == 1:
        tl.store(OUT + c[:, None] * stride_ot + (h * G + g)[:, None] * stride_oh
                 + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=rmask[:, None])
        tl.store(LSE + c * stride_lt + h * G + g, lse, mask=rmask)
    else:
        base = ((c * HKV + h) * NSPLIT + sp) * G_PAD + g
        tl.store(PO + base[:, None] * D + offs_d[None, :], out, mask=rmask[:, None])
        tl.store(PL + base, lse, mask=rmask)


def union_rows(num_q: int, g: int) -> int:
    """MMA rows of a ``paged_decode_union_kernel`` program (``Q x G`` padded)."""
    return max(16, next_pow2(num_q) * next_pow2(g))


def union_splits(batch: int, hkv: int, num_q: int, topk: int, max_splits: int):
    """``(nsplit, per_split)``: the ``Q x K`` selected entries of each (request, KV head)
    over enough programs for about two waves, at most ``max_splits``."""
    entries = num_q * topk
    nsplit = max(1, min(entries, max_splits, TARGET_PROGRAMS // (batch * hkv)))
    per_split = -(-entries // nsplit)
    return -(-entries // per_split), per_split


def launch_union(q, k, v, k_scales, v_scales, topk_indices, page_table, seq_lens, out, lse,
                 po, pl, *, batch: int, num_q: int, hkv: int, block_size: int, scale_log2,
                 kv_strides, scale_strides, g_pad: int, max_splits: int, prec, up):
    """``paged_decode_union_kernel`` over ``batch x hkv x nsplit`` programs; returns
    ``nsplit`` (more than 1: the partials wait for ``paged_decode_combine_kernel``)."""
    hs, topk = topk_indices.shape[0], topk_indices.shape[2]
    g = q.shape[1] // hkv
    nsplit, per_split = union_splits(batch, hkv, num_q, topk, max_splits)
    rows = union_rows(num_q, g)
    paged_decode_union_kernel[(batch, hkv, nsplit)](
        q, k, v, k_scales, v_scales, topk_indices, page_table, seq_lens, out, lse, po, pl,
        scale_log2, q.stride(0), q.stride(1), *kv_strides, topk_indices.stride(0),
        topk_indices.stride(1), page_table.stride(0), out.stride(0), out.stride(1),
        lse.stride(0), *scale_strides,
        NQ=num_q, NQ_PAD=next_pow2(num_q), HKV=hkv, HS=hs, G=g,
        G_ROWS=rows // next_pow2(num_q), G_PAD=g_pad, D=q.shape[2], BS=block_size,
        TOPK=topk, TOPK_PAD=next_pow2(topk), PER_SPLIT=per_split, NSPLIT=nsplit,
        PRECISION=prec, UPCAST=up, FP8=k_scales is not None,
        num_warps=8 if rows >= 128 else 4)
    return nsplit
