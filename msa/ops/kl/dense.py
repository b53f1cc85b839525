"""Dense warm-up indexer KL on the GPU (teacher over *all* causal keys), linear memory.

1. ``causal_lse_kernel`` (query-major, online log-sum-exp, no partial buffers): the
   teacher LSE per query head (main-branch q/k) and the student LSE per index head.
2. The indexer-KL backward kernel (``indexer_kl_bwd_kernel``, KV-outer) in its dense
   form: one work item per (index head, KV block, run of ``q_per_item`` consecutive
   queries that see the block), made arithmetically from the segment geometry (no
   selection tensor, no edge lists, no sorting; ``O(T^2 / (block * q_per_item))`` items):
   loss, ``dqi``, ``dki``.

Same contract as ``indexer_kl_reference(topk=None)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...varlen import Segments
from ..launch import launch_fitting
from ..geometry import query_tiles
from ..plan import Plan
from ..triton_utils import LN2, LOG2E, next_pow2, online_softmax_step, precision, upcast
from .triton import kl_buffers, launch_kl


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
        m_i, l_i, _ = online_softmax_step(qt, kt, kt, t[None, :] <= pos[:, None], m_i, l_i,
                                          l_i, scale_log2, PRECISION, UPCAST, False)
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * LN2, float("-inf"))
    tl.store(LSE + (q0 + tok) * stride_lt + (h * G + g) * stride_lh, lse, mask=rmask)


def causal_lse(q, k, seg: Segments, *, scale: float, block_size: int,
               block_rows: int = 64) -> torch.Tensor:
    """``[total_q, H]`` fp32 LSE of ``scale * q.k`` over every causal key (q ``[total_q,
    H, D]``, k ``[total_k, Hk, D]``, ``Hk`` divides ``H``: head ``hk`` serves ``H/Hk``)."""
    total_q, hq, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    g_pad = next_pow2(g)
    block_t = max(1, block_rows // g_pad)
    out = torch.empty((total_q, hq), dtype=torch.float32, device=q.device)
    tiles = query_tiles(seg, block_t, q.device)
    if tiles[0].numel():
        launch_fitting(
            causal_lse_kernel, (tiles[0].numel(), hk),
            (q, k, *tiles, out, scale * LOG2E, q.stride(0), q.stride(1), k.stride(0),
             k.stride(1), out.stride(0), out.stride(1)),
            [dict(num_stages=2), dict(num_stages=1)], G=g, G_PAD=g_pad, D=d, BS=block_size,
            BLOCK_T=block_t, PRECISION=precision(q.dtype), UPCAST=upcast(q.dtype),
            num_warps=4)
    return out


def dense_items(seg: Segments, block_size: int, num_heads: int, q_per_item: int,
                device) -> Plan:
    """A plan without edges (``item_e0/e1`` are packed query rows): items (index head, KV
    block of a segment, ``<= q_per_item`` consecutive queries that see the block), longest
    first. Block ``j`` (keys ``j*bs ..``) is seen by the queries at positions ``>= j*bs``:
    rows ``q_start + max(0, j*bs - (k_len - q_len)) ..``."""
    i64 = dict(dtype=torch.int64)
    nb = torch.tensor([seg.num_blocks(b, block_size) for b in range(seg.num_segments)], **i64)
    q_start, q_len, k_base, k_len = (torch.tensor(x, **i64) for x in
                                     (seg.q_start, seg.q_len, seg.k_base, seg.k_len))
    row_seg = torch.repeat_interleave(torch.arange(seg.num_segments), nb)
    first_row = torch.cumsum(nb, 0) - nb
    t0 = (torch.arange(int(nb.sum())) - first_row[row_seg]) * block_size
    q_end = (q_start + q_len)[row_seg]
    q_first = torch.minimum(q_start[row_seg] + torch.clamp(t0 - (k_len - q_len)[row_seg],
                                                           min=0), q_end)
    count = (q_end - q_first + q_per_item - 1) // q_per_item
    row = torch.repeat_interleave(torch.arange(t0.numel()), count)
    chunk = torch.arange(row.numel()) - torch.repeat_interleave(torch.cumsum(count, 0) - count,
                                                                count)
    e0 = q_first[row] + chunk * q_per_item
    e1 = torch.minimum(e0 + q_per_item, q_end[row])
    order = torch.argsort(e1 - e0, descending=True, stable=True)
    row, e0, e1 = row[order], e0[order], e1[order]
    krow = (k_base[row_seg] + t0)[row]
    nk = torch.clamp(k_len[row_seg] - t0, max=block_size)[row]
    n = row.numel()
    cols = [torch.arange(num_heads).repeat_interleave(n)] + \
        [x.repeat(num_heads) for x in (krow, t0[row], nk, e0, e1)]
    none = torch.empty(0, dtype=torch.int32, device=device)
    return Plan(none, none, *(x.to(device=device, dtype=torch.int32) for x in cols),
                num_heads=num_heads)


def indexer_kl_dense(q, k, qi, ki, seg: Segments, *, block_size: int, scale: float,
                     index_scale: float, loss_coeff: float = 1.0, q_per_item: int = 1024,
                     block_t: int = None, num_warps: int = 8, num_stages: int = None):
    """``(loss, dqi, dki)`` of the dense warm-up KL (teacher over all causal keys).

    q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, qi ``[total_q, Hi, Di]``,
    ki ``[total_k, 1, Di]``. ``q_per_item``, ``block_t``, ``num_warps``, ``num_stages``:
    launch parameters of the gradient kernel.
    """
    total_q, hi = q.shape[0], qi.shape[1]
    q, k, qi, ki2, loss, dqi, dki = kl_buffers(q, k, qi, ki)
    if total_q:
        t_lse = causal_lse(q, k, seg, scale=scale, block_size=block_size)             # [T, Hq]
        s_lse = causal_lse(qi, ki2.unsqueeze(1), seg, scale=index_scale,
                           block_size=block_size).t()                                # [Hi, T]
        items = dense_items(seg, block_size, hi, q_per_item, q.device)
        if items.num_items:
            launch_kl(q, k, t_lse, qi, ki2, s_lse, dqi, dki, loss,
                      seg.positions(q.device).to(torch.int32), None, items,
                      block_size=block_size, scale=scale, index_scale=index_scale,
                      loss_coeff=loss_coeff, block_t=block_t, num_warps=num_warps,
                      num_stages=num_stages, dense=True)
    return loss, dqi.to(qi.dtype), dki.view(ki.shape).to(ki.dtype)
