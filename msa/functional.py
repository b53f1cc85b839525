"""Public functional API of MSA: validation (once), dispatch to the ops.

Two layouts, chosen by the rank of ``q``:

* packed varlen: ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` with ``cu_seqlens_q``,
  ``cu_seqlens_k`` ``[B+1]`` (and optional ``max_seqlen_q/k``, ``fragment_indices``);
  top-k ``[H, total_q, K]``;
* batched: ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` (``Tk >= Tq``); top-k
  ``[B, H, Tq, K]``.

Queries are the causal suffix of their keys (bottom-right): query ``i`` of a segment sits
at key offset ``pos = k_len - q_len + i`` and sees offsets ``0..pos``. Block ids are
relative to the segment's first key; ``-1`` marks an empty top-k slot. The full contract
is docs/semantics.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import INDEX_RULES, MSAConfig, check_index_precision
from .layout import call_layout, check_ranks
from .ops import checks as C
from .ops import plan as P
from .ops import workspace as W
from .ops.custom_ops import Backward, attention_fwd_op, indexer_op
from .ops.dense import dense_attention
from .ops.kl import LossWithGrads, indexer_kl_loss


def _scale(value: Optional[float], dim: int) -> float:
    return float(value) if value is not None else dim ** -0.5


def msa_indexer(qi, ki, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                max_seqlen_k=None, *, fragment_indices=None, block_size: int = 128,
                topk: int = 16, softmax_scale: Optional[float] = None,
                lse_temperature: float = 1.0, return_lse: bool = False,
                backend: str = "auto", check_finite: bool = False,
                index_precision: str = "input"):
    """Select ``topk`` key blocks per (index head, query) (docs/semantics.md, "Selection").

    Args:
        qi: ``[total_q, Hi, Di]`` or ``[B, Tq, Hi, Di]`` index queries.
        ki: ``[total_k, 1 or Hi, Di]`` or ``[B, Tk, 1 or Hi, Di]`` index keys.
        block_size: 64 or 128; topk: 1..64 (the local block included).
        softmax_scale: indexer logit scale (default ``Di ** -0.5``; it orders nothing,
            only the LSE depends on it).
        lse_temperature: ``T > 0``; scales only the returned LSE (``s / T``).
        check_finite: reject NaN / inf in ``qi``, ``ki`` (one host synchronisation);
            otherwise a NaN score ranks below every number.
        index_precision: ``"input"`` or ``"fp8"``: rank blocks by the scores of ``qi``,
            ``ki`` quantized to e4m3 (one scale per row; docs/semantics.md, "FP8 index
            scoring"); the selected LSE keeps the inputs' precision. ``"int4"`` (the
            decode scan of an int4 copy of the keys, "INT4 scan copy"): reference backend
            only.
    Returns:
        topk_indices ``[Hi, total_q, topk]`` (``[B, Hi, Tq, topk]``) int32: the
        ``min(topk-1, local)`` best earlier blocks (score desc, id asc), then the local
        block ``pos // block_size``, then ``-1``. With ``return_lse`` also
        selected_lse ``[Hi, total_q]`` (``[B, Hi, Tq]``) fp32: LSE of ``s / T`` over the
        causally visible keys of the selected blocks (not differentiable).

    ``backend``: ``"reference"``, ``"triton"`` (streamed top-k kernel + KV-outer LSE pass;
    needs one shared index-key head) or ``"auto"`` (Triton for CUDA tensors with one
    index-key head).
    """
    lay = call_layout("qi", qi, "ki", ki, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, fragment_indices)
    C.check_index(qi, ki)
    C.check_block_and_topk(block_size, topk)
    C.check_scale("softmax_scale", softmax_scale)
    C.check_scale("lse_temperature", lse_temperature)
    C.check_flag("return_lse", return_lse)
    check_index_precision(index_precision, INDEX_RULES)
    if check_finite:
        C.check_finite(("qi", "ki"), (qi, ki))
    use_triton = C.use_triton(backend, qi) and (ki.shape[-2] == 1 or backend == "triton")
    if use_triton and index_precision == "int4":
        raise ValueError("index_precision='int4' (the decode scan's rule) runs on "
                         "backend='reference' only; the prefill kernels take 'input' or 'fp8'")
    if use_triton and index_precision == "fp8":
        C.check_fp8_device("index_precision='fp8'", qi)
    topk_indices, lse = indexer_op(lay.pack(qi), lay.pack(ki), *lay.meta, block_size, topk,
                                   _scale(softmax_scale, qi.shape[-1]),
                                   float(lse_temperature), return_lse, use_triton,
                                   index_precision)
    topk_indices = lay.unpack_heads(topk_indices)
    return (topk_indices, lay.unpack_heads(lse)) if return_lse else topk_indices


def msa_sparse_attention(q, k, v, topk_indices, cu_seqlens_q=None, cu_seqlens_k=None,
                         max_seqlen_q=None, max_seqlen_k=None, *, fragment_indices=None,
                         block_size: int = 128, softmax_scale: Optional[float] = None,
                         return_lse: bool = False, backend: str = "auto",
                         deterministic: bool = False, check_finite: bool = False):
    """Exact softmax attention over the selected blocks AND causal keys
    (docs/semantics.md, "Sparse attention").

    Args:
        q: ``[total_q, Hq, D]`` / ``[B, Tq, Hq, D]``; k, v: ``[total_k, Hkv, D]`` /
            ``[B, Tk, Hkv, D]``; ``Hkv`` divides ``Hq``; D in {64, 128, 256}.
        topk_indices: ``[Hs, total_q, K]`` / ``[B, Hs, Tq, K]`` int32/int64 with ``Hs`` =
            ``Hkv`` (one selection per KV head) or 1 (shared); ``-1`` empty; ids unique
            and ``< ceil(k_len / block_size)``; order does not matter.
        check_finite: reject NaN / inf in ``q``, ``k``, ``v`` (one host synchronisation).
    Returns:
        out shaped like q and, with ``return_lse``, lse ``[total_q, Hq]`` / ``[B, Tq, Hq]``
        fp32 natural log; both differentiable w.r.t. q, k, v (unselected keys get exactly
        zero gradient). Rows with no allowed key: out 0, lse ``-inf``.

    ``backend``: ``"reference"`` (pure PyTorch), ``"triton"`` (Triton forward and
    backward; CUDA tensors) or ``"auto"`` (Triton on CUDA tensors when Triton is
    installed, else the reference). ``deterministic``: the Triton backward sums gradients
    in a fixed order (bitwise repeatable, slower); the default adds them with fp32 atomics.
    """
    lay = call_layout("q", q, "k", k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      fragment_indices)
    C.check_qkv(q, k, v)
    use_triton = C.use_triton(backend, q)
    C.check_block_and_topk(block_size)
    C.check_scale("softmax_scale", softmax_scale)
    C.check_flag("return_lse", return_lse)
    C.check_flag("deterministic", deterministic)
    if check_finite:
        C.check_finite(("q", "k", "v"), (q, k, v))
    heads = (1, k.shape[-2])
    packed = lay.pack_heads(topk_indices, heads)
    C.check_topk_tensor(packed, lay.total_q, heads, q.device)
    out, lse = attention_fwd_op(lay.pack(q), lay.pack(k), lay.pack(v), packed, *lay.meta,
                                block_size, _scale(softmax_scale, q.shape[-1]), use_triton,
                                _backward_mode(use_triton, deterministic), False)
    out = lay.unpack(out)
    return (out, lay.unpack(lse)) if return_lse else out


def attention_kernel(q, k, v, *, block_size: int = 128, backend: str = "auto",
                     backward: bool = False, topk_indices: Optional[torch.Tensor] = None,
                     cu_seqlens_q=None, cu_seqlens_k=None) -> str:
    """The forward kernel ``msa_sparse_attention`` runs for these inputs (its layouts and
    ``backend``): ``"reference"`` (PyTorch), ``"query_major"`` (Triton, for at most
    ``QUERY_MAJOR_MAX_QUERIES`` = 1024 queries), ``"gluon"`` (the warp-specialized Hopper
    kernel, ``msa.ops.attention.gluon``), ``"triton"`` (the Triton KV-outer kernel) or
    ``"union"`` (``msa.ops.attention.union``: where ``MSA_FORWARD_KERNEL=union``, and on
    Hopper for a selection ``topk_indices`` (``msa_sparse_attention``'s layouts, with its
    ``cu_seqlens_q`` / ``cu_seqlens_k`` for packed inputs: one sequence without them)
    whose neighbouring queries share their blocks enough, ``union.suits``; without
    ``topk_indices`` the answer is the kernel of a selection that is not shared).
    ``backward=True``: the kernel of its backward, ``"reference"``, ``"gluon"``
    (``msa.ops.attention.gluon_bwd``) or ``"triton"``."""
    check_ranks("q", q, "k", k)
    C.check_qkv(q, k, v)
    C.check_block_and_topk(block_size)
    if topk_indices is not None and (
            not isinstance(topk_indices, torch.Tensor) or topk_indices.dim() != q.dim()
            or topk_indices.dtype not in (torch.int32, torch.int64)):
        raise ValueError("topk_indices must be an int32/int64 tensor [Hs, total_q, K] "
                         "(packed q) or [B, Hs, Tq, K] (batched q), got "
                         f"{getattr(topk_indices, 'shape', type(topk_indices))}")
    if not C.use_triton(backend, q):
        return "reference"
    if backward:
        from .ops.attention.backward import backward_kernel
        return backward_kernel(q, k, v, block_size)
    from .ops.attention.forward import forward_kernel, use_query_major
    total_q = q.shape[0] if q.dim() == 3 else q.shape[0] * q.shape[1]
    if use_query_major(total_q):
        return "query_major"
    kernel = forward_kernel(q, k, v, block_size)
    if kernel == "gluon" and topk_indices is not None:
        from .ops.attention import union
        if q.dim() == 3 and cu_seqlens_q is None and cu_seqlens_k is None:
            cu_seqlens_q, cu_seqlens_k = [0, q.shape[0]], [0, k.shape[0]]
        lay = call_layout("q", q, "k", k, cu_seqlens_q, cu_seqlens_k, None, None, None)
        if union.suits(lay.pack(q), lay.pack(k), lay.pack(v), lay.pack_heads(topk_indices),
                       lay.seg, block_size):
            return "union"
    return kernel


def indexer_kl_kernel(q, k, qi, ki, *, block_size: int = 128, backend: str = "auto",
                      deterministic: bool = False) -> str:
    """The kernel that computes the indexer KL of ``msa_attention`` in sparse mode for
    these inputs (their layouts, ``backend`` and ``deterministic``): ``"reference"``
    (PyTorch; also for index keys with more than one head), ``"attention_backward"`` (the
    Gluon attention backward writes the teacher rows and the Triton student half runs on
    them, ``msa.ops.kl.deferred``: Hopper, q or k trained, one KV head per index head,
    groups of 4 to 64 heads, not deterministic), ``"gluon"`` (the teacher in a Hopper
    kernel of ``msa.ops.kl.gluon``; the student half in Triton, or in the same kernel for
    groups of 3 to 16 heads outside deterministic mode) or ``"triton"``
    (``msa.ops.kl.triton``). ``MSA_KL_KERNEL=triton`` in the environment keeps the Triton
    kernel on Hopper, in the forward."""
    check_ranks("q", q, "k", k)
    C.check_qkv(q, k, k)                # q / k heads, head dims and dtypes (v plays k)
    C.check_float_tensor("qi", qi, q.dim(), q.device)
    C.check_float_tensor("ki", ki, q.dim(), q.device)
    C.check_index(qi, ki, q, k)
    C.check_block_and_topk(block_size)
    C.check_flag("deterministic", deterministic)
    triton = C.use_triton(backend, q) and C.use_triton(backend, qi)      # checks backend
    if ki.shape[-2] != 1 or not triton:
        return "reference"
    from .ops.kl.deferred import kl_in_backward
    from .ops.kl.triton import kl_kernel
    flat = [x if x.dim() == 3 else x.flatten(0, 1) for x in (q, k, qi)]
    if kl_in_backward(flat[0], flat[1], flat[1], flat[2], block_size, deterministic):
        return "attention_backward"
    return kl_kernel(*flat[:2], qi.shape[-2], block_size)


def _backward_mode(use_triton: bool, deterministic: bool) -> Backward:
    if not use_triton:
        return Backward.REFERENCE
    return Backward.TRITON_DETERMINISTIC if deterministic else Backward.TRITON


def msa_indexer_kl(q, k, qi, ki, topk_indices=None, cu_seqlens_q=None, cu_seqlens_k=None,
                   max_seqlen_q=None, max_seqlen_k=None, *, fragment_indices=None,
                   block_size: int = 128, softmax_scale: Optional[float] = None,
                   index_softmax_scale: Optional[float] = None, loss_coeff: float = 1.0,
                   check_finite: bool = False):
    """Indexer training loss (docs/semantics.md, "Indexer KL"); reference implementation
    (``msa_attention`` runs the Triton one).

    ``loss = loss_coeff / (Hi * total_q) * sum_{q,h} KL(teacher || student)`` where, over
    the keys of the selected blocks that are causally visible (or over all causal keys
    when ``topk_indices is None``: the dense warm-up), the teacher is the main attention
    distribution averaged over the Q heads served by index head ``h`` and the student is
    the indexer softmax. The teacher is detached: gradients reach ``qi`` and ``ki`` only.

    Args:
        q, k: main branch ``[total_q, Hq, D]``, ``[total_k, Hkv, D]`` (or batched).
        qi, ki: index branch ``[total_q, Hi, Di]``, ``[total_k, 1 or Hi, Di]``.
        topk_indices: ``[Hi, total_q, K]`` (``[B, Hi, Tq, K]``) or ``None``.
    Returns:
        scalar fp32 loss.
    """
    lay = call_layout("q", q, "k", k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      fragment_indices)
    C.check_float_tensor("qi", qi, q.dim(), q.device)
    C.check_float_tensor("ki", ki, q.dim(), q.device)
    C.check_heads("q", q.shape[-2], "k", k.shape[-2])
    C.check_index(qi, ki, q, k)
    C.check_block_and_topk(block_size)
    C.check_scale("softmax_scale", softmax_scale)
    C.check_scale("index_softmax_scale", index_softmax_scale)
    if isinstance(loss_coeff, bool) or not isinstance(loss_coeff, (int, float)) or \
            loss_coeff != loss_coeff or abs(loss_coeff) == float("inf"):
        raise ValueError(f"loss_coeff must be a finite float, got {loss_coeff!r}")
    if check_finite:
        C.check_finite(("q", "k", "qi", "ki"), (q, k, qi, ki))
    packed = None
    if topk_indices is not None:
        heads = (qi.shape[-2],)
        packed = lay.pack_heads(topk_indices, heads)
        C.check_topk_indices(packed, lay.seg, heads, block_size, q.device)
    return indexer_kl_loss(lay.pack(q), lay.pack(k), lay.pack(qi), lay.pack(ki), lay.seg,
                           packed, block_size=block_size,
                           scale=_scale(softmax_scale, q.shape[-1]),
                           index_scale=_scale(index_softmax_scale, qi.shape[-1]),
                           loss_coeff=float(loss_coeff))


class MSAAux:
    """Side results of ``msa_attention``.

    topk_indices: ``[Hi, total_q, K]`` / ``[B, Hi, Tq, K]`` (None in dense mode);
    lse: attention LSE shaped ``[total_q, Hq]`` / ``[B, Tq, Hq]`` (None in dense mode;
    differentiable like ``msa_sparse_attention``'s);
    kl_loss: detached scalar indexer KL (None when the indexer is not trained). Where the
    KL is computed in the attention backward (``indexer_kl_kernel`` gives
    ``"attention_backward"``), its value is known after the backward; read before, it is
    computed then (the backward reuses its gradients). ``kl`` holds it for a later read
    (``msa.ops.kl.deferred.kl_value``).
    """

    def __init__(self, topk_indices: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                 kl=None):
        self.topk_indices, self.lse, self.kl = topk_indices, lse, kl

    @property
    def kl_loss(self) -> Optional[torch.Tensor]:
        from .ops.kl.deferred import kl_value
        return kl_value(self.kl)

    def __repr__(self) -> str:
        return (f"MSAAux(topk_indices={self.topk_indices!r}, lse={self.lse!r}, "
                f"kl_loss={self.kl!r})")


class _InjectLossGrad(torch.autograd.Function):
    """Identity on ``out``; its backward also sends gradient 1 into ``loss``.

    This ties the indexer's KL loss to the attention output so that one
    ``backward()`` trains both branches (the KL gradient does not depend on
    ``d out``; it fires once whenever ``out`` is back-propagated).
    """

    @staticmethod
    def forward(ctx, out, loss):
        ctx.loss_shape = loss.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_ones(ctx.loss_shape, dtype=torch.float32)


def msa_attention(q, k, v, qi, ki, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                  max_seqlen_k=None, *, fragment_indices=None,
                  config: Optional[MSAConfig] = None, mode: str = "sparse",
                  train_indexer: bool = True, return_aux: bool = False,
                  backend: str = "auto", deterministic: bool = False,
                  check_finite: bool = False):
    """MSA in one call: indexer selection, attention, and indexer training.

    ``mode="sparse"``: the indexer (on detached ``qi``/``ki``) selects ``config.topk``
    blocks, attention runs over them. ``mode="dense"``: warm-up; attention is dense
    causal and the indexer learns from the dense distribution. When ``train_indexer`` and
    ``qi``/``ki`` require grad, ``config.kl_loss_coeff * KL`` is attached to the output:
    a single ``out.backward(...)`` gives main-branch gradients to q, k, v and KL gradients
    to qi, ki (q, k are detached inside the KL).

    Shapes as ``msa_sparse_attention`` (q, k, v) and ``msa_indexer`` (qi, ki); a given
    ``config`` must agree with them (heads, head dims, index heads and dim); without one
    the shapes make it (block 128, top-16). ``backend``, ``deterministic``,
    ``check_finite`` as in ``msa_sparse_attention``; with the Triton backend the KL
    (sparse, and dense warm-up) comes from the Triton kernels (one shared index-key head)
    and one ``SparsePlan`` serves the whole step. ``deterministic`` covers the sparse mode
    (attention and KL gradients and the KL value bitwise repeatable); the dense warm-up KL
    kernel uses fp32 atomics, so ``mode="dense"`` with ``deterministic=True`` is rejected.
    Returns ``out`` or ``(out, MSAAux)`` with ``return_aux``.
    """
    if mode not in ("sparse", "dense"):
        raise ValueError(f"mode must be 'sparse' or 'dense', got {mode!r}")
    for name, flag in (("train_indexer", train_indexer), ("return_aux", return_aux),
                       ("deterministic", deterministic), ("check_finite", check_finite)):
        C.check_flag(name, flag)
    if deterministic and mode == "dense":
        raise ValueError("deterministic=True covers mode='sparse' only (the dense warm-up "
                         "KL kernel accumulates with fp32 atomics)")
    lay = call_layout("q", q, "k", k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      fragment_indices)
    C.check_qkv(q, k, v)
    C.check_float_tensor("qi", qi, q.dim(), q.device)
    C.check_float_tensor("ki", ki, q.dim(), q.device)
    C.check_index(qi, ki, q, k)
    if config is None:
        cfg = MSAConfig(num_heads=q.shape[-2], num_kv_heads=k.shape[-2], head_dim=q.shape[-1],
                        num_index_heads=qi.shape[-2], index_head_dim=qi.shape[-1])
    else:
        cfg = C.check_config(config)
        C.check_config_matches(cfg, q, k, qi)
    if check_finite:
        C.check_finite(("q", "k", "v", "qi", "ki"), (q, k, v, qi, ki))
    use_triton = C.use_triton(backend, q)
    wants_kl = train_indexer and cfg.kl_loss_coeff != 0 and torch.is_grad_enabled() and \
        (qi.requires_grad or ki.requires_grad)
    triton_kl = wants_kl and ki.shape[-2] == 1 and use_triton and C.use_triton(backend, qi)
    bs, scale, iscale = cfg.block_size, cfg.scale, cfg.index_scale
    qp, kp, vp, qip, kip = (lay.pack(x) for x in (q, k, v, qi, ki))
    topk_indices = lse = ilse = deferred = None
    if mode == "sparse":
        index_triton = C.use_triton(backend, qi) and (ki.shape[-2] == 1 or
                                                      backend == "triton")
        if index_triton and cfg.index_precision == "fp8":
            C.check_fp8_device("index_precision='fp8'", qi)
        topk_indices, _ = indexer_op(qip.detach(), kip.detach(), *lay.meta, bs, cfg.topk,
                                     iscale, 1.0, False, index_triton, cfg.index_precision)
        if triton_kl:       # one plan for the step (the attention ops find it when Hkv = Hi),
            # queued behind the top-k; the host reads its counts (the one host sync) when
            # the forward needs them, after setting the forward up
            chunk = W.training_chunk(qp, cfg.topk, bs, qi.shape[-2], qi.shape[-1],
                                     deterministic)
            step_plan = P.sparse_plan(topk_indices, lay.seg, block_size=bs, heads=qi.shape[-2],
                                      max_chunk=chunk,
                                      q_per_item=W.item_queries(q.shape[-2] // k.shape[-2]))
            step_plan.queue()
            from .ops.kl.deferred import AttentionWithKL, DeferredKL, kl_in_backward
            if kl_in_backward(qp, kp, vp, qip, bs, deterministic):   # the KL's teacher rows
                deferred = DeferredKL(qp.detach(), kp.detach(), qip.detach(), kip.detach(),
                                      topk_indices, step_plan, scale=scale, index_scale=iscale,
                                      loss_coeff=cfg.kl_loss_coeff)
        if deferred is not None:                    # come from the attention backward
            out, lse = AttentionWithKL.apply(qp, kp, vp, qip, kip, deferred, lay.meta, scale)
        else:
            out, lse = attention_fwd_op(qp, kp, vp, topk_indices, *lay.meta, bs, scale,
                                        use_triton, _backward_mode(use_triton, deterministic),
                                        True)
        if triton_kl:       # launched behind the attention forward, which hides its host time
            from .ops.indexer.triton import selected_lse
            ilse = selected_lse(qip.detach(), kip.detach(), topk_indices, step_plan,
                                scale=iscale)
            if deferred is not None:
                deferred.indexer_lse = ilse
    else:
        out = dense_attention(qp, kp, vp, lay.seg, scale=scale)
    kl = None
    if triton_kl and mode == "dense":
        from .ops.kl.dense import indexer_kl_dense
        loss, dqi, dki = indexer_kl_dense(
            qp.detach(), kp.detach(), qip.detach(), kip.detach(), lay.seg, block_size=bs,
            scale=scale, index_scale=iscale, loss_coeff=cfg.kl_loss_coeff)
        kl = LossWithGrads.apply(loss, qi, ki, dqi.view(qi.shape), dki.view(ki.shape))
    elif triton_kl and deferred is None:
        from .ops.kl.triton import indexer_kl_bwd
        loss, dqi, dki = indexer_kl_bwd(
            qp.detach(), kp.detach(), lse.detach(), qip.detach(), kip.detach(), ilse, topk_indices,
            step_plan, scale=scale, index_scale=iscale, loss_coeff=cfg.kl_loss_coeff,
            deterministic=deterministic)
        kl = LossWithGrads.apply(loss, qi, ki, dqi.view(qi.shape), dki.view(ki.shape))
    elif wants_kl and deferred is None:
        kl = indexer_kl_loss(qp.detach(), kp.detach(), qip, kip, lay.seg, topk_indices,
                             block_size=bs, scale=scale, index_scale=iscale,
                             loss_coeff=cfg.kl_loss_coeff)
    out = lay.unpack(out)
    if kl is not None:
        out = _InjectLossGrad.apply(out, kl)
    if not return_aux:
        return out
    aux_topk = None if topk_indices is None else lay.unpack_heads(topk_indices)
    aux_lse = None if lse is None else lay.unpack(lse)
    return out, MSAAux(aux_topk, aux_lse, deferred if kl is None else kl.detach())
