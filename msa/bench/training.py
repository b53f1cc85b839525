"""``msa bench training``: forward + backward.

Per shape and length (bf16, batch 1, random inputs, or ``--selection structured`` as
``msa bench prefill``):

* attention: ``msa_sparse_attention`` forward + backward on a fixed selection, next to
  dense causal SDPA forward + backward (cuDNN and flash, the best reported) and fla's
  ``parallel_nsa`` forward + backward on the same selection;
* the whole step: ``msa_attention`` (indexer, attention, indexer KL) forward + backward,
  with the one shared ``SparsePlan`` and, in the same run, with a plan made by every
  consumer and the top-k validated (what the step did before plans were shared); the
  indexer forward alone (top-k and selected LSE), and the step less it and the attention
  (``step_rest_ms``: the indexer KL forward and backward, planning, glue); one profiled
  step (``step_timeline``, ``msa.bench.timeline``): its kernels by device time and where
  the GPU idled; the step queued behind other GPU work (``step_behind_work_ms``,
  ``msa.bench.common.timed_behind_work``): ``step_ms`` less it is the time the host
  paced the GPU before the step's first host synchronisation;
* every timed backward (msa's and the baselines') starts with the inputs' ``.grad``
  released, as a model's activations have no gradient summed across steps;
* which backward kernel the attention ran (``backward_kernel``) and, on Hopper, the Gluon
  backward (``msa.ops.attention.gluon_bwd``, the default there) beside the Triton
  backward on one plan;
* which KL kernel the step ran (``kl_kernel``; where it is ``"attention_backward"``, the
  step with the KL in the forward too, ``MSA_KL_KERNEL=forward``) and the indexer KL's
  kernels on one plan:
  the automatic choice and the Triton kernel, with the cosine of the Triton kernel's
  results to the automatic one's.

The Triton backward is checked against the fp32 reference at 4K tokens first.
"""
from __future__ import annotations

import os

import torch

import msa
from ..ops import plan as P
from ..ops import workspace as W
from ..ops.attention.naive import attention_backward_reference
from ..varlen import Segments
from . import common as C
from .prefill import fla_call, fresh, sparse_elements
from .selection import inputs, selection_stats
from .timeline import gpu_timeline


def _grads(fn, leaves, dout):
    released(*leaves)
    out = fn()
    out.backward(dout)
    return [x.grad for x in leaves]


def check(cfg, T: int = 4096) -> dict:
    q, k, v, qi, ki = (x.requires_grad_(True) for x in inputs(T, cfg, seed=2))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    topk = msa.msa_indexer(qi.detach(), ki.detach(), cu, cu, block_size=cfg.block_size,
                           topk=cfg.topk)
    out, lse = msa.msa_sparse_attention(q, k, v, topk, cu, cu, block_size=cfg.block_size,
                                        return_lse=True)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], dout)
    ref = attention_backward_reference(
        q.detach().float(), k.detach().float(), v.detach().float(), topk,
        Segments([0], [T], [0], [T], T, T), out.detach().float(), lse.detach(), dout.float(),
        block_size=cfg.block_size, scale=cfg.scale)
    cos = [C.cosine(a, r) for a, r in zip(got, ref)]
    return dict(T=T, cosine_dq_dk_dv=cos, passed=min(cos) > 0.999)


def backward_kernels(q, k, v, topk, dout, cfg, T: int, reps: int) -> dict:
    """On Hopper: the Gluon and the Triton backward on one plan (planning excluded), their
    time and the cosine of their gradients; ``{}`` elsewhere."""
    from ..ops.attention import backward as B, forward as F
    if B.backward_kernel(q, k, v, cfg.block_size) != "gluon":
        return {}
    seg = Segments([0], [T], [0], [T], T, T)
    chunk = min(W.backward_chunk(cfg.num_heads, cfg.head_dim, 2, cfg.topk, 1),
                W.forward_chunk(cfg.num_heads, cfg.head_dim, 2, cfg.topk))
    plan = P.build_plan(topk, seg, block_size=cfg.block_size, heads=cfg.num_kv_heads,
                        chunk=chunk,                       # one plan for both passes
                        q_per_item=W.item_queries(cfg.num_heads // cfg.num_kv_heads))
    out, lse = F.sparse_attn_fwd(q, k, v, topk, plan, scale=cfg.scale, query_major=False)

    def run(kernel):
        return B.sparse_attn_bwd(q, k, v, topk, plan, out, lse, dout, scale=cfg.scale,
                                 kernel=kernel)
    a, b = run("triton"), run("gluon")
    d = {f"gluon_backward_cosine_vs_triton_{n}": C.cosine(x, y)
         for n, x, y in zip(("dq", "dk", "dv"), b, a)}
    for kernel in ("triton", "gluon"):
        d[f"{kernel}_backward_ms"] = C.timed(lambda: run(kernel), reps)
    return d


def kl_kernels(q, k, qi, ki, topk, cfg, T: int, reps: int) -> dict:
    """The indexer KL (loss, dqi, dki) on one plan of ``topk``, planning excluded: the
    automatic choice and ``"triton"``; their times and the Triton kernel's cosines to the
    automatic choice's results."""
    from ..ops.attention import forward as F
    from ..ops.indexer.triton import selected_lse
    from ..ops.kl import triton as KL
    seg = Segments([0], [T], [0], [T], T, T)
    hi, di = qi.shape[1], qi.shape[2]
    plan = P.build_plan(topk, seg, block_size=cfg.block_size, heads=hi,
                        chunk=W.training_chunk(q, cfg.topk, cfg.block_size, hi, di, False),
                        q_per_item=W.item_queries(cfg.num_heads // cfg.num_kv_heads))
    _, lse = F.sparse_attn_fwd(q, k, k, topk, plan, scale=cfg.scale, query_major=False)
    ilse = selected_lse(qi, ki, topk, plan, scale=cfg.index_scale)

    def run(kernel):
        return KL.indexer_kl_bwd(q, k, lse, qi, ki, ilse, topk, plan, scale=cfg.scale,
                                 index_scale=cfg.index_scale, loss_coeff=cfg.kl_loss_coeff,
                                 kernel=kernel)
    d = dict(kl_auto_kernel=KL.kl_kernel(q, k, hi, cfg.block_size))
    base = run(None)
    got = run("triton")
    d["kl_triton_loss_rel_diff_vs_auto"] = abs(got[0] / base[0] - 1).item()
    d["kl_triton_cosine_dqi_dki_vs_auto"] = [C.cosine(x, y) for x, y in zip(got[1:], base[1:])]
    d["kl_triton_ms"] = C.timed(lambda: run("triton"), reps)
    d["kl_auto_ms"] = C.timed(lambda: run(None), reps)
    return d


def released(*leaves) -> None:
    """Drop the leaves' gradients before a timed backward: in a model q, k, v and the
    index inputs are activations, whose gradients are not summed from step to step (a
    leaf's ``.grad`` would add one more read and write of every gradient)."""
    for x in leaves:
        x.grad = None


def run_length(T: int, cfg, args, fla) -> dict:
    q, k, v, qi, ki = (x.requires_grad_(True)
                       for x in inputs(T, cfg, seed=T, selection=args.selection))
    bs = cfg.block_size
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    reps = 5 if T <= 131072 else 3
    topk = msa.msa_indexer(qi.detach(), ki.detach(), cu, cu, block_size=bs, topk=cfg.topk)
    dout = torch.randn(T, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    r = dict(T=T, forward_kernel=msa.attention_kernel(q, k, v, block_size=bs, topk_indices=topk),
             backward_kernel=msa.attention_kernel(q, k, v, block_size=bs, backward=True))
    r.update(selection_stats(topk, bs))

    def attention():
        fresh(topk)
        released(q, k, v)
        out = msa.msa_sparse_attention(q, k, v, topk, cu, cu, block_size=bs)
        out.backward(dout)
    r["attention_fwd_bwd_ms"] = C.timed(attention, reps)
    sparse = sparse_elements(T, cfg)
    r["attention_fwd_bwd_tflops"] = 14 * cfg.head_dim * cfg.num_heads * sparse / \
        r["attention_fwd_bwd_ms"] / 1e9

    r.update(backward_kernels(q.detach(), k.detach(), v.detach(), topk, dout, cfg, T, reps))
    r["kl_kernel"] = msa.indexer_kl_kernel(q, k, qi, ki, block_size=bs)
    r.update(kl_kernels(q.detach(), k.detach(), qi.detach(), ki.detach(), topk, cfg, T, reps))

    def step():
        released(q, k, v, qi, ki)
        out = msa.msa_attention(q, k, v, qi, ki, cu, cu, config=cfg)
        out.backward(dout)
    r["step_ms"] = C.timed(step, reps)
    r["step_behind_work_ms"] = C.timed_behind_work(step, reps)
    r["step_timeline"] = gpu_timeline(step)

    def indexer():                    # the step's index branch: top-k and selected LSE
        msa.msa_indexer(qi.detach(), ki.detach(), cu, cu, block_size=bs, topk=cfg.topk,
                        return_lse=True)
    r["indexer_ms"] = C.timed(indexer, reps)
    r["step_rest_ms"] = r["step_ms"] - r["indexer_ms"] - r["attention_fwd_bwd_ms"]
    r["step_peak_mb"] = C.peak_bytes(step) / 2 ** 20
    if r["kl_kernel"] == "attention_backward":     # the KL in the forward, same run
        os.environ["MSA_KL_KERNEL"] = "forward"
        try:
            r["step_kl_in_forward_ms"] = C.timed(step, reps)
            r["step_kl_in_forward_peak_mb"] = C.peak_bytes(step) / 2 ** 20
        finally:
            del os.environ["MSA_KL_KERNEL"]
    with P.sharing_disabled():
        r["step_ms_plan_per_consumer"] = C.timed(step, reps)
    r["step_saved_ms"] = r["step_ms_plan_per_consumer"] - r["step_ms"]
    if C.wants(args, "dense") and T <= args.dense_max:
        qd, kd, vd = (x.detach().transpose(0, 1).unsqueeze(0).requires_grad_(True)
                      for x in (q, k, v))
        dd = dout.transpose(0, 1).unsqueeze(0)

        def dense(b):
            def fn():
                released(qd, kd, vd)
                C.dense_causal(qd, kd, vd, b).backward(dd)
            return fn
        r["dense_fwd_bwd"] = C.best_dense(dense, reps=3)
        if r["dense_fwd_bwd"]["best"]:
            r["attention_speedup_vs_best_dense"] = \
                r["dense_fwd_bwd"]["best"] / r["attention_fwd_bwd_ms"]
    if fla is not None and T <= args.fla_max:
        qf, kf, vf = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        call = fla_call(fla, qf, kf, vf, topk, cfg)

        def fla_step():
            released(qf, kf, vf)
            call().backward(dout)
        r["fla_fwd_bwd_ms"] = C.timed(fla_step, reps)
        r["attention_speedup_vs_fla"] = r["fla_fwd_bwd_ms"] / r["attention_fwd_bwd_ms"]
    return r


def run(args) -> int:
    results = dict(meta=C.metadata("training"), shapes={})
    fla = C.load_fla() if C.wants(args, "fla") else None
    results["meta"].update(fla=fla is not None)
    C.over_shapes(args, results, check,
                  lambda T, cfg, name: run_length(T, cfg, args, fla if name == "m3" else None),
                  "64k,128k", "16k")
    C.write(results, args)
    return 0
