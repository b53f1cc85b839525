"""Dense warm-up indexer KL on the GPU (teacher over *all* causal keys), linear memory.

1. ``causal_lse_kernel`` (query-major, online log-sum-exp, no partial buffers): the
   teacher LSE per query head (main-branch q/k) and the student LSE per index head.
2. The indexer-KL backward kernel (``indexer_kl_bwd``, KV-outer) over every causal block,
   query chunk by query chunk: the chunk's "selection" is every block up to each query's
   local block (``[Hi, chunk, blocks]`` int32, bounded by ``CHUNK_BUDGET_BYTES``, never
   ``T x T/block``): loss, ``dqi``, ``dki``.

Same contract as ``indexer_kl_reference(topk=None)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...varlen import Segments
from ..attention.forward import INTERPRETER, LOG2E, _dot, _next_pow2
from ..indexer.triton import _tiles
from .triton import indexer_kl_bwd

CHUNK_BUDGET_BYTES = 1 << 30       # dense "selection" of one query chunk


@triton.jit
def causal_lse_kernel(Q, K, TILE_Q0, TILE_N, TILE_KBASE, TILE_OFF, LSE, scale_log2,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                      BS: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr):
    """Query-major online log-sum-exp of ``scale * q.k`` over all causal keys: program
    (tile of ``BLOCK_T`` queries of one segment, KV head ``h``), rows = tokens x the ``G``
    heads served by ``h``; natural-log LSE into ``LSE[token, h*G + g]``."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    q0 = tl.load(TILE_Q0 + pid).to(tl.int64)
    n = tl.load(TILE_N + pid)
    kbase = tl.load(TILE_KBASE + pid).to(tl.int64)
    off = tl.load(TILE_OFF + pid)
    offs_m = tl.arange(0, BLOCK_T * G_PAD)
    tok = offs_m // G_PAD
    g = offs_m % G_PAD
    rmask = (tok < n) & (g < G)
    pos = off + tok
    offs_d = tl.arange(0, D)
    qt = tl.load(Q + (q0 + tok)[:, None] * stride_qt + (h * G + g)[:, None] * stride_qh
                 + offs_d[None, :], mask=rmask[:, None], other=0.0)
    m_i = tl.zeros((BLOCK_T * G_PAD,), dtype=tl.float32) - float("inf")
    l_i = tl.zeros((BLOCK_T * G_PAD,), dtype=tl.float32)
    offs_n = tl.arange(0, BS)
    last = (off + n - 1) // BS
    for blk in range(0, last + 1):
        t = blk * BS + offs_n
        kt = tl.load(K + (kbase + t)[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                     mask=(t <= off + n - 1)[:, None], other=0.0)
        s = _dot(qt, tl.trans(kt), PRECISION, UPCAST) * scale_log2
        s = tl.where(t[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + (q0 + tok) * stride_lt + (h * G + g) * stride_lh, lse, mask=rmask)


def causal_lse(q, k, seg: Segments, *, scale: float, block_size: int,
               block_rows: int = 64) -> torch.Tensor:
    """``[total_q, H]`` fp32 LSE of ``scale * q.k`` over every causal key (q ``[total_q,
    H, D]``, k ``[total_k, Hk, D]``, ``Hk`` divides ``H``: head ``hk`` serves ``H/Hk``)."""
    total_q, hq, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    g_pad = _next_pow2(g)
    block_t = max(1, block_rows // g_pad)
    out = torch.empty((total_q, hq), dtype=torch.float32, device=q.device)
    tiles = _tiles(seg, block_t, q.device)
    if tiles[0].numel():
        causal_lse_kernel[(tiles[0].numel(), hk)](
            q, k, *tiles, out, scale * LOG2E, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), out.stride(0), out.stride(1), G=g, G_PAD=g_pad, D=d, BS=block_size,
            BLOCK_T=block_t, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST=INTERPRETER and q.dtype == torch.bfloat16, num_warps=4, num_stages=2)
    return out


def _query_pieces(seg: Segments, block_size: int, hi: int, total_k: int):
    """Cut the packed queries into pieces whose dense "selection" fits
    ``CHUNK_BUDGET_BYTES``: runs of whole segments (one kernel call for a batch of short
    sequences), or query chunks of one long segment. Yields ``(first query, Segments)``
    with the piece's queries renumbered from 0."""
    per_query = hi * 16            # top-k ids (4 B per block) plus ~12 B per planned edge
    run = []

    def flush():
        if run:
            q0 = seg.q_start[run[0]]
            yield q0, Segments([seg.q_start[b] - q0 for b in run], [seg.q_len[b] for b in run],
                               [seg.k_base[b] for b in run], [seg.k_len[b] for b in run],
                               sum(seg.q_len[b] for b in run), total_k)
        run.clear()

    for b in range(seg.num_segments):
        ql, nb = seg.q_len[b], seg.num_blocks(b, block_size)
        if ql == 0:
            continue
        if ql * nb * per_query > CHUNK_BUDGET_BYTES:           # long: chunks of its own
            yield from flush()
            chunk = max(1, CHUNK_BUDGET_BYTES // (nb * per_query))
            for c0 in range(0, ql, chunk):
                n = min(chunk, ql - c0)
                p0 = seg.k_len[b] - ql + c0                     # position of the first query
                yield seg.q_start[b] + c0, Segments([0], [n], [seg.k_base[b]], [p0 + n], n,
                                                    total_k)
            continue
        width = max([nb] + [seg.num_blocks(r, block_size) for r in run])
        rows = sum(seg.q_len[r] for r in run) + ql
        if run and (rows * width * per_query > CHUNK_BUDGET_BYTES
                    or seg.q_start[b] != seg.q_start[run[-1]] + seg.q_len[run[-1]]):
            yield from flush()
        run.append(b)
    yield from flush()


def indexer_kl_dense(q, k, qi, ki, seg: Segments, *, block_size: int, scale: float,
                     index_scale: float, loss_coeff: float = 1.0):
    """``(loss, dqi, dki)`` of the dense warm-up KL (teacher over all causal keys).

    q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, qi ``[total_q, Hi, Di]``,
    ki ``[total_k, 1, Di]``.
    """
    total_q, hq, _ = q.shape
    hi = qi.shape[1]
    loss = torch.zeros((), dtype=torch.float32, device=q.device)
    dqi = torch.zeros(qi.shape, dtype=torch.float32, device=q.device)
    dki = torch.zeros(ki.shape, dtype=torch.float32, device=q.device)
    t_lse = causal_lse(q, k, seg, scale=scale, block_size=block_size)            # [T, Hq]
    s_lse = causal_lse(qi, ki, seg, scale=index_scale, block_size=block_size).t()  # [Hi, T]
    pos = seg.positions(q.device)
    for q0, sub in _query_pieces(seg, block_size, hi, k.shape[0]):
        n = sub.total_q
        nb = max(sub.num_blocks(b, block_size) for b in range(sub.num_segments))
        local = (pos[q0:q0 + n] // block_size).view(-1, 1)
        ids = torch.arange(nb, device=q.device, dtype=torch.int32).view(1, -1)
        topk = torch.where(ids <= local, ids, -1).unsqueeze(0).expand(hi, n, nb).contiguous()
        s = slice(q0, q0 + n)
        part, dq, dk = indexer_kl_bwd(q[s], k, t_lse[s], qi[s], ki, s_lse[:, s], topk, sub,
                                      block_size=block_size, scale=scale,
                                      index_scale=index_scale,
                                      loss_coeff=loss_coeff * n / total_q,
                                      fp32_grads=True)    # pieces summed in fp32
        loss += part
        dqi[s] += dq
        dki += dk
    return loss, dqi.to(qi.dtype), dki.to(ki.dtype)
