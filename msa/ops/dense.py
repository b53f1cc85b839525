"""Dense causal attention (bottom-right aligned) over packed segments.

Used by the dense warm-up mode and as the dense baseline; it calls
``torch.nn.functional.scaled_dot_product_attention`` per segment, so it is as fast and
memory-frugal as the backend SDPA picks (flash kernels on CPU and GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


from ..varlen import Segments


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, *,
                    scale: float) -> torch.Tensor:
    """Causal attention of every query over all keys ``t <= pos(q)`` of its segment.

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]`` (GQA when Hkv < Hq).
    Returns:
        ``[total_q, Hq, D]``, differentiable.
    """
    outs = []
    for b in range(seg.num_segments):
        s0, n, base, kl = seg.q_start[b], seg.q_len[b], seg.k_base[b], seg.k_len[b]
        if n == 0:
            continue
        qb = q[s0:s0 + n].transpose(0, 1).unsqueeze(0)                  # [1,Hq,n,D]
        kb = k[base:base + kl].transpose(0, 1).unsqueeze(0)
        vb = v[base:base + kl].transpose(0, 1).unsqueeze(0)
        if n == kl:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:
            from torch.nn.attention.bias import causal_lower_right  # imports dynamo: lazily
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=causal_lower_right(n, kl),
                                               scale=scale, enable_gqa=True)
        outs.append(o.squeeze(0).transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, 0)
