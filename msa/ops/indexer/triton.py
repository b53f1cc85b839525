"""Triton indexer: streamed block top-k (no score matrix in memory) + selected LSE.

``indexer_topk_kernel``: one program per tile of ``BLOCK_T`` queries of one segment x all
``Hi`` index heads (``BLOCK_T * Hi`` rows). It walks the key blocks ``L = 0 .. local`` of
the tile, computes the scores ``qi . ki`` of a whole block with one MMA, max-pools them
and keeps, per row, the ``topk - 1`` best earlier blocks in registers (a new block
replaces the worst kept one, the worst being the lowest score and, among equal scores,
the largest id; blocks arrive in ascending id, so ties keep the smaller id). At the end
the program ranks the kept blocks (score desc, id asc, by pairwise comparison) and writes
each row in its final form: ranked ids, the local block, then -1. Memory is
``O(T * topk)``; the cost is one causal GEMM ``2 * Di * Hi * causal_elements``.

The selected LSE is a second, KV-outer pass over only the selected blocks (the attention
kernel without V, ``msa.ops.attention.forward.launch_partials``, over the selection's
``SparsePlan``) and a log-sum-exp over the slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...varlen import Segments
from ..attention.forward import check_supported, launch_partials
from ..geometry import query_tiles
from ..plan import SparsePlan, build_plan
from ..workspace import lse_chunk
from ..quant import FP8_CANDIDATES, quantize_e4m3
from . import two_pass
from ..triton_utils import dot, next_pow2, precision, rank_key, rank_rows, upcast

FP8_SCAN = "two_pass"       # the FP8 scan of ``scan_topk`` where the two-pass one applies
# warps of the one-pass scan in the inputs' precision: 8 were faster than 4 at every shape
# timed, with equal rows (docs/experiments.md, session 50); the FP8 scans keep 4
SCAN_WARPS = 8


@triton.jit(do_not_specialize=["stride_oh"])
def indexer_topk_kernel(
        QI, KI, KS, TILE_Q0, TILE_N, TILE_KBASE, TILE_OFF, OUT_ID, scale,
        stride_qt, stride_qh, stride_kt, stride_oh, stride_ot,
        HI: tl.constexpr, DI: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr,
        KR: tl.constexpr, NRANK: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, FP8: tl.constexpr = False, ROWS: tl.constexpr = None):
    # ROWS: BLOCK_T * HI rounded up to a power of two (the rows past BLOCK_T * HI are off)
    pid = tl.program_id(0)
    q0 = tl.load(TILE_Q0 + pid).to(tl.int64)
    n = tl.load(TILE_N + pid)
    kbase = tl.load(TILE_KBASE + pid).to(tl.int64)
    off = tl.load(TILE_OFF + pid)                    # pos of the tile's first query
    offs_m = tl.arange(0, ROWS)
    tok = offs_m // HI
    h = offs_m % HI
    rmask = (tok < n) & (offs_m < BLOCK_T * HI)
    pos = off + tok
    local = tl.where(rmask, pos // BS, 0)
    qi = tl.load(QI + (q0 + tok)[:, None] * stride_qt + h[:, None] * stride_qh
                 + tl.arange(0, DI)[None, :], mask=rmask[:, None], other=0.0)
    slots = tl.arange(0, KR)
    # kept blocks: ids (distinct negatives = empty) and scores; padded slots never evicted
    ids = tl.zeros((ROWS, KR), dtype=tl.int32) - 1 - slots[None, :]
    vals = tl.where(slots[None, :] < NRANK, float("-inf"), float("inf")) + \
        tl.zeros((ROWS, KR), dtype=tl.float32)
    offs_n = tl.arange(0, BS)
    n_blocks = (off + n - 1) // BS                   # blocks before the last local block
    for blk in range(0, n_blocks):
        kt = tl.load(KI + (kbase + blk * BS + offs_n)[:, None] * stride_kt
                     + tl.arange(0, DI)[None, :])
        if FP8:                                        # e4m3 MMA, per-key scales
            s = tl.dot(qi, tl.trans(kt)) * tl.load(KS + kbase + blk * BS + offs_n)[None, :]
        else:
            s = dot(qi, tl.trans(kt), PRECISION, UPCAST)
        m = rank_key(tl.max(s, 1) * scale)             # NaN as -FLT_MAX, -0 as +0
        worst = tl.min(vals, 1)
        wid = tl.max(tl.where(vals == worst[:, None], ids, -2147483647), 1)
        ins = (blk < local) & (m > worst)
        hit = ins[:, None] & (ids == wid[:, None])
        vals = tl.where(hit, m[:, None], vals)
        ids = tl.where(hit, blk, ids)
    # rank the kept blocks (score desc, id asc; empty slots are not ranked) and write the
    # row: ranked ids, the local block at min(local, NRANK), -1 elsewhere (pre-filled)
    valid = ids >= 0
    rank = rank_rows(vals, ids, KR)
    orow = h.to(tl.int64) * stride_oh + (q0 + tok) * stride_ot
    tl.store(OUT_ID + orow[:, None] + rank, ids, mask=rmask[:, None] & valid)
    tl.store(OUT_ID + orow + tl.minimum(local, NRANK), local, mask=rmask)


def indexer_topk(qi: torch.Tensor, ki: torch.Tensor, seg: Segments, *, block_size: int,
                 topk: int, scale: float, index_precision: str = "input", block_t: int = None,
                 num_warps: int = None, num_stages: int = 2) -> torch.Tensor:
    """Top-k rows ``[Hi, total_q, topk]`` int32 (same contract as the reference).

    ``index_precision="fp8"``: the scan scores e4m3 copies of ``qi`` and ``ki`` (one
    scale per row, ``msa.ops.quant``) with FP8 MMAs and the key scales (a query's own
    scale ranks nothing and is left out; ``scan_topk``'s FP8 default sums in fp16, the
    two-pass scan of ``msa.ops.indexer.two_pass``), keeping ``topk - 1 +
    FP8_CANDIDATES`` blocks; ``_refine`` re-scores those in the inputs' precision with
    the KV-outer kernel and keeps the best ``topk - 1``."""
    if index_precision == "fp8" and topk > 1:
        cand = scan_topk(qi, ki, seg, block_size, topk + FP8_CANDIDATES, scale, True, block_t,
                     num_warps, num_stages)
        return _refine(qi, ki, cand, seg, block_size, topk, scale)
    return scan_topk(qi, ki, seg, block_size, topk, scale, False, block_t, num_warps, num_stages)


def scan_topk(qi, ki, seg: Segments, block_size: int, topk: int, scale: float, fp8: bool,
              block_t: int = None, num_warps: int = None, num_stages: int = 2,
              kernel: str = None) -> torch.Tensor:
    """The scan's rows ``[Hi, total_q, topk]``. Kernels: ``"one_pass"``
    (``indexer_topk_kernel``, the default in the inputs' precision; with ``fp8`` on
    e4m3 copies of ``qi``, ``ki`` with the key scales, fp32 sums), ``"two_pass"`` (FP8
    only: block maxima from fp16 sums, then the selection,
    ``msa.ops.indexer.two_pass``), ``"gluon"`` (FP8 only: the one-pass scan
    warp-specialized, ``msa.ops.indexer.gluon``, Hopper only); by default ``FP8_SCAN``
    for ``fp8``. ``num_warps``: by default ``SCAN_WARPS`` in the inputs' precision, 4 for
    ``fp8``."""
    total_q, hi, di = qi.shape
    check_supported(qi.dtype, di)
    qi = qi if qi.stride(-1) == 1 else qi.contiguous()
    ki = (ki if ki.stride(-1) == 1 else ki.contiguous())[:, 0] if ki.shape[1] == 1 else None
    if ki is None:
        raise NotImplementedError("the Triton indexer needs one shared index-key head")
    block_t = block_t or max(1, 128 // next_pow2(hi))
    if kernel is None:
        kernel = FP8_SCAN if fp8 and two_pass.supported(seg, block_size) else "one_pass"
    if kernel not in ("one_pass", "two_pass", "gluon"):
        raise ValueError(f"kernel={kernel!r}: expected 'one_pass', 'two_pass' or 'gluon'")
    if kernel != "one_pass" and not fp8:
        raise NotImplementedError(f"kernel={kernel!r} is an FP8 scan")
    num_warps = num_warps or (4 if fp8 else SCAN_WARPS)
    if kernel == "two_pass" and topk > 1:
        if not two_pass.supported(seg, block_size):
            raise NotImplementedError("the two-pass scan numbers blocks below 65535")
        return two_pass.scan_topk_two_pass(qi, ki, seg, block_size=block_size, topk=topk,
                                           block_t=block_t, num_warps=num_warps,
                                           num_stages=num_stages)
    ks = None
    if fp8:
        qi, ki, ks = quantize_e4m3(qi)[0], *quantize_e4m3(ki)
    kr = next_pow2(max(1, topk - 1))
    out = torch.full((hi, total_q, topk), -1, dtype=torch.int32, device=qi.device)
    tiles = query_tiles(seg, block_t, qi.device)
    if topk == 1:
        out[..., 0] = seg.positions(qi.device) // block_size
    elif kernel == "gluon":
        from . import gluon
        if not (block_t * hi == 128 and gluon.supported(qi.device, hi, di, block_size)):
            raise NotImplementedError("the Gluon scan is the FP8 scan on sm_90 for a "
                                      "power-of-two Hi <= 16 in tiles of 128 // Hi queries, "
                                      "Di = 128 and blocks of 128")
        if tiles[0].numel():            # e4m3 copies: contiguous
            gluon.launch_fp8_scan(qi, ki, ks, tiles, out, scale=scale, block_size=block_size,
                                  block_t=block_t, kr=kr, topk=topk)
    elif tiles[0].numel():
        indexer_topk_kernel[(tiles[0].numel(),)](
            qi, ki, ks, *tiles, out, scale,
            qi.stride(0), qi.stride(1), ki.stride(0), out.stride(0), out.stride(1),
            HI=hi, DI=di, BS=block_size, BLOCK_T=block_t, KR=kr, NRANK=topk - 1,
            PRECISION=precision(qi.dtype), UPCAST=upcast(qi.dtype), FP8=fp8,
            ROWS=next_pow2(block_t * hi), num_warps=num_warps, num_stages=num_stages)
    return out


@triton.jit(do_not_specialize=["q0", "n"])
def rank_candidates_kernel(PL, IDS, QPOS, OUT, q0, n, stride_ih, stride_it, stride_oh,
                           stride_ot, HI: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
                           BS: tl.constexpr, NRANK: tl.constexpr, RB: tl.constexpr):
    """Rows ``RB * pid ..`` (row = query ``q0 + i // HI`` of the chunk, index head
    ``i % HI``): the best ``NRANK`` of the candidates ``IDS[h, q, :C]`` before the local
    block by their re-scored maxima ``PL[i * C + slot]`` (score desc, id asc;
    ``rank_key``: NaN as the most negative fp32, -0 as +0), then the local block, into
    ``OUT`` (pre-filled with -1)."""
    i = tl.program_id(0) * RB + tl.arange(0, RB)
    rmask = i < n * HI
    ql = (i // HI).to(tl.int64)
    h = i % HI
    slots = tl.arange(0, CP)
    smask = rmask[:, None] & (slots[None, :] < C)
    ids = tl.load(IDS + h[:, None] * stride_ih + (q0 + ql)[:, None] * stride_it
                  + slots[None, :], mask=smask, other=-1)
    local = tl.load(QPOS + q0 + ql, mask=rmask, other=0) // BS
    ranked = smask & (ids >= 0) & (ids < local[:, None])
    ids = tl.where(ranked, ids, -1)
    sc = rank_key(tl.load(PL + i.to(tl.int64)[:, None] * C + slots[None, :], mask=ranked,
                          other=0.0))
    rank = rank_rows(sc, ids, CP)
    n_ranked = tl.minimum(local, NRANK)
    orow = h.to(tl.int64) * stride_oh + (q0 + ql) * stride_ot
    tl.store(OUT + orow[:, None] + rank, ids, mask=ranked & (rank < n_ranked[:, None]))
    tl.store(OUT + orow + n_ranked, local, mask=rmask)


def _refine(qi, ki, cand, seg: Segments, block_size: int, topk: int,
            scale: float) -> torch.Tensor:
    """Final rows from the FP8 scan's candidate rows ``cand [Hi, total_q, C]``: the
    candidates' block maxima in the inputs' precision by the KV-outer kernel over the
    candidates' plan (max pooling instead of the LSE), then the best ``topk - 1`` (score
    desc, id asc) and the local block (``rank_candidates_kernel``)."""
    total_q, hi, _ = qi.shape
    c = cand.shape[-1]
    plan = build_plan(cand, seg, block_size=block_size, heads=hi, chunk=lse_chunk(hi, c))
    rows, indices = plan.rows, plan.indices(cand)
    out = torch.full((hi, total_q, topk), -1, dtype=torch.int32, device=qi.device)
    pl = torch.empty(min(total_q, plan.chunk) * hi * c, dtype=torch.float32,
                     device=qi.device)
    rb = 32
    for q0, q1, p in plan.chunks:
        launch_partials(qi, ki, None, rows, p, q0, None, pl, scale=scale, topk=c,
                        block_size=block_size, shared_k_head=True, maxpool=True)
        rank_candidates_kernel[(triton.cdiv((q1 - q0) * hi, rb),)](
            pl, indices, rows.q_pos, out, q0, q1 - q0, indices.stride(0), indices.stride(1),
            out.stride(0), out.stride(1), HI=hi, C=c, CP=next_pow2(c), BS=block_size,
            NRANK=topk - 1, RB=rb, num_warps=4)
    return out


def selected_lse(qi: torch.Tensor, ki: torch.Tensor, topk_indices: torch.Tensor,
                 plan: SparsePlan, *, scale: float, temperature: float = 1.0) -> torch.Tensor:
    """``[Hi, total_q]`` fp32: ``log sum exp(scale * qi.ki / T)`` over the causally
    visible keys of the selected blocks (docs/semantics.md, "Selected LSE"), by a
    KV-outer pass over the selection's plan (``heads=Hi``, at most ``lse_chunk``
    queries per chunk)."""
    total_q, hi, _ = qi.shape
    topk = topk_indices.shape[-1]
    plan.require(hi, lse_chunk(hi, topk), "selected LSE")
    rows, indices = plan.rows, plan.indices(topk_indices)
    out = torch.empty((hi, total_q), dtype=torch.float32, device=qi.device)
    pl = torch.empty(min(total_q, plan.chunk) * hi * topk, dtype=torch.float32,
                     device=qi.device)
    for q0, q1, p in plan.chunks:
        pl.fill_(float("nan"))      # a valid slot left unwritten shows
        launch_partials(qi, ki, None, rows, p, q0, None, pl, scale=scale / temperature,
                        topk=topk, block_size=plan.block_size,
                        shared_k_head=ki.shape[1] == 1)
        t = indices[:, q0:q1].long()
        valid = (t >= 0) & (t < rows.q_nblocks[q0:q1].view(1, -1, 1))
        part = pl[:(q1 - q0) * hi * topk].view(q1 - q0, hi, topk).transpose(0, 1)
        part = torch.where(valid, part, torch.full_like(part, float("-inf")))
        out[:, q0:q1] = torch.logsumexp(part, dim=-1)
    return out
