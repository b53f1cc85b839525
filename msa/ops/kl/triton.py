"""Triton indexer-KL backward, KV-outer.

One program per work item of the planning over the *index* top-k (index head ``h``, KV
block, slice of the queries that selected it). For each tile of ``BLOCK_T`` gathered
tokens it recomputes, over the block's causally visible keys,

    teacher = mean over the Q heads served by index head h of exp(scale q.k - teacher_lse)
    student = exp(index_scale qi.ki - indexer_lse)
    dz      = loss_coeff / (Hi * total_q) * (student - teacher)

and adds ``index_scale * dz @ ki`` to ``dqi`` (per tile) and the KL terms to the loss
(fp32 atomics). ``dki = index_scale * sum dz^T @ qi`` comes from a second pass
(``kl_dki_kernel``) over the dz rows the first stores, one per edge: holding the
128 x 128 fp32 sum in registers over the item made the kernel spill and run slower
(docs/experiments.md). The deterministic mode and the dense warm-up keep that sum
per item (``DZ_OUT=False``). The student
GEMMs need 16 MMA rows, so each token's row is replicated ``R`` times with weight ``1/R``
(``R`` = 1 at 16 heads per group: the tile has 16 tokens). The teacher's head sum is a
reduction over each token's consecutive rows.
On Hopper (``kl_kernel``) the teacher rows come from the Gluon kernel of
``msa.ops.kl.gluon`` instead (``PT_IN``: one fp32 row per edge) and this kernel runs the
student half only, faster than this kernel doing both (docs/experiments.md); with groups
of 3 to 16 heads (not deterministic) the Gluon ``kl_kernel`` runs both halves.
The LSEs are trusted (attention forward LSE and the indexer's selected LSE over the same
selection).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.forward import check_supported, choose_kernel
from ..launch import launch_fitting, smaller_tiles
from ..plan import ITEM_FIELDS, SparsePlan
from ..workspace import kl_chunk
from ..reduce import base_layers, sum_items
from ..triton_utils import LOG2E, dot, load_item, next_pow2, precision, upcast


@triton.jit(do_not_specialize=["q0", "edge0"],
            do_not_specialize_on_alignment=ITEM_FIELDS)
def indexer_kl_bwd_kernel(
        Q, K, TLSE, QI, KI, ILSE, DQI, DKI, LOSS, POS, EDGE_Q, EDGE_SLOT, DZ, PT,
        ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0, ITEM_E1,
        q0, edge0, scale_log2, iscale, coeff,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_tl, stride_it, stride_ih,
        stride_kit, stride_lh,
        G: tl.constexpr, G_PAD: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
        DI: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr, R: tl.constexpr,
        HI: tl.constexpr, TOPK: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, DENSE: tl.constexpr = False, DET: tl.constexpr = False,
        K_ONCE: tl.constexpr = True, KI_ONCE: tl.constexpr = True, DZ_OUT: tl.constexpr = False,
        PT_IN: tl.constexpr = False):
    # DENSE: an item's "edges" are the packed query rows e0..e1 themselves (dense warm-up:
    # every causal query of the block, no edge list). Edge query ids are relative to q0.
    # DET: no atomics: dqi into the slot buffer DQI[(q - q0), h, slot, :] (one edge per
    # slot), dki into DKI[item] ([BS, DI]) and the loss into LOSS[item]
    # K_ONCE: with one KV head per index head, hold its keys on chip for the whole item
    # (32 KB more shared memory at D=128) instead of loading them per tile
    # KI_ONCE: the same for the block's index keys (Di=128: the 128-row tile then fits
    # 99 KB GPUs)
    # DZ_OUT: store each edge's dz row (index dtype, as the dki product would round it) at
    # DZ[e - edge0] (the chunk's first edge) for kl_dki_kernel instead of summing dki here
    # PT_IN: the teacher's rows come from PT[e - edge0] (msa.ops.kl.gluon.teacher_kernel);
    # only the student half runs here
    pid = tl.program_id(0)
    h, krow, t0, nk, e0, e1 = load_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                                        ITEM_E1, pid)
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    offs_di = tl.arange(0, DI)
    kmask = offs_n < nk
    ki_ptr = KI + (krow + offs_n)[:, None] * stride_kit + offs_di[None, :]
    if KI_ONCE:
        ki = tl.load(ki_ptr, mask=kmask[:, None], other=0.0)
    dki = tl.zeros((BS, DI), dtype=tl.float32)
    if NKV == 1 and K_ONCE and not PT_IN:           # the one KV head's keys, loaded once
        k0 = tl.load(K + (krow + offs_n)[:, None] * stride_kt + h * stride_kh
                     + offs_d[None, :], mask=kmask[:, None], other=0.0)
    # teacher rows: (token, q head of the group); student rows: (token, replica)
    offs_m = tl.arange(0, BLOCK_T * G_PAD)
    tok_m = offs_m // G_PAD
    g_m = offs_m % G_PAD
    offs_r = tl.arange(0, BLOCK_T * R)
    tok_r = offs_r // R
    loss = 0.0
    for e in range(e0, e1, BLOCK_T):
        if not KI_ONCE:
            ki = tl.load(ki_ptr, mask=kmask[:, None], other=0.0)
        # student
        er = e + tok_r
        rmask = er < e1
        if DENSE:
            qr = tl.where(rmask, er, 0).to(tl.int64)
        else:
            qr = q0 + tl.load(EDGE_Q + er, mask=rmask, other=0).to(tl.int64)
        pos_r = tl.load(POS + qr, mask=rmask, other=-1)
        qi = tl.load(QI + qr[:, None] * stride_it + h * stride_ih + offs_di[None, :],
                     mask=rmask[:, None], other=0.0)
        ilse = tl.load(ILSE + h * stride_lh + qr, mask=rmask, other=float("inf"))
        ilse = tl.where(ilse == float("-inf"), float("inf"), ilse)
        z = dot(qi, tl.trans(ki), PRECISION, UPCAST)
        allowed_r = ((t0 + offs_n)[None, :] <= pos_r[:, None]) & kmask[None, :] & \
            rmask[:, None]
        log_ps = z * iscale - ilse[:, None]
        ps = tl.where(allowed_r, tl.exp(log_ps), 0.0)                 # [BLOCK_T*R, BS]
        if PT_IN:
            pt_r = tl.load(PT + (er - edge0).to(tl.int64)[:, None] * BS + offs_n[None, :],
                           mask=rmask[:, None], other=0.0)
        else:
            # teacher, accumulated over the KV heads and Q heads of index head h
            em = e + tok_m
            mmask = (em < e1) & (g_m < G)
            if DENSE:
                qm = tl.where(em < e1, em, 0).to(tl.int64)
            else:
                qm = q0 + tl.load(EDGE_Q + em, mask=em < e1, other=0).to(tl.int64)
            pos_m = tl.load(POS + qm, mask=em < e1, other=-1)
            allowed_m = ((t0 + offs_n)[None, :] <= pos_m[:, None]) & kmask[None, :] & \
                mmask[:, None]
            pt = tl.zeros((BLOCK_T, BS), dtype=tl.float32)
            for j in range(NKV):
                if NKV == 1 and K_ONCE:
                    kt = k0
                else:
                    kt = tl.load(K + (krow + offs_n)[:, None] * stride_kt + (h * NKV + j) *
                                 stride_kh + offs_d[None, :], mask=kmask[:, None], other=0.0)
                head = (h * NKV + j) * G + g_m
                qt = tl.load(Q + qm[:, None] * stride_qt + head[:, None] * stride_qh
                             + offs_d[None, :], mask=mmask[:, None], other=0.0)
                tlse = tl.load(TLSE + qm * stride_tl + head, mask=mmask, other=float("inf"))
                tlse = tl.where(tlse == float("-inf"), float("inf"), tlse) * 1.4426950408889634
                s = dot(qt, tl.trans(kt), PRECISION, UPCAST) * scale_log2
                p = tl.where(allowed_m, tl.exp2(s - tlse[:, None]), 0.0)
                # head sum: a token's G_PAD rows are consecutive, so this reduces within warps
                # (exact fp32; the earlier 0/1-matrix MMA rounded p to tf32)
                pt += tl.sum(tl.reshape(p, (BLOCK_T, G_PAD, BS)), 1)
            pt_r = tl.reshape(tl.broadcast_to(pt[:, None, :], (BLOCK_T, R, BS)),
                              (BLOCK_T * R, BS))                          # onto the replicas
            pt_r = pt_r / (G * NKV)
        log_pt = tl.log(tl.where(pt_r > 0, pt_r, 1.0))
        loss += tl.sum(tl.sum(tl.where(pt_r > 0, pt_r * (log_pt - log_ps), 0.0), 1)) / R
        dz = (coeff / R) * (ps - pt_r)                               # replicas share 1/R
        dqi = dot(dz.to(ki.dtype), ki, PRECISION, UPCAST) * iscale
        first = rmask & (offs_r % R == 0)              # one replica adds the token's sum
        if DET:
            slot = tl.load(EDGE_SLOT + er, mask=rmask, other=0).to(tl.int64)
            sidx = (((qr - q0) * HI + h) * TOPK + slot) * DI
            tl.store(DQI + sidx[:, None] + offs_di[None, :], dqi * R, mask=first[:, None])
        else:
            tl.atomic_add(DQI + qr[:, None] * (HI * DI) + h * DI + offs_di[None, :],
                          dqi * R, mask=first[:, None], sem="relaxed")   # contiguous fp32
        if DZ_OUT:              # the token's sum over its replicas: R x its replica's row
            tl.store(DZ + (er - edge0).to(tl.int64)[:, None] * BS + offs_n[None, :],
                     (dz * R).to(DZ.dtype.element_ty), mask=first[:, None])
        else:
            dki += dot(tl.trans(dz.to(qi.dtype)), qi, PRECISION, UPCAST)
    if DET:
        p_off = (pid.to(tl.int64) * BS + offs_n)[:, None] * DI + offs_di[None, :]
        tl.store(DKI + p_off, dki * iscale, mask=kmask[:, None])
        tl.store(LOSS + pid, loss * coeff)
    else:
        if not DZ_OUT:
            tl.atomic_add(DKI + (krow + offs_n)[:, None] * DI + offs_di[None, :],
                          dki * iscale, mask=kmask[:, None], sem="relaxed")
        tl.atomic_add(LOSS, loss * coeff, sem="relaxed")


@triton.jit(do_not_specialize=["q0", "edge0"],
            do_not_specialize_on_alignment=ITEM_FIELDS)
def kl_dki_kernel(DZ, QI, DKI, EDGE_Q, ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                  ITEM_E1, q0, edge0, iscale, stride_it, stride_ih, BS: tl.constexpr,
                  DI: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr):
    """``dki`` of one work item: ``index_scale * sum over its edges dz^T @ qi`` from the
    dz rows ``DZ [chunk edges, BS]`` (edge ``e`` at row ``e - edge0``) stored by
    ``indexer_kl_bwd_kernel``, added to ``DKI [total_k, Di]`` (fp32 atomics)."""
    h, krow, t0, nk, e0, e1 = load_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                                        ITEM_E1, tl.program_id(0))
    offs_n = tl.arange(0, BS)
    offs_di = tl.arange(0, DI)
    offs_e = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BS, DI), dtype=tl.float32)
    for e in range(e0, e1, BLOCK_E):
        er = e + offs_e
        emask = er < e1
        qr = q0 + tl.load(EDGE_Q + er, mask=emask, other=0).to(tl.int64)
        dz = tl.load(DZ + (er - edge0).to(tl.int64)[:, None] * BS + offs_n[None, :],
                     mask=emask[:, None], other=0.0)
        qi = tl.load(QI + qr[:, None] * stride_it + h * stride_ih + offs_di[None, :],
                     mask=emask[:, None], other=0.0)
        acc += dot(tl.trans(dz), qi, PRECISION, UPCAST)
    tl.atomic_add(DKI + (krow + offs_n)[:, None] * DI + offs_di[None, :], acc * iscale,
                  mask=(offs_n < nk)[:, None], sem="relaxed")


def indexer_kl_bwd(q, k, teacher_lse, qi, ki, indexer_lse, topk_indices, plan: SparsePlan,
                   *, scale: float, index_scale: float, loss_coeff: float = 1.0,
                   deterministic: bool = False, block_t: int = None, num_warps: int = 8,
                   num_stages: int = None, kernel: str = None, fused: bool = True):
    """KL loss and gradients ``(loss, dqi, dki)`` (docs/semantics.md, "Indexer KL"; fp32
    ``dz``); the gradients have the dtypes of qi / ki.

    q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, teacher_lse ``[total_q, Hq]`` (the
    attention forward LSE), qi ``[total_q, Hi, Di]``, ki ``[total_k, 1, Di]``,
    indexer_lse ``[Hi, total_q]`` (selected LSE), topk_indices ``[Hi, total_q, K]`` with
    its ``SparsePlan`` (``heads=Hi``, at most ``plan.kl_chunk`` queries per chunk).
    ``deterministic``: bitwise-repeatable loss and gradients (dqi through per-(query,
    head, slot) buffers, dki through per-item buffers summed in a fixed order).
    ``block_t`` (tokens per tile), ``num_warps``, ``num_stages``: launch parameters
    (``launch_kl``; the defaults are the fastest of the sweeps in docs/experiments.md).
    Smaller tiles are tried where the one asked for does not fit the GPU's shared memory
    (an A100 runs 128-row tiles), then the same with keys loaded per tile.
    ``kernel``: ``"gluon"`` computes the teacher with ``msa.ops.kl.gluon`` (``fused``, and
    not ``deterministic``: the student half too, in the same kernel, where
    ``msa.ops.kl.gluon.fuses``; else the student half here), ``"triton"`` both here;
    default ``kl_kernel``'s choice.
    """
    total_q = q.shape[0]
    hi, di = qi.shape[1], qi.shape[2]
    q, k, qi, ki2, loss, dqi, dki = kl_buffers(q, k, qi, ki)
    if total_q:
        topk = topk_indices.shape[2]
        plan.require(hi, kl_chunk(hi, di, topk, deterministic, plan.block_size), "KL")
        block_size, rows = plan.block_size, plan.rows
        # fp32 contiguous once, not per query chunk (launch_kl then copies nothing)
        teacher_lse = teacher_lse.float().contiguous()
        indexer_lse = indexer_lse.float().contiguous()
        if deterministic:
            layers = base_layers(plan.seg, q.device)
        kw = dict(block_size=block_size, scale=scale, index_scale=index_scale,
                  loss_coeff=loss_coeff, block_t=block_t, num_warps=num_warps,
                  num_stages=num_stages)
        if kernel is None:
            kernel = kl_kernel(q, k, hi, block_size)
        elif kernel not in ("triton", "gluon"):
            raise ValueError(f"kernel must be None, 'triton' or 'gluon', got {kernel!r}")
        if kernel == "gluon":
            from . import gluon
        one_kernel = (kernel == "gluon" and fused and not deterministic
                      and gluon.fuses(q, k, qi, ki2))
        for q0, q1, p in plan.chunks:
            if not p.num_items:
                continue
            if not deterministic:
                dz = torch.empty(p.num_edges, block_size, dtype=qi.dtype, device=q.device)
            pt = None
            if one_kernel:                  # teacher and student in one kernel
                gluon.launch_kl(q, k, qi, ki2, teacher_lse, indexer_lse, rows.q_pos, p, q0,
                                dqi, dz, loss, scale_log2=scale * LOG2E,
                                index_scale=index_scale, coeff=loss_coeff / (hi * total_q),
                                block_size=block_size)
            elif kernel == "gluon":         # the teacher's rows (deterministic: no atomics)
                pt = torch.empty(p.num_edges, block_size, dtype=torch.float32,
                                 device=q.device)
                gluon.launch(q, k, teacher_lse, rows.q_pos, p, q0, pt,
                             scale_log2=scale * LOG2E, block_size=block_size)
            if not deterministic:
                if not one_kernel:
                    launch_kl(q, k, teacher_lse, qi, ki2, indexer_lse, dqi, dki, loss,
                              rows.q_pos, p.edge_q, p, q0=q0, dz=dz, pt=pt, **kw)
                dki_pass(dz, qi, dki, p, q0, index_scale)
                continue
            slots = torch.zeros((q1 - q0) * hi * topk * di, dtype=torch.float32,
                                device=q.device)
            pk = torch.zeros((p.num_items, block_size, di), dtype=torch.float32,
                             device=q.device)
            losses = torch.zeros(p.num_items, dtype=torch.float32, device=q.device)
            launch_kl(q, k, teacher_lse, qi, ki2, indexer_lse, slots, pk, losses, rows.q_pos,
                      p.edge_q, p, q0=q0, edge_slot=p.edge_slot, topk=topk,
                      deterministic=True, pt=pt, **kw)
            dqi[q0:q1] += slots.view(q1 - q0, hi, topk, di).sum(2)
            sum_items(p, pk, None, dki.view(-1, 1, di), None, block_size, layers)
            loss += losses.sum()
    return loss, dqi.to(qi.dtype), dki.view(ki.shape).to(ki.dtype)


def dki_pass(dz, qi, dki, p, q0: int, index_scale: float) -> None:
    """``kl_dki_kernel`` over one chunk's plan ``p``: ``dki += index_scale * dz^T @ qi``
    from its dz rows ``dz [p.num_edges, block]``."""
    di = qi.shape[2]
    kl_dki_kernel[(p.num_items,)](
        dz, qi, dki, p.edge_q, p.item_h, p.item_krow, p.item_t0, p.item_nk, p.item_e0,
        p.item_e1, q0, p.edge0, index_scale, qi.stride(0), qi.stride(1), BS=dz.shape[1],
        DI=di, BLOCK_E=64, PRECISION=precision(qi.dtype), UPCAST=upcast(qi.dtype),
        num_warps=4 if di <= 128 else 8, num_stages=3)   # <= 64 KB shared on sm_86 / sm_89


def kl_kernel(q: torch.Tensor, k: torch.Tensor, hi: int, block_size: int) -> str:
    """Which kernel computes the KL's teacher for these inputs (``q [total_q, Hq, D]``,
    ``k [total_k, Hkv, D]``, ``hi`` index heads): ``"gluon"`` (``msa.ops.kl.gluon``:
    Hopper, bf16 / fp16, head dim 128, blocks of 128, ``Hkv == Hi``, at most 64 heads per
    group) where it applies, else ``"triton"`` (``indexer_kl_bwd_kernel``, every GPU and
    the interpreter). ``MSA_KL_KERNEL=triton`` in the environment keeps the Triton kernel;
    ``MSA_KL_KERNEL=forward`` chooses as ``auto`` does and keeps the KL in
    ``msa_attention``'s forward (``msa.ops.kl.deferred.kl_in_backward``)."""
    kernel = choose_kernel("MSA_KL_KERNEL", "msa.ops.kl.gluon", q, k, hi, block_size,
                           others=("forward",))
    if kernel == "forward":
        from . import gluon
        return "gluon" if gluon.supported(q, k, hi, block_size) else "triton"
    return kernel


def kl_buffers(q, k, qi, ki):
    """Checked, contiguous inputs of the KL kernel and its zeroed fp32 outputs:
    ``(q, k, qi, ki2 [total_k, Di], loss, dqi [total_q, Hi, Di], dki [total_k, Di])``."""
    check_supported(q.dtype, max(q.shape[2], qi.shape[2]))
    if ki.shape[1] != 1:
        raise NotImplementedError("the Triton KL backward needs one shared index-key head")
    q, k, qi = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, qi))
    f32 = dict(dtype=torch.float32, device=q.device)
    return (q, k, qi, ki[:, 0].contiguous(), torch.zeros((), **f32),
            torch.zeros(qi.shape, **f32), torch.zeros((ki.shape[0], qi.shape[2]), **f32))


def launch_kl(q, k, teacher_lse, qi, ki2, indexer_lse, dqi, dki, loss, q_pos, edge_q, items,
              *, block_size, scale, index_scale, loss_coeff, block_t=None, num_warps=8,
              num_stages=None, dense=False, deterministic=False, q0=0, edge_slot=None, topk=1,
              dz=None, pt=None):
    """One launch of ``indexer_kl_bwd_kernel`` over the work items ``items`` (``item_h,
    item_krow, item_t0, item_nk, item_e0, item_e1``, ``num_items``), accumulating into
    ``dqi [total_q, Hi, Di]``, ``dki [total_k, Di]`` and ``loss`` (fp32 atomics).
    ``dense``: the items' edge ranges are query rows (``edge_q`` unused).
    ``deterministic``: ``dqi`` is the slot buffer ``[chunk, Hi, topk, Di]`` of the queries
    from ``q0``, ``dki`` per item ``[num_items, block, Di]``, ``loss`` per item.
    ``dz [chunk edges, block]`` (index dtype; edge ``e`` at row ``e - items.edge0``): the
    edges' dz rows are stored there and ``dki`` is left to ``kl_dki_kernel``. ``pt`` (the
    same rows, fp32): the teacher's rows, from ``msa.ops.kl.gluon`` or the attention
    backward; only the student half runs (16-token tiles, no replicas)."""
    total_q, hq, d = q.shape
    hkv, hi, di = k.shape[1], qi.shape[1], qi.shape[2]
    tlse, ilse = teacher_lse.float().contiguous(), indexer_lse.float().contiguous()
    g, nkv = hq // hkv, hkv // hi
    g_pad = next_pow2(g)
    if pt is not None:                  # the student half: 16-token tiles (experiments.md)
        configs = [dict(BLOCK_T=bt, R=1, K_ONCE=False, KI_ONCE=ki1, num_stages=2)
                   for ki1 in (True, False) for bt in dict.fromkeys((block_t or 16, 16))]
    else:
        rows = 64 if max(d, di) > 128 else 256 if g_pad >= 16 else 128   # teacher tile rows
        block_t = block_t or max(1, rows // g_pad)
        num_stages = num_stages or (1 if block_t * g_pad >= 128 else 2)
        tiles = smaller_tiles("BLOCK_T", block_t, g_pad, num_stages)
        # larger tiles first, then keys on chip: rows matter more (docs/experiments.md)
        configs = [dict(c, R=max(1, 16 // c["BLOCK_T"]), K_ONCE=k1, KI_ONCE=ki1)  # replicas
                   for c in tiles for k1, ki1 in ((True, True), (False, True), (False, False))]
    edge_q = q_pos if edge_q is None else edge_q
    launch_fitting(
        indexer_kl_bwd_kernel, (items.num_items,),
        (q, k, tlse, qi, ki2, ilse, dqi, dki, loss, q_pos, edge_q,
         edge_q if edge_slot is None else edge_slot, dz, pt,
         items.item_h, items.item_krow, items.item_t0, items.item_nk, items.item_e0,
         items.item_e1, q0, items.edge0, scale * LOG2E, index_scale,
         loss_coeff / (hi * total_q),
         q.stride(0), q.stride(1), k.stride(0), k.stride(1), tlse.stride(0),
         qi.stride(0), qi.stride(1), ki2.stride(0), ilse.stride(0)),
        configs, G=g, G_PAD=g_pad, NKV=nkv, D=d, DI=di, BS=block_size, HI=hi, TOPK=topk,
        PRECISION=precision(q.dtype), UPCAST=upcast(q.dtype), DENSE=dense, DET=deterministic,
        DZ_OUT=dz is not None, PT_IN=pt is not None, num_warps=num_warps)
