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
kernel without V, ``msa.ops.attention.forward.launch_partials``) and a log-sum-exp over
the slots.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ...varlen import Segments, host_to_device
from ..attention.forward import (INTERPRETER, _dot, _next_pow2, check_supported,
                                 launch_partials)
from ..prepare import block_rows, plan_chunk


@triton.jit(do_not_specialize=["stride_oh"])
def indexer_topk_kernel(
        QI, KI, TILE_Q0, TILE_N, TILE_KBASE, TILE_OFF, OUT_ID, scale,
        stride_qt, stride_qh, stride_kt, stride_oh, stride_ot,
        HI: tl.constexpr, DI: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr,
        KR: tl.constexpr, NRANK: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    q0 = tl.load(TILE_Q0 + pid).to(tl.int64)
    n = tl.load(TILE_N + pid)
    kbase = tl.load(TILE_KBASE + pid).to(tl.int64)
    off = tl.load(TILE_OFF + pid)                    # pos of the tile's first query
    offs_m = tl.arange(0, BLOCK_T * HI)
    tok = offs_m // HI
    h = offs_m % HI
    rmask = tok < n
    pos = off + tok
    local = tl.where(rmask, pos // BS, 0)
    qi = tl.load(QI + (q0 + tok)[:, None] * stride_qt + h[:, None] * stride_qh
                 + tl.arange(0, DI)[None, :], mask=rmask[:, None], other=0.0)
    slots = tl.arange(0, KR)
    # kept blocks: ids (distinct negatives = empty) and scores; padded slots never evicted
    ids = tl.zeros((BLOCK_T * HI, KR), dtype=tl.int32) - 1 - slots[None, :]
    vals = tl.where(slots[None, :] < NRANK, float("-inf"), float("inf")) + \
        tl.zeros((BLOCK_T * HI, KR), dtype=tl.float32)
    offs_n = tl.arange(0, BS)
    n_blocks = (off + n - 1) // BS                   # blocks before the last local block
    for blk in range(0, n_blocks):
        kt = tl.load(KI + (kbase + blk * BS + offs_n)[:, None] * stride_kt
                     + tl.arange(0, DI)[None, :])
        s = _dot(qi, tl.trans(kt), PRECISION, UPCAST)
        m = tl.max(s, 1) * scale
        m = tl.where(m != m, -3.4028234663852886e38, m)      # NaN ranks last
        m = tl.where(m == 0.0, 0.0, m)                      # -0 ranks as +0
        worst = tl.min(vals, 1)
        wid = tl.max(tl.where(vals == worst[:, None], ids, -2147483647), 1)
        ins = (blk < local) & (m > worst)
        hit = ins[:, None] & (ids == wid[:, None])
        vals = tl.where(hit, m[:, None], vals)
        ids = tl.where(hit, blk, ids)
    # rank the kept blocks (score desc, id asc; empty slots are not ranked) and write the
    # row: ranked ids, the local block at min(local, NRANK), -1 elsewhere (pre-filled)
    valid = ids >= 0
    rank = tl.zeros((BLOCK_T * HI, KR), dtype=tl.int32)
    for i in range(KR):                      # a loop, not unrolled: KR is up to 64
        pick = slots[None, :] == i
        vi = tl.max(tl.where(pick, vals, float("-inf")), 1)
        ii = tl.max(tl.where(pick, ids, -2147483647), 1)
        first = (vi[:, None] > vals) | ((vi[:, None] == vals) & (ii[:, None] < ids))
        rank += ((ii >= 0)[:, None] & first).to(tl.int32)
    orow = h.to(tl.int64) * stride_oh + (q0 + tok) * stride_ot
    tl.store(OUT_ID + orow[:, None] + rank, ids, mask=rmask[:, None] & valid)
    tl.store(OUT_ID + orow + tl.minimum(local, NRANK), local, mask=rmask)


def _tiles(seg: Segments, block_t: int, device):
    """Query tiles that stay inside one segment, heaviest (latest) first: ``q0, n, kbase,
    off`` ``[tiles]`` int32 (built on ``device``, no host sync)."""
    nseg = seg.num_segments
    ntiles = [-(-ql // block_t) for ql in seg.q_len]
    total = sum(ntiles)
    if not total:
        return [torch.zeros(0, dtype=torch.int32, device=device) for _ in range(4)]
    first = list(itertools.accumulate([0] + ntiles[:-1]))
    per = host_to_device([seg.q_start, seg.q_len, seg.k_base, seg.k_len, ntiles, first],
                         device)
    q_start, q_len, k_base, k_len, nt, first_t = per.unbind(0)
    sid = torch.repeat_interleave(torch.arange(nseg, device=device), nt, output_size=total)
    t = (torch.arange(total, device=device) - first_t[sid]) * block_t
    off = (k_len - q_len)[sid] + t
    tiles = torch.stack((q_start[sid] + t, torch.clamp(q_len[sid] - t, max=block_t),
                         k_base[sid], off))
    order = torch.argsort(-off, stable=True)
    # own copies: row views at odd offsets would compile unaligned kernel variants
    return [x.clone() for x in tiles[:, order].to(torch.int32).unbind(0)]


def indexer_topk(qi: torch.Tensor, ki: torch.Tensor, seg: Segments, *, block_size: int,
                 topk: int, scale: float, block_t: int = None, num_warps: int = 4,
                 num_stages: int = 2) -> torch.Tensor:
    """Top-k rows ``[Hi, total_q, topk]`` int32 (same contract as the reference)."""
    total_q, hi, di = qi.shape
    check_supported(qi.dtype, di)
    qi = qi if qi.stride(-1) == 1 else qi.contiguous()
    ki = (ki if ki.stride(-1) == 1 else ki.contiguous())[:, 0] if ki.shape[1] == 1 else None
    if ki is None:
        raise NotImplementedError("the Triton indexer needs one shared index-key head")
    block_t = block_t or max(1, 128 // _next_pow2(hi))
    kr = _next_pow2(max(1, topk - 1))
    out = torch.full((hi, total_q, topk), -1, dtype=torch.int32, device=qi.device)
    tiles = _tiles(seg, block_t, qi.device)
    if topk == 1:
        out[..., 0] = seg.positions(qi.device) // block_size
    elif tiles[0].numel():
        indexer_topk_kernel[(tiles[0].numel(),)](
            qi, ki, *tiles, out, scale,
            qi.stride(0), qi.stride(1), ki.stride(0), out.stride(0), out.stride(1),
            HI=hi, DI=di, BS=block_size, BLOCK_T=block_t, KR=kr, NRANK=topk - 1,
            PRECISION="ieee" if qi.dtype == torch.float32 else "tf32",
            UPCAST=INTERPRETER and qi.dtype == torch.bfloat16,
            num_warps=num_warps, num_stages=num_stages)
    return out


def selected_lse(qi: torch.Tensor, ki: torch.Tensor, topk_idx: torch.Tensor, seg: Segments, *,
                 block_size: int, scale: float, temperature: float = 1.0,
                 query_chunk: int = 1 << 16) -> torch.Tensor:
    """``[Hi, total_q]`` fp32: ``log sum exp(scale * qi.ki / T)`` over the causally
    visible keys of the selected blocks (spec 2.6), by a KV-outer pass."""
    total_q, hi, _ = qi.shape
    ksel = topk_idx.shape[-1]
    rows = block_rows(seg, block_size, qi.device)
    out = torch.empty((hi, total_q), dtype=torch.float32, device=qi.device)
    pl = torch.empty(min(total_q, query_chunk) * hi * ksel, dtype=torch.float32,
                     device=qi.device)
    topk_idx = topk_idx.to(torch.int32).contiguous()
    for q0 in range(0, total_q, query_chunk):
        q1 = min(total_q, q0 + query_chunk)
        plan = plan_chunk(topk_idx, rows, q0, q1, hi, 256)
        pl.fill_(float("nan"))      # a valid slot left unwritten shows (16 MB at the MSA shape)
        launch_partials(qi, ki, None, rows, plan, q0, None, pl, scale=scale / temperature,
                        ksel=ksel, block_size=block_size, shared_k_head=ki.shape[1] == 1)
        t = topk_idx[:, q0:q1].long()
        valid = (t >= 0) & (t < rows.q_nblocks[q0:q1].view(1, -1, 1))
        part = pl[:(q1 - q0) * hi * ksel].view(q1 - q0, hi, ksel).transpose(0, 1)
        part = torch.where(valid, part, torch.full_like(part, float("-inf")))
        out[:, q0:q1] = torch.logsumexp(part, dim=-1)
    return out
