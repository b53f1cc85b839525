"""Reference sparse attention over selected blocks (docs/semantics.md, "Sparse
attention").

For query ``q`` (position ``p``, segment base ``k_base``), query head ``hq`` and its KV
head ``g = hq // (Hq/Hkv)``::

    allowed(t) = block(t) in topk[g or 0, q, :]  and  t <= p
    x[t]       = scale * q[q, hq] . k[k_base + t, g]
    lse        = log sum_{allowed t} exp(x[t])            (-inf when nothing is allowed)
    out        = sum_{allowed t} exp(x[t] - lse) v[k_base + t, g]      (0 for empty rows)

The backward recomputes each query chunk (no saved ``T x keys`` activations) and writes
exactly-zero gradients to keys no query selected. Gradients flow through both outputs:
with ``p = exp(x - lse)``, ``dx = p * (dout . v - delta + dlse)`` where
``delta = dout . out``.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ...varlen import Segments
from ..common import (apply_keys, chunk_size, compute_dtype, dense_keys, gather_keys,
                      group_logits, masked, query_chunks, safe_max, scatter_keys,
                      sparse_keys)


def _chunk(topk_indices: torch.Tensor, seg: Segments, hkv: int, d: int, block_size: int) -> int:
    return chunk_size(2 * hkv * topk_indices.shape[-1] * block_size * d)


# Forward: when a chunk's causal span is at most this many times the selected keys per
# query, attend densely over the span with the selection as a mask (big shared GEMMs)
# instead of gathering every query's keys. Both are exact; 0 disables the dense form.
DENSE_SPAN_FACTOR = 4


def _selected_span(topk_indices, k_base, pos, block_size):
    """Key set ``[0, max pos]`` shared by the chunk; allowed = selected block AND causal."""
    n = int(pos.max()) + 1
    rows, causal = dense_keys(k_base, pos, 0, n)                        # [1,1,n], [C,1,n]
    ids = topk_indices.permute(1, 0, 2).long()                                 # [C, Hs, K]
    nbl = -(-n // block_size)
    ids = torch.where((ids >= 0) & (ids < nbl), ids, torch.full_like(ids, nbl))
    sel = torch.zeros(*ids.shape[:2], nbl + 1, dtype=torch.bool, device=ids.device)
    sel.scatter_(2, ids, True)
    blk = torch.arange(n, device=ids.device) // block_size
    return rows, sel[..., blk] & causal


def _keys(k, v, topk_indices, seg, b, s0, s1, pos, block_size, dtype, dense_ok=False):
    p = pos[s0:s1]
    if dense_ok and int(p.max()) + 1 <= DENSE_SPAN_FACTOR * topk_indices.shape[-1] * block_size:
        rows, allowed = _selected_span(topk_indices[:, s0:s1], seg.k_base[b], p, block_size)
    else:
        rows, allowed = sparse_keys(topk_indices[:, s0:s1], seg.k_base[b], p, block_size)
    hkv = k.shape[1]
    return rows, allowed, gather_keys(k, rows, hkv, dtype), gather_keys(v, rows, hkv, dtype)


def attention_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                topk_indices: torch.Tensor, seg: Segments, *, block_size: int,
                                scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention forward.

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]``.
        topk_indices: ``[Hs, total_q, K]`` block ids (``Hs`` is ``Hkv`` or 1), ``-1`` = empty slot.
    Returns:
        out ``[total_q, Hq, D]`` (dtype of q) and lse ``[total_q, Hq]`` (fp32, fp64 for
        fp64 inputs; natural log, ``-inf`` for empty rows).
    """
    dtype = compute_dtype(q, k, v)
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.full_like(q, float("nan"))            # poisoned: every row must be written
    lse = torch.full((total_q, hq), float("nan"), dtype=dtype, device=q.device)
    pos = seg.positions(q.device)
    for b, s0, s1 in query_chunks(seg, _chunk(topk_indices, seg, hkv, d, block_size)):
        _, allowed, kg, vg = _keys(k, v, topk_indices, seg, b, s0, s1, pos, block_size, dtype,
                                   dense_ok=True)
        x = masked(group_logits(q[s0:s1], kg, scale), allowed)          # [C,Hkv,G,S]
        m = safe_max(x)
        p = torch.exp(x - m)
        den = p.sum(-1, keepdim=True)
        o = apply_keys(p, vg) / den.clamp_min(torch.finfo(dtype).tiny)  # [C,Hkv,G,D]
        c = s1 - s0
        out[s0:s1] = o.reshape(c, hq, d).to(q.dtype)
        lse[s0:s1] = (m + den.log()).reshape(c, hq)
    return out, lse


def attention_backward_reference(q, k, v, topk_indices, seg: Segments, out, lse, dout, dlse=None,
                                 *, block_size: int, scale: float):
    """Gradients of the sparse attention: ``(dq, dk, dv)`` with the shapes of q, k, v.

    ``out``/``lse`` are the forward results; ``dout [total_q, Hq, D]`` and ``dlse
    [total_q, Hq]`` (``None``: zero) their incoming gradients.
    """
    dtype = compute_dtype(q, k, v)
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    dq = torch.full_like(q, float("nan"))
    dk = torch.zeros(k.shape, dtype=dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=v.device)
    pos = seg.positions(q.device)
    delta_all = (dout.to(dtype) * out.to(dtype)).sum(-1)                   # [total_q,Hq]
    if dlse is not None:             # p = 0 on empty rows: their dlse changes nothing
        delta_all = delta_all - torch.where(torch.isneginf(lse), 0.0, dlse.to(dtype))
    for b, s0, s1 in query_chunks(seg, _chunk(topk_indices, seg, hkv, d, block_size)):
        rows, allowed, kg, vg = _keys(k, v, topk_indices, seg, b, s0, s1, pos, block_size, dtype)
        c = s1 - s0
        qc = q[s0:s1].to(dtype).view(c, hkv, hq // hkv, d)
        doc = dout[s0:s1].to(dtype).view(c, hkv, hq // hkv, d)
        lse_c = lse[s0:s1].to(dtype).view(c, hkv, hq // hkv, 1)
        lse_c = torch.where(torch.isneginf(lse_c), torch.full_like(lse_c, float("inf")), lse_c)
        x = masked(group_logits(q[s0:s1], kg, scale), allowed)
        p = torch.exp(x - lse_c)                                        # 0 off the mask
        dp = torch.matmul(doc, vg.transpose(-1, -2))
        ds = p * (dp - delta_all[s0:s1].view(c, hkv, hq // hkv, 1))
        dq[s0:s1] = (scale * torch.matmul(ds, kg)).reshape(c, hq, d).to(dq.dtype)
        scatter_keys(dk, rows, scale * torch.matmul(ds.transpose(-1, -2), qc))
        scatter_keys(dv, rows, torch.matmul(p.transpose(-1, -2), doc))
    return dq, dk.to(k.dtype), dv.to(v.dtype)
