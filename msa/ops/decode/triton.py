"""Triton fused paged decode and multi-token decode (``paged_decode``).

Each of the ``B`` requests decodes ``Q`` query tokens (1: decode, 2..16: multi-token /
speculative) at positions ``seq_len_b - Q + i``, against its paged cache (page = block,
docs/semantics.md, "Paged layout"). ``paged_decode`` launches, with no host
synchronisation and no allocation:

1. ``msa.ops.decode.select.paged_scan_kernel``: grid (request, page chunk). Each program
   reads its pages of index keys once through the page table and scores them for all
   ``Q x Hi`` query rows of the request with one MMA per page, writing one ranking key per
   (row, block); with few rows it ranks its chunk's keys into a list. Over a low-precision
   copy of the index keys (e4m3 or int4) with the exact keys beside it (``ki_exact``), then
   ``msa.ops.decode.rescore`` finds the scan's candidates, scores them again with the
   exact keys (one page per program) and merges those keys into the top-k rows; step 2
   is then skipped and the attention reads the rows.
2. When the attention below runs one program per (query, KV head): one program per row
   merges the lists into the top-k (``paged_merge_kernel``, the reference rule: score
   desc, id asc, local block last, ``-1`` padding) -> head-major
   ``topk_indices [Hi, B*Q, K]``.
3. ``paged_decode_attn_kernel``: grid (query, KV head, split of the K selected blocks):
   with splits, each program (8 warps) merges its row from the lists itself (no launch
   between the scan and the attention); the ``G`` query heads of the group are the MMA
   rows; the split's selected blocks and their pages are loaded once, then each page is read (a
   predicated loop whose K/V loads Triton pipelines), online softmax; one split writes
   the output directly, more splits write partials that the last split of each
   (query, KV head) to finish merges by LSE.

The plan/run lifecycle around it (validation, preallocated buffers, CUDA graphs) is
``msa.inference.PagedDecoder``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..attention.forward import choose_kernel
from .rescore import num_candidates, paged_rescore
from .select import TARGET_PROGRAMS, merge_lists, paged_merge, paged_scan
from ..triton_utils import (LN2, LOG2E, dequant_rows, next_pow2, online_softmax_step,
                            precision, softmax_update, upcast)


@triton.jit
def combine_splits(PO, PL, OUT, LSE, pid, c, h, stride_ot, stride_oh, stride_lt,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                   NSPLIT: tl.constexpr):
    """Merge the ``NSPLIT`` partial outputs of (query row ``c``, KV head ``h``) by LSE
    (``pid = c * HKV + h``; read through L2: other programs wrote them). The split loop
    is unrolled so that its loads are issued together, and each split's LSEs are loaded
    in the layout of the output's rows: the merge needs no cross-thread reduction (no
    barrier)."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    base = pid * NSPLIT * G_PAD
    m = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    for s in tl.static_range(NSPLIT):
        m = tl.maximum(m, tl.load(PL + base + s * G_PAD + offs_g, cache_modifier=".cg"))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    wsum = tl.zeros((G_PAD,), dtype=tl.float32)
    for s in tl.static_range(NSPLIT):
        w = tl.exp(tl.load(PL + base + s * G_PAD + offs_g, cache_modifier=".cg") - m_safe)
        wsum += w
        acc += w[:, None] * tl.load(PO + (base + s * G_PAD + offs_g)[:, None] * D
                                    + offs_d[None, :], cache_modifier=".cg")
    gmask = offs_g < G
    tl.store(OUT + c * stride_ot + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
             (acc / tl.maximum(wsum, 1e-30)[:, None]).to(OUT.dtype.element_ty),
             mask=gmask[:, None])
    tl.store(LSE + c * stride_lt + h * G + offs_g,
             tl.where(wsum > 0, m_safe + tl.log(wsum), float("-inf")), mask=gmask)


@triton.jit
def fp16_rows(x):
    """Rows ``x [M, D]`` (bf16 or fp16) as fp16 times a power of two per row that brings
    their largest magnitude into ``[2^14, 2^15)`` (exact for bf16 values: no overflow, no
    lost mantissa bits above ``2^-28`` of the row's largest) -> ``(x16, 1 / factor)``."""
    xf = x.to(tl.float32)
    amax = tl.max(tl.abs(xf), 1)
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127     # floor(log2(amax))
    f = ((tl.minimum(tl.maximum(14 - e, -126), 127) + 127) << 23).to(tl.float32,
                                                                     bitcast=True)
    f = tl.where(amax > 0, f, 1.0)
    return (xf * f[:, None]).to(tl.float16), 1.0 / f


@triton.jit
def fp8_softmax_step(q16, kt, vt, ks, vs, kmask, q_scale, m_i, l_i, acc):
    """``online_softmax_step`` (base 2) over e4m3 keys ``kt`` and values ``vt [N, D]`` with
    row scales ``ks, vs [N]``, without dequantizing the tiles: e4m3 values are exact in
    fp16, so the MMAs take them as they are; ``q16 [M, D]`` fp16 rows whose scores are
    ``q_scale [M]`` (the softmax scale in base 2 over their factor) times ``ks``, and the
    probabilities meet ``vs`` over its block max (in ``(0, 1]``) before their fp16 MMA,
    whose result is multiplied by that max."""
    s = tl.dot(q16, tl.trans(kt.to(tl.float16))) * q_scale[:, None] * ks[None, :]
    m_new, alpha, p, l_i = softmax_update(tl.where(kmask[None, :], s, float("-inf")),
                                          m_i, l_i)
    v_max = tl.max(vs, 0)
    pv = (p * (vs / tl.maximum(v_max, 1e-30))[None, :]).to(tl.float16)
    acc = acc * alpha[:, None] + v_max * tl.dot(pv, vt.to(tl.float16))
    return m_new, l_i, acc


@triton.jit
def paged_decode_attn_kernel(
        Q, K, V, KS, VS, TOPK_INDICES, CAND, PAGE_TABLE, SEQ_LENS, OUT, LSE, PO, PL, DONE,
        scale_log2, n_lists,
        stride_qt, stride_qh, stride_kp, stride_kh, stride_kt, stride_th, stride_tq,
        stride_cc, stride_ch, stride_tb, stride_ot, stride_oh, stride_lt, stride_sp,
        stride_sh, NQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
        G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TOPK: tl.constexpr,
        TOPK_PAD: tl.constexpr, PER_SPLIT: tl.constexpr, PER_PAD: tl.constexpr,
        NSPLIT: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, MERGE: tl.constexpr = False, LS: tl.constexpr = 1,
        KR: tl.constexpr = 1, NL_PAD: tl.constexpr = 1, FP8: tl.constexpr = False,
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
    jmask = (offs_j < PER_SPLIT) & (jv < TOPK)
    if MERGE:       # the top-k row from the scan's lists (msa.ops.decode.select)
        row = merge_lists(CAND + c * stride_cc + hs * stride_ch, n_lists, pos // BS, LS,
                          KR, NL_PAD, TOPK, TOPK_PAD, False)
        offs_k = tl.arange(0, TOPK_PAD)
        tl.store(TOPK_INDICES + hs * stride_th + c * stride_tq + offs_k, row,
                 mask=(offs_k < TOPK) & (sp == 0) & (h == hs))       # one writer per row
        sel = tl.max(tl.where(offs_k[None, :] == jv[:, None], row[None, :], -1), 1)
        sel = tl.where(jmask, sel, -1)
    else:
        sel = tl.load(TOPK_INDICES + hs * stride_th + c * stride_tq + jv, mask=jmask,
                      other=-1)
    sel = tl.where(sel * BS <= pos, sel, -1)                    # -1: nothing to read
    pages = tl.load(PAGE_TABLE + b * stride_tb + sel, mask=sel >= 0, other=0)
    qt = tl.load(Q + c * stride_qt + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                 mask=gmask[:, None], other=0.0)
    # FP8 pages with 16-bit queries: e4m3 tiles meet fp16 queries (see fp8_softmax_step)
    F16: tl.constexpr = FP8 and Q.dtype.element_ty != tl.float32
    if F16:
        q16, q_scale = fp16_rows(qt)
        q_scale = q_scale * scale_log2
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
        soff = page * stride_sp + h * stride_sh + offs_n         # FP8 scales: token stride 1
        if F16:
            m_i, l_i, acc = fp8_softmax_step(
                q16, kt, vt, tl.load(KS + soff, mask=kmask, other=0.0),
                tl.load(VS + soff, mask=kmask, other=0.0), kmask, q_scale, m_i, l_i, acc)
        else:
            if FP8:     # e4m3 rows times their scales, in qt's dtype (fp32 queries)
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
        pid = c * HKV + h
        base = (pid * NSPLIT + sp) * G_PAD + offs_g
        tl.store(PO + base[:, None] * D + offs_d[None, :], out)
        tl.store(PL + base, lse)
        # the last split of (query, KV head) to finish merges them all
        tl.debug_barrier()                      # every thread's partial stored ...
        done = tl.atomic_add(DONE + pid, 1, sem="acq_rel")         # ... then released
        if done == NSPLIT - 1:
            tl.store(DONE + pid, 0)                     # ready for the next step
            combine_splits(PO, PL, OUT, LSE, pid, c, h, stride_ot, stride_oh, stride_lt,
                           G, G_PAD, D, NSPLIT)


def attend_kernel(q, k, v, num_kv_heads: int, block_size: int, kv_strides, nsplit: int,
                  merge: bool) -> str:
    """The kernel of ``paged_attend``: ``"gluon"`` (``msa.ops.decode.gluon``: Hopper, e4m3
    pages, 16-bit queries, one program per (query row, KV head): no split, no merge) where
    it applies, else ``"triton"`` (``paged_decode_attn_kernel``). ``MSA_DECODE_KERNEL=triton``
    in the environment keeps the Triton kernel everywhere."""
    if nsplit > 1 or merge or k.dtype != torch.float8_e4m3fn:
        return "triton"
    return choose_kernel("MSA_DECODE_KERNEL", "msa.ops.decode.gluon", q, k, v, num_kv_heads,
                         block_size, kv_strides)


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
                    head_dim: int, topk: int, device) -> Tuple[torch.Tensor, ...]:
    """``(po, pl, done)``: the split partial outputs and LSEs (fp32) ``paged_attend`` needs
    for any batch up to ``max_batch`` requests of ``num_q`` tokens, and the int32 count of
    finished splits per (query, KV head), zero (the last split resets it)."""
    g_pad = max(16, next_pow2(num_heads // num_kv_heads))
    n = partial_rows(max_batch, num_q, num_kv_heads, topk)
    f32 = dict(dtype=torch.float32, device=device)
    return (torch.empty(n * g_pad * head_dim, **f32), torch.empty(n * g_pad, **f32),
            torch.zeros(n, dtype=torch.int32, device=device))


def paged_decode(q, qi, k, v, ki, page_table, seq_lens, *, batch: int, num_q: int,
                 max_pages: int, num_kv_heads: int, candidates, topk_indices, out, lse,
                 partials, block_size: int, scale: float, index_scale: float,
                 kv_strides=None, ki_strides=None, ki_page_table=None,
                 mask_tail: bool = False, pages_per_program: int = None,
                 index_stages: int = None, k_scales=None, v_scales=None, ki_scales=None,
                 scale_strides=None, ki_exact=None, exact=None, counts=None) -> None:
    """One decode step of one layer into preallocated buffers (no host synchronisation,
    no allocation: capturable in a CUDA graph): ``msa.ops.decode.select.paged_scan``,
    then ``paged_attend``, which merges the scan's lists itself when its blocks are
    split over programs (else ``paged_merge`` runs first, one program per row; over a
    re-scored scan copy the re-scoring writes the top-k rows instead).

    q ``[B*Q, Hq, D]``, qi ``[B*Q, Hi, Di]`` (request-major); pages ``k, v [P, Hkv, page,
    D]`` (``Hkv = num_kv_heads``), ``ki [P, page, Di]`` read through
    ``page_table [>=B, max_pages]`` int32
    (``ki_page_table`` for the index keys, default the same) with seq_lens ``[>=B]``
    int32 (queries included). ``kv_strides`` / ``ki_strides``: the element strides
    (page, head, token) / (page, token) when ``k, v, ki`` are other tensors whose rows
    are addressed that way (default: the pages' own strides; the last dim is contiguous);
    ``mask_tail``: read no index-key row past a request's last token (when the last page
    may extend past the tensor; whole pages of a pool are read whole, which is faster).
    Writes candidates ``[B*Q, Hi, >= candidates_width(max_pages)]`` int64 (the scan's
    lists), topk_indices ``[Hi, B*Q, K]`` int32, out ``[B*Q, Hq, D]``, lse
    ``[B*Q, Hq]`` fp32; partials: ``partial_buffers`` for at least this batch. FP8 pages
    (e4m3 ``k, v, ki``) come with their row scales: ``k_scales, v_scales [P, Hkv, page]``,
    ``ki_scales [P, page]`` fp32, contiguous (``msa.ops.quant``); e4m3 index keys are
    scored against e4m3 index queries (quantized in the kernel by the same rule,
    docs/semantics.md). ``scale_strides``: the (page, head) strides of ``k_scales,
    v_scales`` when they are other tensors addressed that way (their token stride is 1;
    the index-key scale of token ``n`` of page ``p`` is ``ki_scales.view(-1)[p * page +
    n]``). ``ki_exact [P, page, Di]`` (16-bit or fp32, the index keys' page table and
    layout) beside a copy ``ki`` that the scan reads instead, e4m3 with ``ki_scales [P,
    page]`` or int4 (``msa.ops.quant.quantize_int4``: ``ki [P, page, Di / 2]`` uint8,
    ``ki_scales [P, page, Di / 32]`` fp16; scored against int8 index queries quantized in
    the kernel): its candidates per row (at least its best ``num_candidates(K,
    ki.dtype)`` blocks) are scored again with ``ki_exact`` into ``exact`` (int64, the
    layout of ``candidates``), whose keys then give the top-k rows; ``counts``: int32
    ``[>= B*Q, Hi, 2]``, zero before the first step (``msa.ops.decode.rescore``).
    """
    if ki_exact is not None and (exact is None or counts is None):
        raise ValueError("ki_exact (a scan copy re-scored) needs the exact and counts "
                         "buffers (msa.ops.decode.rescore.paged_rescore)")
    topk = topk_indices.shape[2]
    ki_table = page_table if ki_page_table is None else ki_page_table
    lists = paged_scan(qi, ki, ki_table, seq_lens, candidates, batch=batch, num_q=num_q,
                       max_pages=max_pages,
                       topk=topk if ki_exact is None else num_candidates(topk, ki.dtype) + 1,
                       block_size=block_size, index_scale=index_scale,
                       ki_strides=ki_strides, mask_tail=mask_tail,
                       pages_per_program=pages_per_program, index_stages=index_stages,
                       ki_scales=ki_scales)
    # split attention programs merge the lists themselves (no launch between), unless the
    # re-scoring wrote the top-k rows
    merge_in_attention = decode_splits(batch * num_q, num_kv_heads, topk)[0] > 1
    if ki_exact is not None:        # the top-k rows from the exact keys of the candidates
        paged_rescore(candidates, lists, qi, ki_exact, ki_table, seq_lens, exact, counts,
                      topk_indices, num_q=num_q, block_size=block_size,
                      index_scale=index_scale, scan_dtype=ki.dtype)
        merge_in_attention = False
    elif not merge_in_attention:    # many programs: one merge per row first
        paged_merge(candidates, seq_lens, topk_indices, lists, num_q=num_q,
                    block_size=block_size)
    paged_attend(q, k, v, topk_indices, page_table, seq_lens, batch=batch, num_q=num_q,
                 num_kv_heads=num_kv_heads, out=out, lse=lse, partials=partials,
                 block_size=block_size, scale=scale, kv_strides=kv_strides,
                 k_scales=k_scales, v_scales=v_scales, scale_strides=scale_strides,
                 merge=(candidates, *lists) if merge_in_attention else None)


def paged_attend(q, k, v, topk_indices, page_table, seq_lens, *, batch: int, num_q: int,
                 num_kv_heads: int, out, lse, partials, block_size: int, scale: float,
                 kv_strides=None, k_scales=None, v_scales=None, scale_strides=None,
                 merge=None) -> None:
    """The attention of a decode step over ``topk_indices [Hs, B*Q, K]`` (see
    ``paged_decode``), split over the selected blocks and merged by LSE by the last split
    of each (query, KV head) to finish (``partials = partial_buffers(...)``, whose counts
    it resets). ``merge = (candidates, ls, n_lists, kr)``
    (``msa.ops.decode.select.paged_scan``): each program first merges its row from the
    scan's lists (one of them writes it to ``topk_indices``)."""
    rows = batch * num_q
    hs, topk = topk_indices.shape[0], topk_indices.shape[2]
    hq, d = q.shape[1], q.shape[2]
    kv_strides = kv_strides or (k.stride(0), k.stride(1), k.stride(2))
    hkv = num_kv_heads
    scale_strides = scale_strides or (hkv * block_size, block_size)
    g = hq // hkv
    nsplit, per_split = decode_splits(rows, hkv, topk)
    g_pad = max(16, next_pow2(g))
    po, pl, done = partials
    cand, ls, n_lists, kr = merge or (topk_indices, 1, 1, 1)
    fp8 = k_scales is not None
    if fp8 and attend_kernel(q, k, v, num_kv_heads, block_size, kv_strides, nsplit,
                             merge is not None) == "gluon":
        from . import gluon
        gluon.launch(q, k, v, k_scales, v_scales, topk_indices, page_table, seq_lens, out, lse,
                     rows=rows, num_q=num_q, num_kv_heads=hkv, scale_log2=scale * LOG2E,
                     kv_strides=kv_strides, scale_strides=scale_strides)
        return
    paged_decode_attn_kernel[(rows, hkv, nsplit)](
        q, k, v, k_scales, v_scales, topk_indices, cand, page_table, seq_lens, out, lse, po,
        pl, done, scale * LOG2E, n_lists, q.stride(0), q.stride(1), *kv_strides,
        topk_indices.stride(0), topk_indices.stride(1), cand.stride(0), cand.stride(1),
        page_table.stride(0), out.stride(0), out.stride(1), lse.stride(0), *scale_strides,
        NQ=num_q, HKV=hkv, HS=hs, G=g, G_PAD=g_pad, D=d, BS=block_size, TOPK=topk,
        TOPK_PAD=next_pow2(topk), PER_SPLIT=per_split, PER_PAD=next_pow2(per_split),
        NSPLIT=nsplit, PRECISION=precision(q.dtype),
        UPCAST=upcast(q.dtype), MERGE=merge is not None, LS=ls, KR=kr,
        NL_PAD=next_pow2(n_lists), FP8=fp8, STAGES=3 if fp8 else 2,
        num_warps=4 if merge is None else 8)
