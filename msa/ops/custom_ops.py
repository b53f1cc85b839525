"""``torch.library`` custom ops wrapping the MSA operators for ``torch.compile``.

The ops are opaque to the compiler: metadata validation (which reads ``cu_seqlens`` on
the host) and the reference / Triton dispatch run inside them, so a compiled model traces
``msa_indexer`` and ``msa_sparse_attention`` without graph breaks. Fake (meta)
implementations give output shapes; the attention op has an autograd formula.

Segment metadata travels as ``cu_seqlens_q/k``, ``fragment_indices``, ``max_seqlen_q/k``
(packed layout) or as ``batch, seqlen_q, seqlen_k`` (batched layout, ``batch >= 0``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _checks as C
from ..varlen import Segments, cached_segments
from .attention.naive import attention_backward_reference, attention_forward_reference
from .indexer.naive import indexer_reference

Tensor = torch.Tensor


def segments(total_q: int, total_k: int, cu_q: Optional[Tensor], cu_k: Optional[Tensor],
             frag: Optional[Tensor], max_q: Optional[int], max_k: Optional[int],
             batch: int, seqlen_q: int, seqlen_k: int, device) -> Segments:
    """Segment geometry of either layout (validated)."""
    if batch >= 0:
        return Segments([b * seqlen_q for b in range(batch)], [seqlen_q] * batch,
                        [b * seqlen_k for b in range(batch)], [seqlen_k] * batch,
                        batch * seqlen_q, batch * seqlen_k)
    return cached_segments(total_q, total_k, cu_q, cu_k, max_q, max_k, frag, device=device)


def _lse_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("msa::indexer", mutates_args=())
def indexer_op(qi: Tensor, ki: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor],
               frag: Optional[Tensor], max_q: Optional[int], max_k: Optional[int], batch: int,
               seqlen_q: int, seqlen_k: int, block_size: int, topk: int, scale: float,
               temperature: float, return_lse: bool, use_triton: bool
               ) -> Tuple[Tensor, Tensor]:
    """Packed ``qi [total_q, Hi, Di]``, ``ki [total_k, Hki, Di]`` -> top-k
    ``[Hi, total_q, topk]`` int32 and LSE ``[Hi, total_q]`` (``[0]`` unless requested)."""
    seg = segments(qi.shape[0], ki.shape[0], cu_q, cu_k, frag, max_q, max_k, batch,
                   seqlen_q, seqlen_k, qi.device)
    if use_triton:
        from .indexer.triton import indexer_topk, selected_lse
        idx = indexer_topk(qi, ki, seg, block_size=block_size, topk=topk, scale=scale)
        lse = selected_lse(qi, ki, idx, seg, block_size=block_size, scale=scale,
                           temperature=temperature) if return_lse else None
    else:
        idx, lse = indexer_reference(qi, ki, seg, block_size=block_size, topk=topk,
                                     scale=scale, lse_temperature=temperature)
    if not return_lse:
        lse = qi.new_empty(0, dtype=_lse_dtype(qi))
    return idx, lse


@indexer_op.register_fake
def _(qi, ki, cu_q, cu_k, frag, max_q, max_k, batch, seqlen_q, seqlen_k, block_size, topk,
      scale, temperature, return_lse, use_triton):
    idx = qi.new_empty((qi.shape[1], qi.shape[0], topk), dtype=torch.int32)
    shape = (qi.shape[1], qi.shape[0]) if return_lse else (0,)
    return idx, qi.new_empty(shape, dtype=_lse_dtype(qi))


@torch.library.custom_op("msa::sparse_attention_fwd", mutates_args=())
def attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, topk: Tensor, cu_q: Optional[Tensor],
                     cu_k: Optional[Tensor], frag: Optional[Tensor], max_q: Optional[int],
                     max_k: Optional[int], batch: int, seqlen_q: int, seqlen_k: int,
                     block_size: int, scale: float, use_triton: bool,
                     backward_mode: int) -> Tuple[Tensor, Tensor]:
    """Packed ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``, ``topk [Hs, total_q, K]``
    -> out ``[total_q, Hq, D]``, lse ``[total_q, Hq]``. Validates the top-k ids.
    ``backward_mode`` only selects the backward: 0 reference, 1 Triton (fp32 atomics),
    2 Triton deterministic."""
    seg = segments(q.shape[0], k.shape[0], cu_q, cu_k, frag, max_q, max_k, batch, seqlen_q,
                   seqlen_k, q.device)
    C.check_topk_indices(topk, seg, (1, k.shape[1]), block_size, q.device)
    if use_triton:
        from .attention.forward import sparse_attn_fwd
        return sparse_attn_fwd(q, k, v, topk, seg, block_size=block_size, scale=scale)
    return attention_forward_reference(q, k, v, topk, seg, block_size=block_size, scale=scale)


@attention_fwd_op.register_fake
def _(q, k, v, topk, cu_q, cu_k, frag, max_q, max_k, batch, seqlen_q, seqlen_k, block_size,
      scale, use_triton, backward_mode):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=_lse_dtype(q))


@torch.library.custom_op("msa::sparse_attention_bwd", mutates_args=())
def attention_bwd_op(q: Tensor, k: Tensor, v: Tensor, topk: Tensor, out: Tensor, lse: Tensor,
                     dout: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor],
                     frag: Optional[Tensor], batch: int, seqlen_q: int, seqlen_k: int,
                     block_size: int, scale: float, backward_mode: int) -> List[Tensor]:
    """Gradients ``[dq, dk, dv]`` of ``attention_fwd_op`` (Triton KV-outer kernel, fast or
    deterministic, or the reference with chunked recomputation)."""
    seg = segments(q.shape[0], k.shape[0], cu_q, cu_k, frag, None, None, batch, seqlen_q,
                   seqlen_k, q.device)
    if backward_mode:
        from .attention.backward import sparse_attn_bwd
        return list(sparse_attn_bwd(q, k, v, topk, seg, out, lse, dout,
                                    block_size=block_size, scale=scale,
                                    deterministic=backward_mode == 2))
    return list(attention_backward_reference(q, k, v, topk, seg, out, lse, dout,
                                             block_size=block_size, scale=scale))


@attention_bwd_op.register_fake
def _(q, k, v, topk, out, lse, dout, cu_q, cu_k, frag, batch, seqlen_q, seqlen_k, block_size,
      scale, backward_mode):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _setup_context(ctx, inputs, output):
    (q, k, v, topk, cu_q, cu_k, frag, _, _, batch, seqlen_q, seqlen_k, block_size, scale,
     _, backward_mode) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, topk, out, lse)
    ctx.meta = (cu_q, cu_k, frag, batch, seqlen_q, seqlen_k, block_size, scale,
                backward_mode)


def _backward(ctx, dout, _dlse):
    q, k, v, topk, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(q, k, v, topk, out, lse, dout.contiguous(), *ctx.meta)
    return (dq, dk, dv) + (None,) * 13


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)
