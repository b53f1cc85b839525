"""Triton sparse attention forward: KV-outer ("gather Q") partials + LSE combine.

``sparse_attn_fwd_kernel``: one program per work item = (KV head ``h``, KV block, slice
of the queries that selected it). It loads the block's K and V once, then loops over
tiles of ``BLOCK_Q * G_PAD`` MMA rows (64 by default) holding ``BLOCK_Q * G_PAD // G``
gathered queries x the ``G`` query heads of the group (the next tile's rows load while
one computes), and writes for each (query, head) a partial output normalised by its own sum
plus its natural-log LSE into slot ``j`` of the query's top-k row. On GPUs whose shared
memory cannot hold a block's K and V (head dim 256 on 99 KB cards) it walks the block in
key sub-blocks loaded per tile instead (``KSPLIT``, an online softmax; ``fwd_configs``).

``sparse_attn_combine_kernel``: one program per (query, KV head) merges the valid slots
by LSE: ``lse = log sum_j exp(lse_j)``, ``out = sum_j exp(lse_j - lse) o_j``.

Queries are processed in chunks so the partial buffer (``chunk x Hkv x K x G x D``)
stays bounded whatever the sequence length. On Hopper the partials come from the
warp-specialized Gluon kernel of ``msa.ops.attention.gluon`` instead where it applies
(``forward_kernel`` says which runs), and for a selection that neighbouring queries
share, the query-outer union kernel of ``msa.ops.attention.gluon_union`` replaces the
partials and the combine (``selection_kernel``).
"""
from __future__ import annotations

import importlib
import os

import torch
import triton
import triton.language as tl

from ..launch import launch_fitting, smaller_tiles
from ..geometry import BlockRows
from ..plan import ITEM_FIELDS, Plan, SparsePlan
from ..workspace import forward_chunk
from ..triton_utils import (LN2, LOG2E, dequant_rows, dot, load_item, next_pow2,
                            online_softmax_step, precision, query_program, upcast)
from .query_major import sparse_attn_fwd_query_major
from .union import prefers_union, union_fwd

# Few queries: the query-major kernel (no planning, no partials) is faster below this
# many queries (measured crossover: docs/experiments.md).
QUERY_MAJOR_MAX_QUERIES = 1024


@triton.jit
def tile_edges(EDGE_Q, EDGE_SLOT, POS, q0, eidx, e1, tok, QT: tl.constexpr):
    """Rows of one tile of gathered edges (row of query ``tok`` of the tile's ``QT``):
    chunk-relative query, top-k slot, query position and the row mask (edge in range, row
    within the tile's queries)."""
    emask = (eidx < e1) & (tok < QT)
    ql = tl.load(EDGE_Q + eidx, mask=emask, other=0).to(tl.int64)
    slot = tl.load(EDGE_SLOT + eidx, mask=emask, other=0)
    pos = tl.load(POS + q0 + ql, mask=emask, other=-1)
    return ql, slot, pos, emask


@triton.jit
def tile_rows(X, qg, head, emask, offs_d, stride_t, stride_h):
    """``X[qg, head, :]`` for every row of a tile (0 on masked rows)."""
    return tl.load(X + qg[:, None] * stride_t + head[:, None] * stride_h + offs_d[None, :],
                   mask=emask[:, None], other=0.0)


@triton.jit
def _split_block(qt, K, V, krow, t0, nk, h, pos, offs_d, scale_log2, stride_kt, stride_kh,
                 stride_vt, stride_vh, BS: tl.constexpr, KSPLIT: tl.constexpr,
                 D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 HAS_V: tl.constexpr):
    """One tile against a block walked in sub-blocks of ``KSPLIT`` keys (loaded per tile,
    from L2 after the first): the row maxima ``m`` (base 2, 0 where nothing is visible),
    sums ``den`` of ``exp2(s - m)`` and unnormalised ``o = sum exp2(s - m) v``."""
    m = tl.full((qt.shape[0],), float("-inf"), dtype=tl.float32)
    den = tl.zeros((qt.shape[0],), dtype=tl.float32)
    o = tl.zeros((qt.shape[0], D), dtype=tl.float32)
    for n0 in tl.static_range(0, BS, KSPLIT):
        offs_s = n0 + tl.arange(0, KSPLIT)
        smask = offs_s < nk
        ks = tl.load(K + (krow + offs_s)[:, None] * stride_kt + h * stride_kh
                     + offs_d[None, :], mask=smask[:, None], other=0.0)
        vs = ks
        if HAS_V:
            vs = tl.load(V + (krow + offs_s)[:, None] * stride_vt + h * stride_vh
                         + offs_d[None, :], mask=smask[:, None], other=0.0)
        allowed = ((t0 + offs_s)[None, :] <= pos[:, None]) & smask[None, :]
        m, den, o = online_softmax_step(qt, ks, vs, allowed, m, den, o, scale_log2,
                                        PRECISION, UPCAST, HAS_V)
    return tl.where(m == float("-inf"), 0.0, m), den, o


@triton.jit(do_not_specialize=["q0"],
            do_not_specialize_on_alignment=ITEM_FIELDS)
def sparse_attn_fwd_kernel(
        Q, K, V, PO, PL, POS, EDGE_Q, EDGE_SLOT,
        ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0, ITEM_E1,
        q0, scale_log2,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, KS, VS, stride_sh,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        BS: tl.constexpr, TOPK: tl.constexpr, BLOCK_Q: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_V: tl.constexpr,
        KSPLIT: tl.constexpr = 0, MAXPOOL: tl.constexpr = False, FP8: tl.constexpr = False):
    h, krow, t0, nk, e0, e1 = load_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0,
                                        ITEM_E1, tl.program_id(0))
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    kmask = offs_n < nk
    if KSPLIT == 0:                   # the whole block's K and V stay on chip
        k = tl.load(K + (krow + offs_n)[:, None] * stride_kt + h * stride_kh
                    + offs_d[None, :], mask=kmask[:, None], other=0.0)
        if HAS_V:
            v = tl.load(V + (krow + offs_n)[:, None] * stride_vt + h * stride_vh
                        + offs_d[None, :], mask=kmask[:, None], other=0.0)
        if FP8:                       # e4m3 rows x their scales (row krow + n, head h)
            soff = krow + h * stride_sh + offs_n
            k = dequant_rows(k, KS, soff, kmask, Q.dtype.element_ty)
            if HAS_V:
                v = dequant_rows(v, VS, soff, kmask, Q.dtype.element_ty)
    else:
        tl.static_assert(not FP8, "FP8 pages need the whole block on chip (KSPLIT=0)")
    # BLOCK_Q * G_PAD rows a tile, packed: row r is query r // G, head r % G (a group
    # of 6 fills 60 of 64 rows with 10 queries instead of 8 queries x 8 padded heads)
    QT: tl.constexpr = BLOCK_Q * G_PAD // G
    offs_m = tl.arange(0, BLOCK_Q * G_PAD)
    tok = offs_m // G
    g = offs_m % G
    # software pipeline (Triton's own pipelining was slower here): the next tile's query
    # rows and the edge indices of the tile after it load while this tile computes
    ql, slot, pos, emask = tile_edges(EDGE_Q, EDGE_SLOT, POS, q0, e0 + tok, e1, tok, QT)
    qt = tile_rows(Q, q0 + ql, h * G + g, emask, offs_d, stride_qt, stride_qh)
    nql, nslot, npos, nmask = tile_edges(EDGE_Q, EDGE_SLOT, POS, q0, e0 + QT + tok, e1, tok,
                                         QT)
    for e in range(e0, e1, QT):
        qt_next = tile_rows(Q, q0 + nql, h * G + g, nmask, offs_d, stride_qt, stride_qh)
        nnql, nnslot, nnpos, nnmask = tile_edges(EDGE_Q, EDGE_SLOT, POS, q0,
                                                 e + 2 * QT + tok, e1, tok, QT)
        if KSPLIT == 0:
            s = dot(qt, tl.trans(k), PRECISION, UPCAST) * scale_log2
            # mask only tiles the block is not fully visible to (local block, partial tails)
            if tl.min(tl.where(emask, pos, 2147483647)) < t0 + BS - 1:
                allowed = ((t0 + offs_n)[None, :] <= pos[:, None]) & kmask[None, :]
                s = tl.where(allowed, s, float("-inf"))
            m = tl.max(s, 1)
            m = tl.where(m == float("-inf"), 0.0, m)
            p = tl.exp2(s - m[:, None])
            den = tl.sum(p, 1)
            if HAS_V:
                o = dot(p.to(v.dtype), v, PRECISION, UPCAST)
        else:                         # sub-blocks of KSPLIT keys, online softmax
            m, den, o = _split_block(qt, K, V, krow, t0, nk, h, pos, offs_d, scale_log2,
                                     stride_kt, stride_kh, stride_vt, stride_vh, BS, KSPLIT,
                                     D, PRECISION, UPCAST, HAS_V)
        if MAXPOOL:                   # the block's largest visible logit instead
            lse = tl.where(den > 0, m * LN2, float("-inf"))
        else:
            lse = tl.where(den > 0, (m + tl.log2(den)) * LN2, float("-inf"))
        pidx = ((ql * HKV + h) * TOPK + slot) * G + g
        if HAS_V:
            o = o / tl.maximum(den, 1e-30)[:, None]
            tl.store(PO + pidx[:, None] * D + offs_d[None, :], o.to(PO.dtype.element_ty),
                     mask=emask[:, None])
        tl.store(PL + pidx, lse, mask=emask)
        qt = qt_next
        ql, slot, pos, emask = nql, nslot, npos, nmask
        nql, nslot, npos, nmask = nnql, nnslot, nnpos, nnmask


@triton.jit(do_not_specialize=["q0", "stride_th"])
def sparse_attn_combine_kernel(
        PO, PL, TOPK_INDICES, NBLK, OUT, LSE, q0,
        stride_th, stride_tq, stride_ot, stride_oh, stride_lt,
        HKV: tl.constexpr, HS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
        D: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr):
    ql, qg, h, hs = query_program(q0, HKV, HS)
    offs_k = tl.arange(0, TOPK_PAD)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    ids = tl.load(TOPK_INDICES + hs * stride_th + qg * stride_tq + offs_k, mask=offs_k < TOPK,
                  other=-1)
    nb = tl.load(NBLK + qg)
    valid = (ids >= 0) & (ids < nb)
    base = (ql * HKV + h) * TOPK
    lse = tl.load(PL + (base + offs_k)[:, None] * G + offs_g[None, :],
                  mask=valid[:, None] & gmask[None, :], other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m[None, :])
    wsum = tl.sum(w, 0)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    for j in range(TOPK):
        ok = tl.load(TOPK_INDICES + hs * stride_th + qg * stride_tq + j)
        if (ok >= 0) & (ok < nb):
            lj = tl.load(PL + (base + j) * G + offs_g, mask=gmask, other=float("-inf"))
            oj = tl.load(PO + ((base + j) * G + offs_g)[:, None] * D + offs_d[None, :],
                         mask=gmask[:, None], other=0.0)
            acc += tl.exp(lj - m)[:, None] * oj.to(tl.float32)
    out = acc / tl.maximum(wsum, 1e-30)[:, None]
    tl.store(OUT + qg * stride_ot + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=gmask[:, None])
    lse_out = tl.where(wsum > 0, m + tl.log(wsum), float("-inf"))
    tl.store(LSE + qg * stride_lt + h * G + offs_g, lse_out, mask=gmask)


def check_supported(dtype: torch.dtype, head_dim: int) -> None:
    """The kernel holds one K and one V block on chip: fp32 with D=256 needs 320 KB of
    shared memory, more than a Hopper SM has."""
    if dtype == torch.float32 and head_dim > 128:
        raise NotImplementedError("the Triton KV-outer kernel supports fp32 up to head dim "
                                  "128; use bf16/fp16 or backend='reference'")


def forward_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   block_size: int) -> str:
    """The kernel that computes the attention forward for these inputs past the few-query
    case: ``"gluon"`` (the warp-specialized KV-outer kernel of
    ``msa.ops.attention.gluon``: Hopper, bf16 / fp16, head dim 128, blocks of 128) where
    it applies, else ``"triton"`` (``sparse_attn_fwd_kernel``, every GPU and the
    interpreter); where it is ``"gluon"``, ``selection_kernel`` may take the union kernel
    instead for a given selection. ``MSA_FORWARD_KERNEL`` in the environment: ``triton``
    keeps the Triton KV-outer kernel everywhere, ``union`` runs the query-outer kernel of
    ``msa.ops.attention.union`` (for selections that consecutive queries share)
    everywhere."""
    if v is None:
        return "triton"
    return choose_kernel("MSA_FORWARD_KERNEL", "msa.ops.attention.gluon", q, k, v, block_size,
                         others=("union",))


def selection_kernel(q, k, v, idx, plan, kernel: str = None, launch: dict = None) -> str:
    """The forward kernel for this selection (``idx [Hs, total_q, K]`` int32 of ``plan``):
    ``kernel`` where named, else ``forward_kernel``'s choice, except that where that is
    the Gluon KV-outer kernel (no launch options given) and the selection's tiles are
    shared enough (``msa.ops.attention.union.prefers_union``), ``"union"``."""
    if kernel:
        return kernel
    chosen = forward_kernel(q, k, v, plan.block_size)
    if chosen == "gluon" and not launch and prefers_union(q, k, v, idx, plan):
        return "union"
    return chosen


def choose_kernel(switch: str, module: str, *args, others=()) -> str:
    """``"gluon"`` where the Gluon kernels of ``module`` (a dotted name) apply to these
    inputs (``module.supported(*args)``) and the environment variable ``switch`` is
    ``auto`` (or unset), else ``"triton"`` (the forward's, the backward's and the KL's
    choice alike); ``switch`` may also name one of ``others``, returned as is. Raises
    ``ValueError`` naming ``switch`` for any other value."""
    value = os.environ.get(switch, "auto")
    allowed = ("auto", "triton") + tuple(others)
    if value not in allowed:
        raise ValueError(f"{switch}={value!r} in the environment; expected one of "
                         f"{', '.join(allowed)}")
    if value != "auto":
        return value
    try:
        gluon = importlib.import_module(module)
    except ImportError:                 # a Triton without Gluon
        return "triton"
    return "gluon" if gluon.supported(*args) else "triton"


def fwd_configs(block_q: int, g_pad: int, num_stages: int, block_size: int,
                fp8: bool = False):
    """Launch configurations of the KV-outer forward, preferred first: the whole block's
    K and V on chip (the given tile, then smaller ones), then the block walked in quarters
    and halves (``KSPLIT`` keys loaded per tile: for GPUs whose shared memory cannot hold
    a head-dim-256 block, 128 KB of K and V, e.g. the 99 KB of sm_86/89). Quarters first:
    they were the faster of the two (docs/experiments.md)."""
    configs = smaller_tiles("BLOCK_Q", block_q, g_pad, num_stages)
    if fp8:                           # e4m3 blocks are dequantized whole, once
        return configs
    for ks in (block_size // 4, block_size // 2):
        if ks >= 16:
            configs += [dict(c, KSPLIT=ks) for c in smaller_tiles("BLOCK_Q", block_q, g_pad, 1)]
    return configs


def launch_partials(q, k, v, rows: BlockRows, plan: Plan, q0: int, po, pl, *, scale: float,
                    topk: int, block_size: int, block_q: int = None, num_warps: int = 4,
                    num_stages: int = 1, shared_k_head: bool = False,
                    maxpool: bool = False, k_scales=None, v_scales=None,
                    kernel: str = None) -> None:
    """Run the KV-outer kernel over one chunk's plan: partial outputs into ``po`` (skipped
    when ``v is None``) and partial LSEs into ``pl`` (``maxpool``: each (query, slot)'s
    largest visible logit instead of its LSE; with ``v is None``).

    Launch defaults (64-row tiles, 4 warps, no Triton pipelining: ``num_stages=1``; the
    kernel prefetches the next tile's query rows itself) were the fastest of the sweeps
    recorded in docs/experiments.md.

    q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]`` (``shared_k_head``: k has one head
    read by every "KV head" of the plan, as index keys are). A tile that does not fit the
    GPU's shared memory falls back to smaller ones and then to sub-blocks of keys
    (``fwd_configs``, ``msa.ops.launch``). ``k_scales, v_scales``: e4m3 ``k, v`` in pages
    ``[P, Hkv, page]`` whose key rows are ``page * Hkv * page_size + t`` (``paged_rows``);
    the scale of row ``r``, head ``h`` is at ``r + h * page_size``. ``kernel``:
    ``"triton"`` or ``"gluon"`` (``msa.ops.attention.gluon``); default ``forward_kernel``'s
    choice for plain attention, the Triton kernel for the LSE-only, shared-key and e4m3
    passes.
    """
    if not plan.num_items:
        return
    hq, d = q.shape[1], q.shape[2]
    hkv = int(plan.num_heads)
    g = hq // hkv
    g_pad = next_pow2(g)
    block_q = block_q or max(1, 64 // g_pad)
    vv = k if v is None else v
    if kernel not in (None, "triton", "gluon"):
        raise ValueError(f"kernel={kernel!r}: the KV-outer partials run 'triton' or 'gluon'")
    if kernel is None:
        plain = not (maxpool or shared_k_head or k_scales is not None)
        kernel = forward_kernel(q, k, v, block_size) if plain else "triton"
    if kernel == "gluon":
        from . import gluon
        if v is None or maxpool or k_scales is not None or shared_k_head or \
                not gluon.supported(q, k, v, block_size):
            raise NotImplementedError("the Gluon forward runs bf16/fp16 attention with head "
                                      "dim 128 and blocks of 128 on sm_90")
        gluon.launch(q, k, v, rows, plan, q0, po, pl, scale_log2=scale * LOG2E, topk=topk,
                     block_size=block_size)
        return
    launch_fitting(
        sparse_attn_fwd_kernel, (plan.num_items,),
        (q, k, vv, po, pl, rows.q_pos, plan.edge_q, plan.edge_slot, plan.item_h,
         plan.item_krow, plan.item_t0, plan.item_nk, plan.item_e0, plan.item_e1, q0,
         scale * LOG2E, q.stride(0), q.stride(1), k.stride(0),
         0 if shared_k_head else k.stride(1), vv.stride(0), vv.stride(1), k_scales, v_scales,
         block_size),
        fwd_configs(block_q, g_pad, num_stages, block_size, fp8=k_scales is not None),
        HKV=hkv, G=g, G_PAD=g_pad, D=d, BS=block_size, TOPK=topk,
        PRECISION=precision(q.dtype), UPCAST=upcast(q.dtype), HAS_V=v is not None,
        MAXPOOL=maxpool, FP8=k_scales is not None, num_warps=num_warps)


def launch_combine(po, pl, topk_indices, rows: BlockRows, out, lse, q0: int, q1: int,
                   hkv: int) -> None:
    """Merge the partials of queries ``[q0, q1)`` into ``out``/``lse`` (rows of the chunk
    starting at ``q0``)."""
    hs, _, topk = topk_indices.shape
    g = out.shape[1] // hkv
    sparse_attn_combine_kernel[((q1 - q0) * hkv,)](
        po, pl, topk_indices, rows.q_nblocks, out, lse, q0,
        topk_indices.stride(0), topk_indices.stride(1), out.stride(0), out.stride(1),
        lse.stride(0),
        HKV=hkv, HS=hs, G=g, G_PAD=next_pow2(g), D=out.shape[2], TOPK=topk,
        TOPK_PAD=next_pow2(topk), num_warps=4)


def use_query_major(total_q: int, query_major: bool = None) -> bool:
    """The few-query kernel runs for ``total_q <= QUERY_MAJOR_MAX_QUERIES`` unless forced."""
    return query_major if query_major is not None else total_q <= QUERY_MAJOR_MAX_QUERIES


def sparse_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    topk_indices: torch.Tensor, plan: SparsePlan, *, scale: float,
                    out: torch.Tensor = None, lse: torch.Tensor = None,
                    query_major: bool = None, k_scales=None, v_scales=None, **launch):
    """The attention forward over the selection of ``plan``: the query-major kernel for
    few queries, the union kernel where chosen (``selection_kernel``), else the KV-outer
    kernel and the combine over the chunks of ``plan``.

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]``;
        topk_indices: ``[Hs, total_q, K]``, Hs in {1, Hkv}.
        plan: the selection's ``SparsePlan`` (``msa.ops.plan.sparse_plan`` with
            ``heads=Hkv`` and at most ``plan.forward_chunk`` queries per chunk; the
            query-major kernel reads only its ``rows``).
        out, lse: optional preallocated outputs.
        query_major: force (True) or forbid (False) the query-major kernel; default: used
            when ``total_q <= QUERY_MAJOR_MAX_QUERIES``.
        k_scales, v_scales: e4m3 ``k, v`` read in place from pages (``launch_partials``;
            the KV-outer kernel only).
        launch: ``block_q``, ``num_warps``, ``num_stages`` of the KV-outer kernel, or
            ``kernel``: ``"triton"``, ``"gluon"`` (``launch_partials``) or ``"union"``
            (``msa.ops.attention.union``, whose launch options are ``tile_rows``,
            ``tma`` and ``gluon``); default ``selection_kernel``'s choice.
    Returns:
        out ``[total_q, Hq, D]`` (dtype of q), lse ``[total_q, Hq]`` fp32.
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    total_q, hq, d = q.shape
    check_supported(q.dtype, d)
    hkv = k.shape[1]
    g = hq // hkv
    topk = topk_indices.shape[2]
    pdtype = q.dtype            # partials: fp32 for fp32, else the half type of the inputs
    out = torch.empty_like(q) if out is None else out
    if lse is None:
        lse = torch.empty((total_q, hq), dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse
    idx = plan.indices(topk_indices)
    kernel = launch.pop("kernel", None)
    if k_scales is None:
        if kernel in (None, "triton") and use_query_major(total_q, query_major):
            sparse_attn_fwd_query_major(q, k, v, idx, plan.rows, out, lse, scale=scale)
            return out, lse
        kernel = selection_kernel(q, k, v, idx, plan, kernel, launch)
        if kernel == "union":
            union_fwd(q, k, v, idx, plan, out, lse, scale=scale, **launch)
            return out, lse
    plan.require(hkv, forward_chunk(hq, d, q.dtype.itemsize, topk), "forward")
    chunk = min(plan.chunk, total_q)
    po = torch.empty(chunk * hkv * topk * g * d, dtype=pdtype, device=q.device)
    pl = torch.empty(chunk * hkv * topk * g, dtype=torch.float32, device=q.device)
    for q0, q1, p in plan.chunks:
        launch_partials(q, k, v, plan.rows, p, q0, po, pl, scale=scale, topk=topk,
                        block_size=plan.block_size, k_scales=k_scales, v_scales=v_scales,
                        kernel=kernel, **launch)
        launch_combine(po, pl, idx, plan.rows, out, lse, q0, q1, hkv)
    return out, lse
