"""The indexer KL computed inside the attention backward (docs/semantics.md, "Indexer KL").

The Gluon attention backward computes ``P`` for every selected (query, head, block); with
``kl_rows`` it also writes the KL's teacher rows, the head means of ``P``
(``msa.ops.attention.gluon_bwd``). Where ``kl_in_backward`` holds, ``msa_attention`` runs
no KL kernel in its forward: ``AttentionWithKL`` is the attention whose backward hands
each chunk's rows to the Triton student half (``StudentFromRows``) and returns ``dqi``,
``dki`` beside ``dq, dk, dv``. No kernel recomputes ``P`` for the KL.

The loss value is then known after the backward. ``DeferredKL.value()`` asked before it
computes the KL in full (``indexer_kl_bwd``) and keeps those gradients for the backward,
which then writes no rows.
"""
from __future__ import annotations

import os

import torch

from ..attention.backward import sparse_attn_bwd
from ..custom_ops import Backward, attention_fwd_op
from ..plan import SparsePlan
from ..workspace import kl_chunk
from .triton import dki_pass, indexer_kl_bwd, kl_buffers, launch_kl


def kl_in_backward(q, k, v, qi, block_size: int, deterministic: bool) -> bool:
    """Whether ``msa_attention`` computes the indexer KL in its attention backward for these
    packed inputs (``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``, ``qi [total_q, Hi,
    Di]``): q, k or v trained, one KV head per index head, the Gluon backward and the Gluon
    KL chosen (Hopper; ``MSA_BACKWARD_KERNEL`` / ``MSA_KL_KERNEL=triton`` keep the Triton
    kernels and the KL in the forward; ``MSA_KL_KERNEL=forward`` the Gluon KL in the
    forward), a group the rows serve (``gluon_bwd.teaches``), not ``deterministic``, not
    under ``torch.compile``."""
    from ..attention.backward import backward_kernel
    from ..attention.gluon_bwd import teaches
    from .triton import kl_kernel
    hkv = k.shape[1]
    return (not deterministic and os.environ.get("MSA_KL_KERNEL") != "forward"
            and not torch.compiler.is_compiling()          # a Python object rides along
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and qi.shape[1] == hkv and teaches(q.shape[1] // hkv)
            and backward_kernel(q, k, v, block_size) == "gluon"
            and kl_kernel(q, k, qi.shape[1], block_size) == "gluon")


class StudentFromRows:
    """The KL's student half on the teacher rows of each chunk of the attention backward:
    ``__call__(q0, q1, chunk_plan, pt)`` (``sparse_attn_bwd``'s ``kl_rows``) runs the Triton
    student with ``pt`` (``PT_IN``) and the ``dki`` pass; ``result()`` gives ``(loss, dqi,
    dki)`` as ``indexer_kl_bwd`` does. Arguments as ``indexer_kl_bwd`` (detached)."""

    def __init__(self, q, k, teacher_lse, qi, ki, indexer_lse, plan: SparsePlan, topk: int,
                 *, scale: float, index_scale: float, loss_coeff: float):
        hi, di = qi.shape[1], qi.shape[2]
        plan.require(hi, kl_chunk(hi, di, topk, False, plan.block_size), "KL")
        self.ki_shape, self.ki_dtype = ki.shape, ki.dtype
        self.q, self.k, self.qi, self.ki2, self.loss, self.dqi, self.dki = \
            kl_buffers(q, k, qi, ki)
        self.tlse = teacher_lse.float().contiguous()
        self.ilse = indexer_lse.float().contiguous()
        self.plan = plan
        self.kw = dict(block_size=plan.block_size, scale=scale, index_scale=index_scale,
                       loss_coeff=loss_coeff)

    def __call__(self, q0: int, q1: int, p, pt: torch.Tensor) -> None:
        dz = torch.empty(p.num_edges, self.plan.block_size, dtype=self.qi.dtype,
                         device=pt.device)
        launch_kl(self.q, self.k, self.tlse, self.qi, self.ki2, self.ilse, self.dqi, self.dki,
                  self.loss, self.plan.rows.q_pos, p.edge_q, p, q0=q0, dz=dz, pt=pt,
                  **self.kw)
        dki_pass(dz, self.qi, self.dki, p, q0, self.kw["index_scale"])

    def result(self):
        return (self.loss, self.dqi.to(self.qi.dtype),
                self.dki.view(self.ki_shape).to(self.ki_dtype))


class DeferredKL:
    """The indexer KL of one ``msa_attention`` call, computed by its attention backward.
    Inputs packed and detached (``indexer_kl_bwd``'s); ``lse`` (the attention's) and
    ``indexer_lse`` are set once the forward has made them."""

    def __init__(self, q, k, qi, ki, topk_indices, plan: SparsePlan, *, scale: float,
                 index_scale: float, loss_coeff: float):
        self.q, self.k, self.qi, self.ki = q, k, qi, ki
        self.topk_indices, self.plan = topk_indices, plan
        self.kw = dict(scale=scale, index_scale=index_scale, loss_coeff=loss_coeff)
        self.lse = self.indexer_lse = None
        self.loss = self.grads = None

    def value(self) -> torch.Tensor:
        """The detached scalar fp32 loss: the backward's; asked before the backward, the KL
        is computed now and its gradients kept for the backward."""
        if self.loss is None:
            loss, dqi, dki = indexer_kl_bwd(self.q, self.k, self.lse, self.qi, self.ki,
                                            self.indexer_lse, self.topk_indices, self.plan,
                                            **self.kw)
            self.loss, self.grads = loss, (dqi, dki)
        return self.loss

    def student(self):
        """The backward's ``kl_rows``, or ``None`` where the KL is already computed."""
        if self.loss is not None:
            return None
        return StudentFromRows(self.q, self.k, self.lse, self.qi, self.ki, self.indexer_lse,
                               self.plan, self.topk_indices.shape[2], **self.kw)


def kl_value(kl):
    """A KL held by ``MSAAux.kl`` (a detached tensor, a ``DeferredKL`` or None) as a
    detached tensor (or None)."""
    return kl.value() if isinstance(kl, DeferredKL) else kl


class AttentionWithKL(torch.autograd.Function):
    """``attention_fwd_op`` on packed ``q, k, v`` (out, lse) whose backward also gives the
    indexer KL's gradients to ``qi``, ``ki`` (``kl``: a ``DeferredKL`` on the same
    selection and plan). ``meta``: the custom op's layout arguments."""

    @staticmethod
    def forward(ctx, q, k, v, qi, ki, kl: DeferredKL, meta: tuple, scale: float):
        out, lse = attention_fwd_op(q, k, v, kl.topk_indices, *meta, kl.plan.block_size,
                                    scale, True, Backward.TRITON, True)
        kl.lse = lse.detach()           # not the output itself: no cycle through ctx
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kl, ctx.scale = kl, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        kl = ctx.kl
        student = kl.student()
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = sparse_attn_bwd(q, k, v, kl.topk_indices, kl.plan, out, lse, dout,
                                     None if dlse is None else dlse.contiguous(),
                                     scale=ctx.scale, kernel="gluon", kl_rows=student)
        if student is not None:
            kl.loss, *kl.grads = student.result()
        dqi, dki = kl.grads
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                dqi if need[3] else None, dki if need[4] else None, None, None, None)


__all__ = ["AttentionWithKL", "DeferredKL", "StudentFromRows", "kl_in_backward", "kl_value"]
