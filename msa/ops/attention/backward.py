"""Triton sparse attention backward, KV-outer.

``sparse_attn_bwd_kernel``: one program per (work item of the forward planning, sub-block
of ``BLOCK_N`` keys). A work item is (KV head, KV block, slice of the queries that selected
it). The program loads its keys and values once, then for each tile of gathered
(query, head) rows recomputes ``P = exp(S - lse)`` and

    dV += P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK += dS^T Q,   dQ = dS K

with ``delta = rowsum(dO * O) - dLSE`` computed beforehand (``dLSE``: the gradient
reaching the returned LSE). The products are formed transposed (``S^T = K Q^T`` etc.), so
the block's keys are the MMA rows: 128 keys fill Hopper's warpgroup MMA, which needs
64-row operands, whatever the query tile (query rows as the M dimension ran on the older
per-warp MMA: slower, docs/experiments.md).
The causal mask is applied only on tiles the block is not fully visible to. Keys no query
selected keep exactly zero gradient.

``dQ`` goes to one slot per (query, KV head, top-k slot, key sub-block) in the dtype of
q (plain stores, no atomics), and ``dq_sum_kernel`` adds a query's slots in slot order.
Rounding a slot to bf16 adds at most the error already made by rounding ``dS`` to bf16
before ``dS K`` (as every flash-style backward does): both are relative to the block's
``sum_k |dS_k| |K_k|``. (fp16 slots have fp16's range, like the fp16 dQ returned.)
Against fp32 atomics into a ``[total_q, Hq, D]`` accumulator it
halves the reduce traffic (16 x 512 B of read-modify-write per query row -> 16 x 256 B
written and read once) and needs no zero-filled fp32 copy of dQ; queries are processed
in chunks so the slot buffer stays under ``SLOT_BUDGET_BYTES`` (times ``workspace_scale()``,
``msa.ops.plan``).

Two reductions of ``dK``/``dV``:

* fast (default): fp32 atomics once per program. Blocks split over several items and KV
  rows shared by fragments sum correctly; the summation order, and so the last bits,
  vary between runs.
* deterministic: one slot per work item (plain stores), summed in a fixed order (work
  items by physical key row, then query range). With the slot-ordered dQ sum, gradients
  are bitwise repeatable.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch import launch_fitting, smaller_tiles
from ..plan import ITEM_FIELDS, SparsePlan
from ..workspace import backward_block_n, backward_chunk
from ..reduce import base_layers, sum_items
from ..triton_utils import (LOG2E, dot, load_item, next_pow2, precision, query_program,
                            upcast)
from .forward import check_supported, choose_kernel



@triton.jit(do_not_specialize=["q0"],
            do_not_specialize_on_alignment=ITEM_FIELDS)
def sparse_attn_bwd_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV, POS, EDGE_Q, EDGE_SLOT,
        ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0, ITEM_E1, q0, scale, scale_log2,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kt, stride_kh, stride_vt,
        stride_vh, stride_lt,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        BS: tl.constexpr, BLOCK_N: tl.constexpr, TOPK: tl.constexpr, BLOCK_Q: tl.constexpr,
        NSUB: tl.constexpr, DET: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    h, krow, t0, nk, e0, e1 = load_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                                        ITEM_E1, pid)
    sub = tl.program_id(1)                          # key sub-block: its own dQ slots
    n0 = sub * BLOCK_N                              # first key of this sub-block
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kmask = offs_n < nk
    key = (krow + offs_n)[:, None]
    k = tl.load(K + key * stride_kt + h * stride_kh + offs_d[None, :], mask=kmask[:, None],
                other=0.0)
    v = tl.load(V + key * stride_vt + h * stride_vh + offs_d[None, :], mask=kmask[:, None],
                other=0.0)
    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    QT: tl.constexpr = BLOCK_Q * G_PAD // G        # queries a tile: row r is query r // G,
    offs_m = tl.arange(0, BLOCK_Q * G_PAD)         # head r % G (packed, as in the forward)
    tok = offs_m // G
    g = offs_m % G
    last_key = t0 + n0 + BLOCK_N - 1                # partial sub-blocks are always masked
    # a sub-block past a tail block's last key still runs: it writes its zero dQ slots
    for e in range(e0, e1, QT):
        eidx = e + tok
        emask = (eidx < e1) & (tok < QT)
        ql = tl.load(EDGE_Q + eidx, mask=emask, other=0).to(tl.int64)
        qg = q0 + ql
        pos = tl.load(POS + qg, mask=emask, other=-1)
        head = h * G + g
        row_off = qg[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
        qt = tl.load(Q + row_off, mask=emask[:, None], other=0.0)
        do = tl.load(DO + qg[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                     mask=emask[:, None], other=0.0)
        lse = tl.load(LSE + qg * stride_lt + head, mask=emask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + qg * stride_lt + head, mask=emask, other=0.0)
        # keys are the MMA rows: BLOCK_N = 128 fills Hopper's warpgroup MMA (64-row
        # minimum) whatever the query tile; tensors are [keys, query rows]
        st = dot(k, tl.trans(qt), PRECISION, UPCAST) * scale_log2
        pt = tl.exp2(st - lse[None, :])             # 0 on padded rows (lse = +inf)
        if tl.min(tl.where(emask, pos, 2147483647)) < last_key:
            allowed = ((t0 + offs_n)[:, None] <= pos[None, :]) & kmask[:, None]
            pt = tl.where(allowed, pt, 0.0)
        dv += dot(pt.to(do.dtype), do, PRECISION, UPCAST)
        dpt = dot(v, tl.trans(do), PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += dot(dst.to(qt.dtype), qt, PRECISION, UPCAST)
        dq = dot(tl.trans(dst.to(k.dtype)), k, PRECISION, UPCAST) * scale
        slot = tl.load(EDGE_SLOT + eidx, mask=emask, other=0)
        sidx = (((ql * HKV + h) * TOPK + slot) * NSUB + sub) * G + g
        tl.store(DQ + sidx[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=emask[:, None])
    if DET:
        p_off = (pid.to(tl.int64) * BS + offs_n)[:, None] * D + offs_d[None, :]
        tl.store(DK + p_off, dk * scale, mask=kmask[:, None])
        tl.store(DV + p_off, dv, mask=kmask[:, None])
    else:                       # DK, DV: contiguous fp32 [total_k, Hkv, D], whatever k's strides
        g_off = (krow + offs_n)[:, None] * (HKV * D) + h * D + offs_d[None, :]
        tl.atomic_add(DK + g_off, dk * scale, mask=kmask[:, None], sem="relaxed")
        tl.atomic_add(DV + g_off, dv, mask=kmask[:, None], sem="relaxed")


@triton.jit(do_not_specialize=["q0", "stride_th"])
def dq_sum_kernel(SLOTS, TOPK_INDICES, NBLK, DQ, q0, stride_th, stride_tq, stride_qt, stride_qh,
                  HKV: tl.constexpr, HS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                  D: tl.constexpr, TOPK: tl.constexpr, NSUB: tl.constexpr):
    """Program per (query of the chunk, KV head): ``dq`` of the group's heads = the sum, in
    slot order and in fp32, of the query's valid top-k slots (slots of unselected or
    out-of-range entries were never written)."""
    ql, qg, h, hs = query_program(q0, HKV, HS)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    nb = tl.load(NBLK + qg)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    for j in range(TOPK):
        bid = tl.load(TOPK_INDICES + hs * stride_th + qg * stride_tq + j)
        if (bid >= 0) & (bid < nb):
            for s in range(NSUB):
                rows = (((ql * HKV + h) * TOPK + j) * NSUB + s) * G + offs_g
                acc += tl.load(SLOTS + rows[:, None] * D + offs_d[None, :],
                               mask=gmask[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + qg * stride_qt + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
             acc.to(DQ.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def rowdot_kernel(A, B, OUT, n_rows, stride_at, stride_ah, stride_bt, stride_bh,
                  H: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr):
    """``OUT[r] = sum_d A[t, h, d] * B[t, h, d]`` in fp32 for rows ``r = t * H + h``."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < n_rows
    t, h = r // H, r % H
    offs_d = tl.arange(0, D)[None, :]
    a = tl.load(A + (t * stride_at + h * stride_ah)[:, None] + offs_d, mask=rmask[:, None],
                other=0.0)
    b = tl.load(B + (t * stride_bt + h * stride_bh)[:, None] + offs_d, mask=rmask[:, None],
                other=0.0)
    tl.store(OUT + r, tl.sum(a.to(tl.float32) * b.to(tl.float32), 1), mask=rmask)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` in fp32 for ``[total_q, H, D]`` inputs (unit stride in D), in
    one pass over both (chunked torch ops with fp32 upcasts moved ~7x the bytes)."""
    total_q, h, d = a.shape
    out = torch.empty((total_q, h), dtype=torch.float32, device=a.device)
    rows = 32
    rowdot_kernel[(triton.cdiv(total_q * h, rows),)](
        a, b, out, total_q * h, a.stride(0), a.stride(1), b.stride(0), b.stride(1), H=h, D=d,
        ROWS=rows, num_warps=4)
    return out


def bwd_launch(d: int, block_size: int, g: int, block_n: int = None, block_q: int = None,
               num_stages: int = None):
    """``(block_n, block_q, num_stages)`` of the backward kernel: whole 128-key blocks, 64
    query rows per tile and 3 stages for D <= 128 (the fastest of the sweeps in
    docs/experiments.md); for D = 256 64 keys, 32 rows and one stage, chosen to fit shared
    memory."""
    return (block_n or backward_block_n(d, block_size),
            block_q or max(1, (64 if d <= 128 else 32) // next_pow2(g)),
            num_stages or (3 if d <= 128 else 1))


def backward_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    block_size: int) -> str:
    """The kernel that computes the backward's partial gradients for these inputs:
    ``"gluon"`` (``msa.ops.attention.gluon_bwd``, where the Gluon forward applies: Hopper,
    bf16 / fp16, head dim 128, blocks of 128), else ``"triton"``
    (``sparse_attn_bwd_kernel``). ``MSA_BACKWARD_KERNEL=triton`` in the environment keeps
    the Triton kernel everywhere."""
    return choose_kernel("MSA_BACKWARD_KERNEL", "msa.ops.attention.gluon", q, k, v,
                         block_size)


def sparse_attn_bwd(q, k, v, topk_indices, plan: SparsePlan, out, lse, dout,
                    dlse: Optional[torch.Tensor] = None, *, scale: float,
                    deterministic: bool = False, block_n: int = None, block_q: int = None,
                    num_warps: int = 8, num_stages: int = None, kernel: str = "auto",
                    kl_rows=None):
    """Gradients ``(dq, dk, dv)`` (dtypes of q, k, v) of the sparse attention.

    q, dout, out: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]``; lse ``[total_q, Hq]``
    fp32 from the forward and its incoming gradient ``dlse`` (``None``: zero);
    topk_indices ``[Hs, total_q, K]`` with its ``SparsePlan`` (``heads=Hkv``, at most
    ``plan.backward_chunk`` queries per chunk). ``deterministic``: bitwise repeatable
    gradients (fixed reduction order). ``block_n`` (keys per program), ``block_q``,
    ``num_warps``, ``num_stages``: launch parameters (``bwd_launch``). Where the tile asked
    for does not fit the GPU's shared memory (sm_86/89 cards: 99 KB), one stage and then
    fewer query rows are tried (``msa.ops.launch``).

    The LSE's gradient enters as ``dS = P * (dP - delta + dlse)``: it is folded into
    ``delta = rowsum(dO * O) - dlse``.

    ``kernel``: ``"auto"`` (``backward_kernel``'s choice; the Triton kernel when
    ``block_n`` splits the block), ``"gluon"`` (the warp-specialized Hopper kernel of
    ``msa.ops.attention.gluon_bwd``: bf16 / fp16, head dim 128, blocks of 128) or
    ``"triton"``.

    ``kl_rows(q0, q1, chunk_plan, pt)``: called after each chunk's kernel with the indexer
    KL's teacher rows ``pt [chunk edges, block]`` fp32 that the Gluon kernel wrote
    (``msa.ops.kl.deferred``; Gluon kernel, not deterministic, ``gluon_bwd.teaches``).
    """
    q, k, v, dout = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, dout))
    if kernel not in ("auto", "triton", "gluon"):
        raise ValueError(f"kernel must be 'auto', 'triton' or 'gluon', got {kernel!r}")
    asked = kernel == "gluon"
    if kernel == "auto":
        whole = block_n in (None, plan.block_size)
        kernel = backward_kernel(q, k, v, plan.block_size) if whole else "triton"
    if kernel == "gluon":
        from . import gluon
        if asked and not gluon.supported(q, k, v, plan.block_size):
            raise NotImplementedError("the Gluon backward runs bf16/fp16 attention with head "
                                      "dim 128 and blocks of 128 on sm_90")
        if not gluon.supported(dout, k, v, plan.block_size):   # another dtype, or rows
            dout = dout.to(q.dtype).contiguous()               # not 16-byte aligned
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    hs, _, topk = topk_indices.shape
    check_supported(q.dtype, d)
    if kl_rows is not None:
        from .gluon_bwd import TEACHER_GROUPS, teaches
        if kernel != "gluon" or deterministic or not teaches(hq // hkv):
            raise ValueError("kl_rows needs the Gluon backward, not deterministic, with a "
                             f"group of {TEACHER_GROUPS[0]} to {TEACHER_GROUPS[1]} heads "
                             f"(kernel {kernel!r}, group {hq // hkv})")
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    if total_q:
        block_size = plan.block_size
        lse = lse.float().contiguous()
        out = out if out.stride(-1) == 1 else out.contiguous()
        delta = _rowdot(dout, out)                                       # [total_q, Hq]
        if dlse is not None:
            delta = delta - torch.where(torch.isneginf(lse), 0.0, dlse.float())
        rows, indices = plan.rows, plan.indices(topk_indices)
        g = hq // hkv
        g_pad = next_pow2(g)
        block_n, block_q, num_stages = bwd_launch(d, block_size, g, block_n, block_q,
                                                  num_stages)
        nsub = -(-block_size // block_n)
        if kernel == "gluon" and nsub != 1:
            raise ValueError(f"the Gluon backward takes whole blocks: block_n must be "
                             f"{block_size}, got {block_n}")
        plan.require(hkv, backward_chunk(hq, d, q.dtype.itemsize, topk, nsub), "backward")
        configs = smaller_tiles("BLOCK_Q", block_q, g_pad, num_stages)
        per_query = hkv * topk * nsub * g * d
        slots = torch.empty(min(plan.chunk, total_q) * per_query, dtype=q.dtype,
                            device=q.device)
        if deterministic:
            layers = base_layers(plan.seg, q.device)
        for q0, q1, p in plan.chunks:
            if p.num_items:
                if deterministic:
                    pk = torch.zeros((p.num_items, block_size, d), dtype=torch.float32,
                                     device=q.device)
                    pv = torch.zeros_like(pk)
                if kernel == "gluon":
                    from . import gluon_bwd
                    pt = None if kl_rows is None else torch.empty(
                        p.num_edges, block_size, dtype=torch.float32, device=q.device)
                    gluon_bwd.launch(q, k, v, dout, lse, delta, slots,
                                     *((pk, pv) if deterministic else (dk, dv)), rows, p, q0,
                                     scale=scale, scale_log2=scale * LOG2E, topk=topk,
                                     block_size=block_size,
                                     deterministic=deterministic, teacher_rows=pt)
                    if kl_rows is not None:
                        kl_rows(q0, q1, p, pt)
                else:
                    launch_fitting(
                        sparse_attn_bwd_kernel, (p.num_items, nsub),
                        (q, k, v, dout, lse, delta, slots,
                         *((pk, pv) if deterministic else (dk, dv)),
                         rows.q_pos, p.edge_q, p.edge_slot, p.item_h, p.item_krow,
                         p.item_t0, p.item_nk, p.item_e0, p.item_e1, q0, scale,
                         scale * LOG2E, q.stride(0), q.stride(1), dout.stride(0),
                         dout.stride(1), k.stride(0), k.stride(1), v.stride(0),
                         v.stride(1), lse.stride(0)),
                        configs, HKV=hkv, G=g, G_PAD=g_pad, D=d, BS=block_size,
                        BLOCK_N=block_n, TOPK=topk, NSUB=nsub, DET=deterministic,
                        PRECISION=precision(q.dtype), UPCAST=upcast(q.dtype),
                        num_warps=num_warps)
                if deterministic:
                    sum_items(p, pk, pv, dk, dv, block_size, layers)
            dq_sum_kernel[((q1 - q0) * hkv,)](
                slots, indices, rows.q_nblocks, dq, q0, indices.stride(0), indices.stride(1),
                dq.stride(0), dq.stride(1), HKV=hkv, HS=hs, G=g, G_PAD=g_pad, D=d,
                TOPK=topk, NSUB=nsub, num_warps=4)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
