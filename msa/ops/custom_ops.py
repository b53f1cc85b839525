"""``torch.library`` custom ops wrapping the MSA operators for ``torch.compile``.

The ops are opaque to the compiler: metadata validation (which reads ``cu_seqlens`` on
the host) and the reference / Triton dispatch run inside them, so a compiled model traces
``msa_indexer`` and ``msa_sparse_attention`` without graph breaks. Fake (meta)
implementations give output shapes; the attention op has an autograd formula, including
the gradient reaching its LSE.

Segment metadata travels as ``cu_seqlens_q/k``, ``fragment_indices``, ``max_seqlen_q/k``
(packed layout) or as ``batch, seqlen_q, seqlen_k`` (batched layout, ``batch >= 0``).
The Triton paths find the selection's ``SparsePlan`` from the top-k tensor
(``msa.ops.plan.sparse_plan``): one plan per selection serves all of them.
"""
from __future__ import annotations

from enum import IntEnum
from typing import List, Optional, Tuple

import torch

from ..varlen import Segments, cached_segments
from . import plan as P
from . import workspace as W
from .attention.naive import attention_backward_reference, attention_forward_reference
from .checks import check_topk_indices
from .indexer.naive import indexer_reference

Tensor = torch.Tensor


class Backward(IntEnum):
    """Which backward the attention op runs (chosen with its forward)."""

    REFERENCE = 0            # PyTorch, chunked recomputation
    TRITON = 1               # KV-outer kernel, fp32 atomics for dK/dV
    TRITON_DETERMINISTIC = 2  # KV-outer kernel, fixed reduction order (bitwise repeatable)


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


def attention_plan(topk_indices: Tensor, seg: Segments, q: Tensor, k: Tensor,
                   block_size: int) -> "P.SparsePlan":
    """The selection's plan for the attention forward and backward (``heads=Hkv``)."""
    return P.sparse_plan(topk_indices, seg, block_size=block_size, heads=k.shape[1],
                         max_chunk=W.attention_chunk(q, topk_indices.shape[2], block_size),
                         q_per_item=W.item_queries(q.shape[1] // k.shape[1]))


@torch.library.custom_op("msa::indexer", mutates_args=())
def indexer_op(qi: Tensor, ki: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor],
               frag: Optional[Tensor], max_q: Optional[int], max_k: Optional[int], batch: int,
               seqlen_q: int, seqlen_k: int, block_size: int, topk: int, scale: float,
               temperature: float, return_lse: bool, use_triton: bool,
               index_precision: str = "input") -> Tuple[Tensor, Tensor]:
    """Packed ``qi [total_q, Hi, Di]``, ``ki [total_k, Hki, Di]`` -> top-k
    ``[Hi, total_q, topk]`` int32 and LSE ``[Hi, total_q]`` (``[0]`` unless requested;
    the Triton LSE pass plans the selection with its own chunk limit; ``msa_attention``
    runs that pass itself, on the plan of its whole step). ``index_precision="fp8"``:
    blocks ranked by e4m3 scores (the LSE keeps the inputs' precision). The top-k is
    marked trusted (not validated again downstream)."""
    seg = segments(qi.shape[0], ki.shape[0], cu_q, cu_k, frag, max_q, max_k, batch,
                   seqlen_q, seqlen_k, qi.device)
    if use_triton:
        from .indexer.triton import indexer_topk, selected_lse
        topk_indices = indexer_topk(qi, ki, seg, block_size=block_size, topk=topk, scale=scale,
                                    index_precision=index_precision)
        lse = None
        if return_lse:
            hi = qi.shape[1]
            plan = P.sparse_plan(topk_indices, seg, block_size=block_size, heads=hi,
                                 max_chunk=W.lse_chunk(hi, topk))
            lse = selected_lse(qi, ki, topk_indices, plan, scale=scale, temperature=temperature)
    else:
        topk_indices, lse = indexer_reference(qi, ki, seg, block_size=block_size, topk=topk,
                                              scale=scale, lse_temperature=temperature,
                                              index_precision=index_precision)
    if not return_lse:
        lse = qi.new_empty(0, dtype=_lse_dtype(qi))
    P.mark_trusted(topk_indices)
    return topk_indices, lse


@indexer_op.register_fake
def _(qi, ki, cu_q, cu_k, frag, max_q, max_k, batch, seqlen_q, seqlen_k, block_size, topk,
      scale, temperature, return_lse, use_triton, index_precision="input"):
    topk_indices = qi.new_empty((qi.shape[1], qi.shape[0], topk), dtype=torch.int32)
    shape = (qi.shape[1], qi.shape[0]) if return_lse else (0,)
    return topk_indices, qi.new_empty(shape, dtype=_lse_dtype(qi))


@torch.library.custom_op("msa::sparse_attention_fwd", mutates_args=())
def attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, topk_indices: Tensor, cu_q: Optional[Tensor],
                     cu_k: Optional[Tensor], frag: Optional[Tensor], max_q: Optional[int],
                     max_k: Optional[int], batch: int, seqlen_q: int, seqlen_k: int,
                     block_size: int, scale: float, use_triton: bool, backward: int,
                     trusted: bool) -> Tuple[Tensor, Tensor]:
    """Packed ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``, ``topk_indices [Hs, total_q, K]``
    -> out ``[total_q, Hq, D]``, lse ``[total_q, Hq]``. Validates the top-k ids unless
    ``trusted`` or produced by the library (``msa.ops.plan.mark_trusted``).
    ``backward`` (a ``Backward``) only selects the backward."""
    seg = segments(q.shape[0], k.shape[0], cu_q, cu_k, frag, max_q, max_k, batch, seqlen_q,
                   seqlen_k, q.device)
    if not (trusted or P.is_trusted(topk_indices)):
        check_topk_indices(topk_indices, seg, (1, k.shape[1]), block_size, q.device)
    if use_triton:
        from .attention.forward import sparse_attn_fwd
        plan = attention_plan(topk_indices, seg, q, k, block_size)    # few queries: rows only
        return sparse_attn_fwd(q, k, v, topk_indices, plan, scale=scale)
    return attention_forward_reference(q, k, v, topk_indices, seg, block_size=block_size,
                                       scale=scale)


@attention_fwd_op.register_fake
def _(q, k, v, topk_indices, cu_q, cu_k, frag, max_q, max_k, batch, seqlen_q, seqlen_k, block_size,
      scale, use_triton, backward, trusted):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=_lse_dtype(q))


@torch.library.custom_op("msa::sparse_attention_bwd", mutates_args=())
def attention_bwd_op(q: Tensor, k: Tensor, v: Tensor, topk_indices: Tensor, out: Tensor,
                     lse: Tensor,
                     dout: Tensor, dlse: Optional[Tensor], cu_q: Optional[Tensor],
                     cu_k: Optional[Tensor], frag: Optional[Tensor], max_q: Optional[int],
                     max_k: Optional[int], batch: int, seqlen_q: int, seqlen_k: int,
                     block_size: int, scale: float, backward: int) -> List[Tensor]:
    """Gradients ``[dq, dk, dv]`` of ``attention_fwd_op`` given ``dout`` and the LSE's
    gradient ``dlse`` (``None``: zero): the KV-outer backward (fast or deterministic; its
    Gluon kernel on Hopper, ``backward_kernel``) or the reference with chunked
    recomputation."""
    seg = segments(q.shape[0], k.shape[0], cu_q, cu_k, frag, max_q, max_k, batch, seqlen_q,
                   seqlen_k, q.device)
    if backward != Backward.REFERENCE:
        from .attention.backward import sparse_attn_bwd
        plan = attention_plan(topk_indices, seg, q, k, block_size)
        return list(sparse_attn_bwd(q, k, v, topk_indices, plan, out, lse, dout, dlse, scale=scale,
                                    deterministic=backward == Backward.TRITON_DETERMINISTIC))
    return list(attention_backward_reference(q, k, v, topk_indices, seg, out, lse, dout, dlse,
                                             block_size=block_size, scale=scale))


@attention_bwd_op.register_fake
def _(q, k, v, topk_indices, out, lse, dout, dlse, cu_q, cu_k, frag, max_q, max_k, batch, seqlen_q,
      seqlen_k, block_size, scale, backward):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _setup_context(ctx, inputs, output):
    (q, k, v, topk_indices, cu_q, cu_k, frag, max_q, max_k, batch, seqlen_q, seqlen_k, block_size,
     scale, _, backward, _) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, topk_indices, out, lse)
    ctx.meta = (cu_q, cu_k, frag, max_q, max_k, batch, seqlen_q, seqlen_k, block_size, scale,
                backward)


def _backward(ctx, dout, dlse):
    q, k, v, topk_indices, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(q, k, v, topk_indices, out, lse, dout.contiguous(),
                                  None if dlse is None else dlse.contiguous(), *ctx.meta)
    return (dq, dk, dv) + (None,) * 14


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)
