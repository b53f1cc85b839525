"""Dense warm-up indexer KL on the GPU: the sparse Triton kernels over *all* causal blocks.

During warm-up the teacher is the main attention over every causal key. Queries are
processed in chunks; for a chunk, the "selection" is every block up to each query's
local block (``[Hi, chunk, blocks]`` int32, bounded by the chunk budget, never
``T x T/block``), and three KV-outer passes run on it:

1. teacher LSE per query head (``launch_partials`` without V, main-branch q/k),
2. student LSE per index head (``selected_lse``),
3. the indexer-KL backward kernel (``indexer_kl_bwd``): loss, ``dqi``, ``dki``.

Same contract as ``indexer_kl_reference(topk=None)``.
"""
from __future__ import annotations

import torch

from ...varlen import Segments
from ..attention.forward import launch_partials
from ..indexer.triton import selected_lse
from ..prepare import block_rows, plan_chunk
from .triton import indexer_kl_bwd

CHUNK_BUDGET_BYTES = 1 << 30       # partial-LSE buffer of one query chunk


def teacher_lse(q, k, topk, seg: Segments, *, block_size: int, scale: float) -> torch.Tensor:
    """``[total_q, Hq]`` fp32 LSE of ``scale * q.k`` over the causal keys of the selected
    blocks (``topk [Hs, total_q, K]``), by a KV-outer pass without V."""
    total_q, hq, _ = q.shape
    hkv, ksel = k.shape[1], topk.shape[-1]
    g = hq // hkv
    rows = block_rows(seg, block_size, q.device)
    topk = topk.to(torch.int32).contiguous()
    pl = torch.empty(total_q * hkv * ksel * g, dtype=torch.float32, device=q.device)
    plan = plan_chunk(topk, rows, 0, total_q, hkv, 256)
    launch_partials(q, k, None, rows, plan, 0, None, pl, scale=scale, ksel=ksel,
                    block_size=block_size)
    t = topk.long()
    t = t.expand(hkv, -1, -1) if t.shape[0] == 1 else t
    valid = (t >= 0) & (t < rows.q_nblocks.view(1, -1, 1))              # [Hkv, Tq, K]
    part = pl.view(total_q, hkv, ksel, g)
    part = torch.where(valid.permute(1, 0, 2).unsqueeze(-1), part,
                       torch.full_like(part, float("-inf")))
    return torch.logsumexp(part, dim=2).reshape(total_q, hq)


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
    for b in range(seg.num_segments):
        qs, ql, kb, kl = seg.q_start[b], seg.q_len[b], seg.k_base[b], seg.k_len[b]
        nb_max = -(-kl // block_size)
        chunk = max(1, min(ql, CHUNK_BUDGET_BYTES // (nb_max * max(hq, hi) * 4)))
        for c0 in range(0, ql, chunk):
            n = min(chunk, ql - c0)
            p0 = kl - ql + c0                              # position of the first query
            sub = Segments([0], [n], [kb], [p0 + n], n, k.shape[0])
            nb = -(-(p0 + n) // block_size)
            local = (torch.arange(p0, p0 + n, device=q.device) // block_size).view(-1, 1)
            ids = torch.arange(nb, device=q.device, dtype=torch.int32).view(1, -1)
            topk = torch.where(ids <= local, ids, -1).unsqueeze(0).expand(hi, n, nb)
            topk = topk.contiguous()
            s = slice(qs + c0, qs + c0 + n)
            tl_ = teacher_lse(q[s], k, topk, sub, block_size=block_size, scale=scale)
            il = selected_lse(qi[s], ki, topk, sub, block_size=block_size, scale=index_scale)
            part, dq, dk = indexer_kl_bwd(q[s], k, tl_, qi[s], ki, il, topk, sub,
                                          block_size=block_size, scale=scale,
                                          index_scale=index_scale,
                                          loss_coeff=loss_coeff * n / total_q)
            loss += part
            dqi[s] += dq.float()
            dki += dk.float()
    return loss, dqi.to(qi.dtype), dki.to(ki.dtype)
