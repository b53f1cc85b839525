"""Reference indexer KL objective (docs/semantics.md, "Indexer KL") and its dense warm-up
variant.

For query ``q``, index head ``h`` and the key set ``A(q, h)`` (selected blocks AND causal
in sparse mode; all causal keys in dense warm-up mode)::

    teacher(t) = mean over the Q heads hq of group h of softmax_A(scale * q[q,hq] . k[t])
    student(t) = softmax_A(index_scale * qi[q,h] . ki[t])
    loss       = loss_coeff / (Hi * total_q) * sum_{q,h} KL(teacher || student)

The teacher is detached: only ``qi``/``ki`` receive gradients,
``d loss / d z = loss_coeff / (Hi * total_q) * (student - teacher)`` on the student
logits ``z``. Both LSEs are computed here over exactly ``A`` (two passes over each query
chunk), so the loss is self-consistent whatever produced the top-k.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from ...varlen import Segments
from .autograd import LossWithGrads
from ..common import (CHUNK_BUDGET, apply_keys, chunk_size, compute_dtype, dense_keys, gather_keys,
                      group_logits, logsumexp, masked, query_chunks, scatter_keys,
                      sparse_keys)


def _key_sets(topk_indices, seg, b, s0, s1, pos, block_size, tile) -> Iterator:
    p = pos[s0:s1]
    if topk_indices is not None:
        yield sparse_keys(topk_indices[:, s0:s1], seg.k_base[b], p, block_size)
        return
    end = int(p.max()) + 1
    for t0 in range(0, end, tile):
        yield dense_keys(seg.k_base[b], p, t0, min(end, t0 + tile))


def _neg_inf_to_pos(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(x), torch.full_like(x, float("inf")), x)


def indexer_kl_reference(q, k, qi, ki, seg: Segments, topk_indices: Optional[torch.Tensor], *,
                         block_size: int, scale: float, index_scale: float,
                         loss_coeff: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """KL loss value and its gradients.

    Args:
        q: ``[total_q, Hq, D]``, k: ``[total_k, Hkv, D]`` main branch (teacher).
        qi: ``[total_q, Hi, Di]``, ki: ``[total_k, 1 or Hi, Di]`` index branch (student).
        topk_indices: ``[Hi, total_q, K]`` selection (sparse mode) or ``None`` (dense warm-up).
    Returns:
        ``(loss, dqi, dki)``: scalar loss (fp32, fp64 for fp64 inputs) and the gradients
        with the shapes and dtypes of qi, ki.
    """
    dtype = compute_dtype(q, k, qi, ki)
    total_q, hq, d = q.shape
    hkv, hi, di = k.shape[1], qi.shape[1], qi.shape[2]
    g = loss_coeff / (hi * max(total_q, 1))
    pos = seg.positions(q.device)
    if topk_indices is not None:
        per_key = topk_indices.shape[-1] * block_size
        chunk = chunk_size(per_key * (2 * hkv * d + 2 * hi * di + 2 * hq))
        tile = per_key
    else:
        chunk = min(256, max(1, seg.max_seqlen_q))
        tile = max(block_size, CHUNK_BUDGET // (chunk * (hq + 2 * hi + hkv * d // 64 + 1)))
    loss = torch.zeros((), dtype=dtype, device=q.device)
    dqi = torch.zeros(qi.shape, dtype=dtype, device=qi.device)
    dki = torch.zeros(ki.shape, dtype=dtype, device=ki.device)
    for b, s0, s1 in query_chunks(seg, chunk):
        c = s1 - s0
        qc, qic = q[s0:s1], qi[s0:s1]

        def logits(rows, allowed):
            x = masked(group_logits(qc, gather_keys(k, rows, hkv, dtype), scale), allowed)
            kig = gather_keys(ki, rows, hi, dtype)
            z = masked(group_logits(qic, kig, index_scale), allowed)      # [C,Hi,1,S]
            return x, z, kig

        lse_t = torch.full((c, hkv, hq // hkv, 1), float("-inf"), dtype=dtype, device=q.device)
        lse_s = torch.full((c, hi, 1, 1), float("-inf"), dtype=dtype, device=q.device)
        for rows, allowed in _key_sets(topk_indices, seg, b, s0, s1, pos, block_size, tile):
            x, z, _ = logits(rows, allowed)
            lse_t = torch.logaddexp(lse_t, logsumexp(x))
            lse_s = torch.logaddexp(lse_s, logsumexp(z))
        lse_t, lse_s = _neg_inf_to_pos(lse_t), _neg_inf_to_pos(lse_s)
        for rows, allowed in _key_sets(topk_indices, seg, b, s0, s1, pos, block_size, tile):
            x, z, kig = logits(rows, allowed)
            s = x.shape[-1]
            log_pt = torch.logsumexp((x - lse_t).reshape(c, hi, hq // hi, s), dim=2)
            log_pt = log_pt - torch.log(torch.tensor(hq // hi, dtype=dtype))
            log_ps = (z - lse_s).squeeze(2)                                # [C,Hi,S]
            pt, ps = torch.exp(log_pt), torch.exp(log_ps)
            loss += torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum()
            dz = g * index_scale * (ps - pt)                               # [C,Hi,S]
            dqi[s0:s1] += apply_keys(dz.unsqueeze(2), kig).squeeze(2)
            if rows.shape[0] == 1:                                         # shared keys
                grad = torch.einsum("chs,chd->hsd", dz, qic.to(dtype)).unsqueeze(0)
            else:
                grad = dz.unsqueeze(-1) * qic.to(dtype).unsqueeze(2)
            scatter_keys(dki, rows, grad)
    return g * loss, dqi.to(qi.dtype), dki.to(ki.dtype)


def indexer_kl_loss(q, k, qi, ki, seg: Segments, topk_indices, *, block_size: int, scale: float,
                    index_scale: float, loss_coeff: float = 1.0) -> torch.Tensor:
    """Differentiable (w.r.t. ``qi``, ``ki`` only) KL loss of the reference; fp32 scalar
    (fp64 for fp64 inputs)."""
    loss, dqi, dki = indexer_kl_reference(
        q.detach(), k.detach(), qi.detach(), ki.detach(), seg, topk_indices, block_size=block_size,
        scale=scale, index_scale=index_scale, loss_coeff=loss_coeff)
    loss = loss if loss.dtype == torch.float64 else loss.float()
    return LossWithGrads.apply(loss, qi, ki, dqi, dki)
