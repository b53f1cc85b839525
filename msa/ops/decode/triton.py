"""Triton fused paged decode and multi-token decode (``paged_decode``).

Each of the ``B`` requests decodes ``Q`` query tokens (1: decode, 2..16: multi-token /
speculative) at positions ``seq_len_b - Q + i``, against its paged cache (page = block,
docs/semantics.md, "Paged layout"). ``paged_decode`` launches, with no host
synchronisation and no allocation:

1. ``paged_block_max_kernel``: grid (request, page split). Each program reads its pages
   of index keys once through the page table and scores them for all ``Q x Hi`` query
   rows of the request with one MMA per page, writing causal block maxima
   ``M [B*Q, Hi, max_pages]`` (``-inf`` past the end).
2. ``msa.ops.decode.topk.decode_topk``: top-k of ``M`` per (query, index head) with the
   reference rule (score desc, id asc, local block last, ``-1`` padding) -> head-major
   ``topk_indices [Hi, B*Q, K]``.
3. ``paged_decode_attn_kernel``: grid (query, KV head, split of the K selected blocks):
   the ``G`` query heads of the group are the MMA rows; the split's selected blocks and
   their pages are loaded once, then each page is read (a predicated loop whose K/V
   loads Triton pipelines), online softmax; one split writes the output directly, more
   splits write partials merged by ``paged_decode_combine_kernel`` (LSE combine).

The plan/run lifecycle around it (validation, preallocated buffers, CUDA graphs) is
``msa.inference.PagedDecoder``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .topk import TARGET_PROGRAMS, decode_topk
from ..triton_utils import (LN2, LOG2E, dequant_rows, dot, next_pow2, online_softmax_step,
                            precision, to_e4m3, upcast)


@triton.jit
def paged_block_max_kernel(
        QI, KI, KIS, PAGE_TABLE, SEQ_LENS, M, scale, max_pages,
        stride_qt, stride_qh, stride_kp, stride_kt, stride_tb, stride_mc, stride_mh,
        NQ: tl.constexpr, HI: tl.constexpr, ROWS: tl.constexpr, DI: tl.constexpr,
        BS: tl.constexpr, PAGES: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, MASK_TAIL: tl.constexpr = False, FP8: tl.constexpr = False):
    b = tl.program_id(0)
    n = tl.load(SEQ_LENS + b)
    offs_r = tl.arange(0, ROWS)
    i = offs_r // HI
    h = offs_r % HI
    rmask = offs_r < NQ * HI
    pos = n - NQ + i
    qrow = (b * NQ + i).to(tl.int64)
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, DI)
    qi = tl.load(QI + qrow[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                 mask=rmask[:, None], other=0.0)
    m_off = qrow * stride_mc + h * stride_mh
    row_scale = scale
    if FP8:                 # the queries quantized as msa.ops.quant.quantize_e4m3 does
        qf = qi.to(tl.float32)
        amax = tl.max(tl.abs(qf), 1)
        qs = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)      # IEEE, as torch
        q8 = to_e4m3(tl.clamp(tl.math.div_rn(qf, qs[:, None]), -448.0, 448.0))
        row_scale = qs * scale              # max commutes with a positive row factor
    for jj in range(PAGES):                 # predicated (not branched): pipelined loads
        j = tl.program_id(1) * PAGES + jj
        live = j * BS < n                   # pages past the end: no loads, M = -inf
        page = tl.load(PAGE_TABLE + b * stride_tb + j, mask=live, other=0).to(tl.int64)
        kptr = KI + page * stride_kp + offs_n[:, None] * stride_kt + offs_d[None, :]
        if MASK_TAIL:                   # rows past the last token may lie past the tensor
            rows = live & (j * BS + offs_n < n)
            ki = tl.load(kptr, mask=rows[:, None], other=0.0)
        else:                           # whole pages of a pool: read them whole
            rows = live
            ki = tl.load(kptr, mask=live, other=0.0)
        if FP8:                         # e4m3 x e4m3 products x the keys' row scales
            s = dot(q8, tl.trans(ki), "tf32", False) * \
                tl.load(KIS + page * BS + offs_n, mask=rows, other=0.0)[None, :]
        else:
            s = dot(qi, tl.trans(ki), PRECISION, UPCAST)
        s = tl.where((j * BS + offs_n)[None, :] <= pos[:, None], s, float("-inf"))
        tl.store(M + m_off + j, tl.max(s, 1) * row_scale, mask=rmask & (j < max_pages))


@triton.jit
def paged_decode_attn_kernel(
        Q, K, V, KS, VS, TOPK_INDICES, PAGE_TABLE, SEQ_LENS, OUT, LSE, PO, PL, scale_log2,
        stride_qt, stride_qh, stride_kp, stride_kh, stride_kt, stride_th, stride_tq,
        stride_tb, stride_ot, stride_oh, stride_lt, stride_sp, stride_sh,
        NQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
        G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TOPK: tl.constexpr,
        PER_SPLIT: tl.constexpr, PER_PAD: tl.constexpr, NSPLIT: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr = False,
        STAGES: tl.constexpr = 2):
    c = tl.program_id(0).to(tl.int64)            # query row b * NQ + i
    h = tl.program_id(1)
    sp = tl.program_id(2)
    b = c // NQ
    pos = tl.load(SEQ_LENS + b) - NQ + (c % NQ)
    hs = h if HS > 1 else 0
    offs_g = tl.arange(0, G_PAD)
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    # the split's selected blocks and their pages, loaded once: the loop then waits on no
    # dependent index loads, and it is predicated (no branch), so the K/V loads pipeline
    offs_j = tl.arange(0, PER_PAD)
    jv = sp * PER_SPLIT + offs_j
    sel = tl.load(TOPK_INDICES + hs * stride_th + c * stride_tq + jv,
                  mask=(offs_j < PER_SPLIT) & (jv < TOPK), other=-1)
    sel = tl.where(sel * BS <= pos, sel, -1)                    # -1: nothing to read
    pages = tl.load(PAGE_TABLE + b * stride_tb + sel, mask=sel >= 0, other=0)
    qt = tl.load(Q + c * stride_qt + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                 mask=gmask[:, None], other=0.0)
    m_i = tl.zeros((G_PAD,), dtype=tl.float32) - float("inf")
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    for jj in tl.range(PER_SPLIT, num_stages=STAGES):
        blk = tl.max(tl.where(offs_j == jj, sel, -1), 0)
        page = tl.max(tl.where(offs_j == jj, pages, 0), 0).to(tl.int64)
        kmask = (blk >= 0) & (blk * BS + offs_n <= pos)
        off = page * stride_kp + h * stride_kh + offs_n[:, None] * stride_kt + \
            offs_d[None, :]
        kt = tl.load(K + off, mask=kmask[:, None], other=0.0)
        vt = tl.load(V + off, mask=kmask[:, None], other=0.0)
        if FP8:     # e4m3 rows times their scales (token stride 1), in qt's dtype
            soff = page * stride_sp + h * stride_sh + offs_n
            kt = dequant_rows(kt, KS, soff, kmask, qt.dtype)
            vt = dequant_rows(vt, VS, soff, kmask, qt.dtype)
        m_i, l_i, acc = online_softmax_step(qt, kt, vt, kmask[None, :], m_i, l_i, acc,
                                            scale_log2, PRECISION, UPCAST, True)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * LN2, float("-inf"))
    if NSPLIT == 1:
        tl.store(OUT + c * stride_ot + (h * G + offs_g)[:, None] * stride_oh
                 + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=gmask[:, None])
        tl.store(LSE + c * stride_lt + h * G + offs_g, lse, mask=gmask)
    else:
        base = ((c * HKV + h) * NSPLIT + sp) * G_PAD + offs_g
        tl.store(PO + base[:, None] * D + offs_d[None, :], out)
        tl.store(PL + base, lse)


@triton.jit
def paged_decode_combine_kernel(PO, PL, OUT, LSE, stride_ot, stride_oh, stride_lt,
                                HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                                D: tl.constexpr, NSPLIT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    c = pid // HKV
    h = pid % HKV
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    base = pid * NSPLIT * G_PAD
    m = tl.zeros((G_PAD,), dtype=tl.float32) - float("inf")
    for s in range(NSPLIT):
        m = tl.maximum(m, tl.load(PL + base + s * G_PAD + offs_g))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wsum = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    for s in range(NSPLIT):
        w = tl.exp(tl.load(PL + base + s * G_PAD + offs_g) - m_safe)
        wsum += w
        acc += w[:, None] * tl.load(PO + (base + s * G_PAD + offs_g)[:, None] * D
                                    + offs_d[None, :])
    gmask = offs_g < G
    tl.store(OUT + c * stride_ot + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
             (acc / tl.maximum(wsum, 1e-30)[:, None]).to(OUT.dtype.element_ty),
             mask=gmask[:, None])
    tl.store(LSE + c * stride_lt + h * G + offs_g,
             tl.where(wsum > 0, m_safe + tl.log(wsum), float("-inf")), mask=gmask)


def decode_splits(rows: int, hkv: int, topk: int) -> Tuple[int, int]:
    """``(nsplit, per_split)``: the K selected blocks of each (query, KV head) split over
    enough programs for about two waves (``TARGET_PROGRAMS``)."""
    nsplit = max(1, min(topk, TARGET_PROGRAMS // (rows * hkv)))
    per_split = -(-topk // nsplit)
    return -(-topk // per_split), per_split


def partial_rows(max_batch: int, num_q: int, hkv: int, topk: int) -> int:
    """Rows of the split partial buffers any batch up to ``max_batch`` needs
    (``rows * hkv * nsplit``)."""
    return max(b * num_q * hkv * decode_splits(b * num_q, hkv, topk)[0]
               for b in range(1, max_batch + 1))


def partial_buffers(max_batch: int, num_q: int, num_heads: int, num_kv_heads: int,
                    head_dim: int, topk: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(po, pl)`` fp32: the split partial outputs and LSEs ``paged_attend`` needs for any
    batch up to ``max_batch`` requests of ``num_q`` tokens."""
    g_pad = max(16, next_pow2(num_heads // num_kv_heads))
    n = partial_rows(max_batch, num_q, num_kv_heads, topk)
    f32 = dict(dtype=torch.float32, device=device)
    return torch.empty(n * g_pad * head_dim, **f32), torch.empty(n * g_pad, **f32)


def paged_decode(q, qi, k, v, ki, page_table, seq_lens, *, batch: int, num_q: int,
                 max_pages: int, num_kv_heads: int, block_max, topk_indices, out, lse, po,
                 pl, block_size: int, scale: float, index_scale: float, kv_strides=None,
                 ki_strides=None, ki_page_table=None, mask_tail: bool = False,
                 pages_per_program: int = None, index_stages: int = None,
                 k_scales=None, v_scales=None, ki_scales=None, scale_strides=None) -> None:
    """One decode step of one layer into preallocated buffers (no host synchronisation,
    no allocation: capturable in a CUDA graph): ``paged_select`` then ``paged_attend``.

    q ``[B*Q, Hq, D]``, qi ``[B*Q, Hi, Di]`` (request-major); pages ``k, v [P, Hkv, page,
    D]`` (``Hkv = num_kv_heads``), ``ki [P, page, Di]`` read through
    ``page_table [>=B, max_pages]`` int32
    (``ki_page_table`` for the index keys, default the same) with seq_lens ``[>=B]``
    int32 (queries included). ``kv_strides`` / ``ki_strides``: the element strides
    (page, head, token) / (page, token) when ``k, v, ki`` are other tensors whose rows
    are addressed that way (default: the pages' own strides; the last dim is contiguous);
    ``mask_tail``: read no index-key row past a request's last token (when the last page
    may extend past the tensor; whole pages of a pool are read whole, which is faster).
    Writes block_max ``[B*Q, Hi, max_pages]`` fp32, topk_indices ``[Hi, B*Q, K]`` int32,
    out ``[B*Q, Hq, D]``, lse ``[B*Q, Hq]`` fp32; po / pl: split partials of at least
    ``partial_rows`` rows x ``G_pad * D`` / ``G_pad`` fp32. FP8 pages (e4m3 ``k, v, ki``)
    come with their row scales: ``k_scales, v_scales [P, Hkv, page]``, ``ki_scales
    [P, page]`` fp32, contiguous (``msa.ops.quant``); e4m3 index keys are scored against
    e4m3 index queries (quantized in the kernel by the same rule, docs/semantics.md).
    ``scale_strides``: the (page, head) strides of ``k_scales, v_scales`` when they are
    other tensors addressed that way (their token stride is 1; the index-key scale of
    token ``n`` of page ``p`` is ``ki_scales.view(-1)[p * page + n]``).
    """
    paged_select(qi, ki, page_table if ki_page_table is None else ki_page_table, seq_lens,
                 batch=batch, num_q=num_q, max_pages=max_pages, block_max=block_max,
                 topk_indices=topk_indices, block_size=block_size, index_scale=index_scale,
                 ki_strides=ki_strides, mask_tail=mask_tail,
                 pages_per_program=pages_per_program, index_stages=index_stages,
                 ki_scales=ki_scales)
    paged_attend(q, k, v, topk_indices, page_table, seq_lens, batch=batch, num_q=num_q,
                 num_kv_heads=num_kv_heads, out=out, lse=lse, po=po, pl=pl,
                 block_size=block_size, scale=scale, kv_strides=kv_strides,
                 k_scales=k_scales, v_scales=v_scales, scale_strides=scale_strides)


def paged_select(qi, ki, ki_table, seq_lens, *, batch: int, num_q: int, max_pages: int,
                 block_max, topk_indices, block_size: int, index_scale: float,
                 ki_strides=None, mask_tail: bool = False, pages_per_program: int = None,
                 index_stages: int = None, ki_scales=None) -> None:
    """The selection of a decode step (see ``paged_decode``): block maxima of the index
    scores into ``block_max``, the top-k into ``topk_indices [Hi, B*Q, K]`` (any strides
    with a contiguous last dim)."""
    b, nq, hi = batch, num_q, topk_indices.shape[0]
    ki_strides = ki_strides or (ki.stride(0), ki.stride(1))
    prec, up = precision(qi.dtype), upcast(qi.dtype)
    per = pages_per_program or \
        max(1, min(16, next_pow2(-(-b * max_pages // TARGET_PROGRAMS))))
    paged_block_max_kernel[(b, triton.cdiv(max_pages, per))](
        qi, ki, ki_scales, ki_table, seq_lens, block_max, index_scale, max_pages,
        qi.stride(0), qi.stride(1), ki_strides[0], ki_strides[1],
        ki_table.stride(0), block_max.stride(0), block_max.stride(1),
        NQ=nq, HI=hi, ROWS=max(16, next_pow2(nq * hi)), DI=qi.shape[-1],
        BS=block_size, PAGES=per, PRECISION=prec, UPCAST=up, MASK_TAIL=mask_tail,
        FP8=ki_scales is not None, num_warps=4,
        num_stages=index_stages or (3 if ki_scales is None else 2))
    decode_topk(block_max, seq_lens, topk_indices, batch=b, num_q=nq, max_pages=max_pages,
                block_size=block_size)


def paged_attend(q, k, v, topk_indices, page_table, seq_lens, *, batch: int, num_q: int,
                 num_kv_heads: int, out, lse, po, pl, block_size: int, scale: float,
                 kv_strides=None, k_scales=None, v_scales=None,
                 scale_strides=None) -> None:
    """The attention of a decode step over ``topk_indices [Hs, B*Q, K]`` (see
    ``paged_decode``), split over the selected blocks and merged by LSE."""
    rows = batch * num_q
    hs, topk = topk_indices.shape[0], topk_indices.shape[2]
    hq, d = q.shape[1], q.shape[2]
    kv_strides = kv_strides or (k.stride(0), k.stride(1), k.stride(2))
    hkv = num_kv_heads
    scale_strides = scale_strides or (hkv * block_size, block_size)
    g = hq // hkv
    prec, up = precision(q.dtype), upcast(q.dtype)
    nsplit, per_split = decode_splits(rows, hkv, topk)
    g_pad = max(16, next_pow2(g))
    fp8 = k_scales is not None
    paged_decode_attn_kernel[(rows, hkv, nsplit)](
        q, k, v, k_scales, v_scales, topk_indices, page_table, seq_lens, out, lse, po, pl,
        scale * LOG2E, q.stride(0), q.stride(1), kv_strides[0], kv_strides[1],
        kv_strides[2], topk_indices.stride(0), topk_indices.stride(1),
        page_table.stride(0), out.stride(0), out.stride(1), lse.stride(0), *scale_strides,
        NQ=num_q, HKV=hkv, HS=hs, G=g, G_PAD=g_pad, D=d, BS=block_size,
        TOPK=topk, PER_SPLIT=per_split, PER_PAD=next_pow2(per_split), NSPLIT=nsplit,
        PRECISION=prec, UPCAST=up, FP8=fp8, STAGES=3 if fp8 else 2, num_warps=4)
    if nsplit > 1:
        paged_decode_combine_kernel[(rows * hkv,)](
            po, pl, out, lse, out.stride(0), out.stride(1), lse.stride(0),
            HKV=hkv, G=g, G_PAD=g_pad, D=d, NSPLIT=nsplit, num_warps=4)
