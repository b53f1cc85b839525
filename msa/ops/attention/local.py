"""Local block attention fused with the combine of the KV-outer forward.

Every well-formed selection holds the query's own block ``local(q) = pos(q) // BS`` (spec
3: forced, the last valid entry). The queries whose local block is ``L`` are consecutive
tokens, so that block needs no planning and no gather: a program of
``sparse_attn_local_kernel`` owns (segment, block ``L``, KV head, tile of ``BLOCK_Q``
consecutive queries of ``L``), loads K and V of ``L`` and, for its queries x the ``G``
heads of the group

1. attends to the visible keys of ``L`` (causal mask) when the query's row holds ``L``;
2. merges that with the partial outputs the KV-outer kernel wrote for the query's other
   valid entries (the plan leaves ``L`` out: ``plan_chunks(..., exclude=local)``), by LSE;
3. writes the final output and LSE.

Against attending to ``L`` in the KV-outer kernel and merging in a separate combine, one
of the ``K`` partials per query is never written nor read back (1/16 of the partial
traffic at the MSA shape) and the combine launch is folded in.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ...varlen import Segments
from .forward import _dot


@triton.jit(do_not_specialize=["i0", "q0", "q1", "stride_th"])
def sparse_attn_local_kernel(
        Q, K, V, PO, PL, TOPK, POS, NBLK, OUT, LSE,
        ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_QA, ITEM_QB, i0, q0, q1, scale_log2,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_th, stride_tq, stride_ot, stride_oh, stride_lt,
        HKV: tl.constexpr, HS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
        D: tl.constexpr, BS: tl.constexpr, KSEL: tl.constexpr, KSEL_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    it = i0 + tl.program_id(0)
    h = tl.program_id(1)
    # program (item, KV head, tile of BLOCK_Q queries): one tile per program keeps tens of
    # thousands of programs in flight (a loop over an item's tiles: 17.7 vs 12.4 ms)
    hs = h if HS > 1 else 0
    krow = tl.load(ITEM_KROW + it).to(tl.int64)
    t0 = tl.load(ITEM_T0 + it)
    nk = tl.load(ITEM_NK + it)
    qa = tl.maximum(tl.load(ITEM_QA + it), q0)           # this chunk's part of the item
    qb = tl.minimum(tl.load(ITEM_QB + it), q1)
    local = t0 // BS
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    offs_k = tl.arange(0, KSEL_PAD)
    kmask = offs_n < nk
    offs_m = tl.arange(0, BLOCK_Q * G_PAD)
    g = offs_m % G_PAD
    qs = tl.load(ITEM_QA + it) + tl.program_id(2) * BLOCK_Q     # this program's tile
    if (qs + BLOCK_Q > qa) & (qs < qb):
        k = tl.load(K + (krow + offs_n)[:, None] * stride_kt + h * stride_kh
                    + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(V + (krow + offs_n)[:, None] * stride_vt + h * stride_vh
                    + offs_d[None, :], mask=kmask[:, None], other=0.0)
        qg = (qs + offs_m // G_PAD).to(tl.int64)
        rmask = (qg >= qa) & (qg < qb) & (g < G)
        ql = qg - q0
        head = h * G + g
        pos = tl.load(POS + qg, mask=rmask, other=-1)
        nb = tl.load(NBLK + qg, mask=rmask, other=0)
        ids = tl.load(TOPK + hs * stride_th + qg[:, None] * stride_tq + offs_k[None, :],
                      mask=rmask[:, None] & (offs_k < KSEL)[None, :], other=-1)
        has_local = tl.max((ids == local).to(tl.int32), 1) > 0
        other = (ids >= 0) & (ids < nb[:, None]) & (ids != local)      # partial slots
        # 1. the local block, causal (rows without it attend to nothing here)
        qt = tl.load(Q + qg[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                     mask=rmask[:, None], other=0.0)
        s = _dot(qt, tl.trans(k), PRECISION, UPCAST) * scale_log2
        allowed = ((t0 + offs_n)[None, :] <= pos[:, None]) & kmask[None, :] & has_local[:, None]
        s = tl.where(allowed, s, float("-inf"))
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m[:, None])
        den = tl.sum(p, 1)
        lse_loc = tl.where(den > 0, (m + tl.log2(den)) * 0.6931471805599453, float("-inf"))
        o_loc = _dot(p.to(v.dtype), v, PRECISION, UPCAST) / tl.maximum(den, 1e-30)[:, None]
        # 2. merge with the partials by LSE (natural log)
        base = (ql * HKV + h) * KSEL
        lse_p = tl.load(PL + (base[:, None] + offs_k[None, :]) * G + g[:, None],
                        mask=other & rmask[:, None], other=float("-inf"))
        mx = tl.maximum(tl.max(lse_p, 1), lse_loc)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w_loc = tl.exp(lse_loc - mx)
        wsum = w_loc + tl.sum(tl.exp(lse_p - mx[:, None]), 1)
        acc = w_loc[:, None] * o_loc
        for j in range(KSEL):
            bid = tl.load(TOPK + hs * stride_th + qg * stride_tq + j, mask=rmask, other=-1)
            ok = rmask & (bid >= 0) & (bid < nb) & (bid != local)
            lj = tl.load(PL + (base + j) * G + g, mask=ok, other=float("-inf"))
            oj = tl.load(PO + ((base + j) * G + g)[:, None] * D + offs_d[None, :],
                         mask=ok[:, None], other=0.0)
            acc += tl.exp(lj - mx)[:, None] * oj.to(tl.float32)
        out = acc / tl.maximum(wsum, 1e-30)[:, None]
        tl.store(OUT + qg[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=rmask[:, None])
        tl.store(LSE + qg * stride_lt + head,
                 tl.where(wsum > 0, mx + tl.log(wsum), float("-inf")), mask=rmask)


def local_items(seg: Segments, block_size: int) -> Tuple[List[torch.Tensor], List[int]]:
    """One item per (segment, block holding at least one of its queries), in query order.

    Returns ``[krow, t0, nk, qa, qb]`` (CPU int tensors: packed row of the block's first
    key, its offset in the segment, keys present, packed query range ``[qa, qb)``) and the
    items' first queries as a list (to find a query chunk's items)."""
    cols = [[] for _ in range(5)]
    for b in range(seg.num_segments):
        n, kl = seg.q_len[b], seg.k_len[b]
        if n == 0:
            continue
        p0 = kl - n                                  # position of the segment's first query
        levels = torch.arange(p0 // block_size, (kl - 1) // block_size + 1)
        t0 = levels * block_size
        pa = torch.clamp(t0, min=p0)
        pb = torch.clamp(t0 + block_size, max=kl)
        for c, x in zip(cols, (seg.k_base[b] + t0, t0, torch.clamp(kl - t0, max=block_size),
                               seg.q_start[b] + pa - p0, seg.q_start[b] + pb - p0)):
            c.append(x)
    items = [torch.cat(c) if c else torch.zeros(0, dtype=torch.int64) for c in cols]
    return items, items[3].tolist()


def launch_local(q, k, v, topk, rows, items, item_q0: List[int], q0: int, q1: int, po, pl,
                 out, lse, *, scale: float, block_size: int) -> None:
    """Local block + combine for the queries ``[q0, q1)`` (one query chunk of
    ``sparse_attn_fwd``; ``po``/``pl`` hold that chunk's partials). ``items`` on q's
    device and ``item_q0`` from ``local_items``."""
    import bisect
    from .forward import LOG2E, INTERPRETER, _next_pow2
    i0 = max(0, bisect.bisect_right(item_q0, q0) - 1)
    i1 = bisect.bisect_left(item_q0, q1)
    if i1 <= i0:
        return
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    g_pad = _next_pow2(g)
    ksel = topk.shape[2]
    block_q = max(1, 64 // g_pad)
    sparse_attn_local_kernel[(i1 - i0, hkv, triton.cdiv(block_size, block_q))](
        q, k, v, po, pl, topk, rows.q_pos, rows.q_nblocks, out, lse, *items, i0, q0, q1,
        scale * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), topk.stride(0), topk.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), HKV=hkv, HS=topk.shape[0], G=g, G_PAD=g_pad, D=d, BS=block_size,
        KSEL=ksel, KSEL_PAD=_next_pow2(ksel), BLOCK_Q=block_q,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRETER and q.dtype == torch.bfloat16, num_warps=4)
