"""Triton query-outer sparse attention forward over each tile's union of selected blocks.

A *tile* is up to ``QT`` consecutive queries of one segment x the ``G`` query heads of
one KV head: ``QT * G`` MMA rows, 64 at most groups (``tile_queries``: 4 / 8 / 10 / 16
queries at G = 16 / 8 / 6 / 4). ``union_plan_kernel`` (one program per tile and
selection head) sorts the distinct blocks the tile's queries selected, the tile's
*union* (at most ``QT * K`` blocks), and gives each query a bit mask over the union's
positions (64 a word). ``union_fwd_kernel`` walks the union ``BN`` keys at a time with
an online softmax, masking per row the blocks its query did not select and the keys
after it, and writes the final output and LSE: no gathered rows, no partial outputs,
no combine. Key rows come from the plan's ``BlockRows``, so cached pages are read in
place as well (bf16 / fp16 pages, ``paged_attention_in_place``); contiguous keys may
come by TMA instead (``union_fwd(..., tma=True)``: whole blocks in 2 stages).

Each block of the union costs the whole tile, so the kernel gains where consecutive
queries share their selections (local blocks, sinks, slowly drifting topics) and loses
where they do not (random selections: up to ``QT`` times the work). On Hopper the
forward runs the Gluon form (``msa.ops.attention.gluon_union``) wherever a sample of
the tiles walks at most ``MAX_WALK`` blocks per selected block and its boxes stay in
their segments (``prefers_union``);
elsewhere it runs where chosen: ``MSA_FORWARD_KERNEL=union`` in the environment or
``kernel="union"`` (``msa.ops.attention.forward``); measured in docs/benchmarks.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch import launch_fitting
from ..geometry import query_tiles
from ..plan import (GLUON_TILE_ROWS, TILE_ROWS, SparsePlan, tile_queries, walk_ratio,
                    walk_totals)
from ..triton_utils import LN2, LOG2E, next_pow2, online_softmax_step, precision, upcast

NO_BLOCK = tl.constexpr(2 ** 31 - 1)    # sort key of an invalid entry (after every real one)


@dataclass
class UnionPlan:
    """The unions of one selection's tiles (on the device; ``Hs``: selection heads).

    qt: queries per tile; tile_q0, tile_n, tile_kbase, tile_off ``[tiles]`` int32: first
    packed query, queries, packed row of the segment's key 0, position of the first query
    (``msa.ops.geometry.query_tiles``, tiles inside one segment, latest first); tile_rowbase
    ``[tiles]`` int64: the segment's first block row in ``BlockRows`` (over pages, block
    ``b``'s keys start at ``row_krow[rowbase + b]``);
    blocks ``[Hs, tiles, qt * K]`` int32: the union, ascending (entries past
    ``count`` unset); count ``[Hs, tiles]`` int32; bits ``[Hs, tiles, qt, NW]`` int64: bit
    ``u % 64`` of word ``u // 64`` set iff the query selected the union's block ``u``;
    halves ``[Hs, tiles, 2, NW]`` int64: the same iff a query with a row among the tile's
    MMA rows ``0 .. 63`` (``64 .. 127``) selected it (row ``query * G + head``; for tiles
    of at most 128 rows).
    """

    qt: int
    tile_q0: torch.Tensor
    tile_n: torch.Tensor
    tile_kbase: torch.Tensor
    tile_off: torch.Tensor
    tile_rowbase: torch.Tensor
    blocks: torch.Tensor
    count: torch.Tensor
    bits: torch.Tensor
    halves: torch.Tensor

    @property
    def num_tiles(self) -> int:
        return self.tile_q0.numel()


@triton.jit(do_not_specialize=["num_tiles"])
def union_plan_kernel(TOPK, TQ0, TN, TOFF, U, NU, BITS, HALVES, num_tiles, stride_th,
                      stride_tq, QT: tl.constexpr, K: tl.constexpr, W: tl.constexpr,
                      WP: tl.constexpr, NW: tl.constexpr, BS: tl.constexpr,
                      G: tl.constexpr):
    """One tile's union (grid: tiles, Hs; ``WP``: the next power of two of ``W = QT *
    K``). An entry counts when valid and not wholly after its query
    (``0 <= id`` and ``id * BS <= pos``; ids are checked against the segment upstream)."""
    tile = tl.program_id(0)
    hs = tl.program_id(1)
    q0 = tl.load(TQ0 + tile)
    n = tl.load(TN + tile)
    off = tl.load(TOFF + tile)
    e = tl.arange(0, WP)
    i = e // K
    ok = (e < W) & (i < n)
    x = tl.load(TOPK + hs * stride_th + (q0 + i).to(tl.int64) * stride_tq + e % K, mask=ok,
                other=-1)
    ok &= (x >= 0) & (x * BS <= off + i)
    # sort (block, query) pairs (block * 64 + query < 2^31 for blocks < 2^25): equal
    # blocks adjacent; a block's first copy opens a place
    srt = tl.sort(tl.where(ok, x * 64 + i, NO_BLOCK))
    blk = srt >> 6
    live = srt != NO_BLOCK
    first = live & ((e == 0) | (blk != tl.gather(blk, tl.maximum(e - 1, 0), 0)))
    place = tl.cumsum(first.to(tl.int32), 0) - 1
    row = hs * num_tiles + tile
    tl.store(U + row.to(tl.int64) * W + place, blk, mask=first)
    tl.store(NU + row, tl.sum(first.to(tl.int32), 0))
    # each live pair sets its query's bit of its block's place (pairs are distinct, the
    # words zeroed by the caller)
    owner = srt & 63
    bit = tl.full([WP], 1, tl.int64) << (place % 64).to(tl.int64)
    tl.atomic_or(BITS + (row * QT + owner).to(tl.int64) * NW + place // 64, bit, mask=live,
                 sem="relaxed")
    # the halves of the query's rows (a query may straddle the two)
    lo = tl.minimum(owner * G // 64, 1)
    hi = tl.minimum((owner * G + G - 1) // 64, 1)
    tl.atomic_or(HALVES + (row * 2 + lo).to(tl.int64) * NW + place // 64, bit, mask=live,
                 sem="relaxed")
    tl.atomic_or(HALVES + (row * 2 + hi).to(tl.int64) * NW + place // 64, bit,
                 mask=live & (hi != lo), sem="relaxed")


def build_union_plan(topk_indices: torch.Tensor, plan: SparsePlan, qt: int,
                     group: int) -> UnionPlan:
    """The ``UnionPlan`` of ``topk_indices [Hs, total_q, K]`` (int32 contiguous, as
    ``plan.indices`` gives it) over ``plan``'s segments, ``qt`` queries per tile of
    ``group`` heads each."""
    hs, _, topk = topk_indices.shape
    q0, n, kbase, off = query_tiles(plan.seg, qt, topk_indices.device)
    tiles, w = q0.numel(), qt * topk
    nw = -(-w // 64)
    dev = topk_indices.device
    blocks = torch.empty((hs, tiles, w), dtype=torch.int32, device=dev)
    count = torch.empty((hs, tiles), dtype=torch.int32, device=dev)
    bits = torch.zeros((hs, tiles, qt, nw), dtype=torch.int64, device=dev)
    halves = torch.zeros((hs, tiles, 2, nw), dtype=torch.int64, device=dev)
    if tiles:
        union_plan_kernel[(tiles, hs)](
            topk_indices, q0, n, off, blocks, count, bits, halves, tiles,
            topk_indices.stride(0), topk_indices.stride(1), QT=qt, K=topk, W=w,
            WP=next_pow2(w), NW=nw, BS=plan.block_size, G=group,
            num_warps=4 if w <= 256 else 8)
    rowbase = plan.rows.q_rowbase[q0.long()].contiguous()
    return UnionPlan(qt, q0, n, kbase, off, rowbase, blocks, count, bits, halves)


def union_plan(topk_indices: torch.Tensor, plan: SparsePlan, qt: int,
               group: int) -> UnionPlan:
    """``plan``'s union plan for tiles of ``qt`` queries of ``group`` heads, built once
    per plan."""
    return plan.derived(("union", qt, group),
                        lambda: build_union_plan(topk_indices, plan, qt, group))


def gluon_union_plan(topk_indices: torch.Tensor, plan: SparsePlan, group: int) -> UnionPlan:
    """``union_plan`` for the Gluon union kernel's tiles (``GLUON_TILE_ROWS`` rows)."""
    return union_plan(topk_indices, plan,
                      tile_queries(group, topk_indices.shape[2], GLUON_TILE_ROWS), group)


@triton.jit(do_not_specialize=["num_tiles"])
def union_fwd_kernel(
        Q, K, V, U, NU, BITS, TQ0, TN, TKBASE, TOFF, TROWBASE, ROW_KROW, OUT, LSE,
        num_tiles, scale_log2,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ot, stride_oh, stride_lt,
        HS: tl.constexpr, G: tl.constexpr, QT: tl.constexpr, ROWS: tl.constexpr,
        D: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, W: tl.constexpr,
        NW: tl.constexpr, KEYS: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr):
    """One tile x one KV head (grid: tiles, Hkv): rows ``r = query * G + head``. ``KEYS``:
    ``"rows"``, key rows ``kbase + position`` loaded by pointers (masked past the tile's
    last query); ``"pages"``, rows ``ROW_KROW[rowbase + block] + offset`` (one more
    dependent load per step); ``"tma"``, ``K, V`` are tensor descriptors over ``[total_k,
    Hkv * D]`` rows of ``BN`` keys (TMA on Hopper: rows past the tile's last query are
    loaded, their probabilities 0; an inf or NaN there, in another sequence's values,
    would reach this tile's output)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    urow = (h if HS > 1 else 0) * num_tiles + tile
    q0 = tl.load(TQ0 + tile)
    n = tl.load(TN + tile)
    kbase = tl.load(TKBASE + tile).to(tl.int64)
    krows = ROW_KROW + tl.load(TROWBASE + tile)
    off = tl.load(TOFF + tile)
    r = tl.arange(0, ROWS)
    i = r // G
    head = h * G + r % G
    rv = (r < QT * G) & (i < n)
    qrow = (q0 + i).to(tl.int64)
    pos = off + i
    d = tl.arange(0, D)
    qt = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                 mask=rv[:, None], other=0.0)
    bits = BITS + (urow * QT + i).to(tl.int64) * NW
    ublocks = U + urow.to(tl.int64) * W
    last = off + n - 1
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    j = tl.arange(0, BN)
    NH: tl.constexpr = BS // BN
    for uu in range(0, tl.load(NU + urow) * NH):
        u = uu // NH
        blk = tl.load(ublocks + u)
        kpos = blk * BS + (uu % NH) * BN + j
        kmask = kpos <= last                    # inside the segment, at most the last query
        if KEYS == "tma":
            at = (kbase + blk * BS + (uu % NH) * BN).to(tl.int32)
            kt = K.load([at, h * D])
            vt = V.load([at, h * D])
        else:
            if KEYS == "pages":
                rows = tl.load(krows + blk) + (uu % NH) * BN + j
            else:
                rows = kbase + kpos
            kt = tl.load(K + rows[:, None] * stride_kt + h * stride_kh + d[None, :],
                         mask=kmask[:, None], other=0.0)
            vt = tl.load(V + rows[:, None] * stride_vt + h * stride_vh + d[None, :],
                         mask=kmask[:, None], other=0.0)
        word = tl.load(bits + u // 64, mask=rv, other=0)
        sel = ((word >> (u % 64).to(tl.int64)) & 1) != 0
        allowed = sel[:, None] & (kpos[None, :] <= pos[:, None])
        m_i, l_i, acc = online_softmax_step(qt, kt, vt, allowed, m_i, l_i, acc, scale_log2,
                                            PRECISION, UPCAST, True)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(OUT + qrow[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=rv[:, None])
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * LN2, float("-inf"))
    tl.store(LSE + qrow * stride_lt + head, lse, mask=rv)


def union_configs(rows: int, d: int, block_size: int, itemsize: int, tma: bool = False):
    """Launch configurations for tiles of ``rows`` MMA rows, preferred first: whole
    blocks unpipelined (the fastest measured at D = 128, docs/benchmarks.md), then half
    and quarter blocks (for smaller shared memory: head dim 256 or fp32); by TMA (one
    block size, the descriptors'), whole blocks in 2 stages, then 1. A warp per 16
    rows, twice that for head dim 256 or fp32 (the accumulator's registers)."""
    warps = max(4, rows // 16) * (2 if d > 128 or itemsize > 2 else 1)
    if tma:
        return [dict(BN=block_size, num_stages=s, num_warps=warps) for s in (2, 1)]
    return [dict(BN=bn, num_stages=1, num_warps=warps)
            for bn in (block_size, block_size // 2, block_size // 4) if bn >= 16]


def _key_rows(x: torch.Tensor, block_n: int):
    """A TMA descriptor over ``x [total_k, Hkv, D]`` as ``[total_k, Hkv * D]`` rows, boxes
    of ``block_n`` keys x ``D``; ``None`` where TMA cannot read it (heads not adjacent,
    rows not 16-byte aligned)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    t, h, d = x.shape
    if x.stride(2) != 1 or x.stride(1) != d or (x.stride(0) * x.element_size()) % 16 or \
            x.data_ptr() % 16 or t == 0:
        return None
    return TensorDescriptor(x, [t, h * d], [x.stride(0), 1], [block_n, d])


def union_fwd(q, k, v, topk_indices, plan: SparsePlan, out, lse, *, scale: float,
              tile_rows: int = None, tma: bool = False, gluon: bool = None) -> None:
    """Write ``out [total_q, Hq, D]`` and ``lse [total_q, Hq]`` (fp32) from ``q [total_q,
    Hq, D]``, ``k, v [total_k, Hkv, D]`` and ``topk_indices [Hs, total_q, K]`` (int32
    contiguous) over ``plan``'s segments (its union plan is built on first use).

    ``gluon``: the warp-specialized Gluon kernel (``msa.ops.attention.gluon_union``:
    Hopper, bf16 / fp16, head dim 128, blocks of 128, contiguous keys, else
    ``ValueError``; tiles of 128 rows, keys by TMA); default: where it applies and
    neither ``tile_rows`` nor ``tma`` is given. Otherwise the Triton kernel with tiles
    of ``tile_rows`` MMA rows (a power of two, at least 16; default ``TILE_ROWS``) and,
    with ``tma``, keys and values by TMA descriptors (``union_fwd_kernel``'s
    ``KEYS="tma"``; contiguous keys only, else ``ValueError``)."""
    if tile_rows is not None and (isinstance(tile_rows, bool) or not isinstance(tile_rows, int)
                                  or tile_rows < 16 or tile_rows & (tile_rows - 1)):
        raise ValueError(f"tile_rows must be a power of two >= 16, got {tile_rows!r}")
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    if gluon is None:
        gluon = tile_rows is None and not tma and gluon_applies(q, k, v, plan)
    elif gluon:
        _check_gluon(q, k, v, plan, tile_rows, tma)
    if gluon:
        return _gluon_fwd(q, k, v, topk_indices, plan, out, lse, scale)
    tile_rows = TILE_ROWS if tile_rows is None else tile_rows
    up = union_plan(topk_indices, plan, tile_queries(g, topk_indices.shape[2], tile_rows), g)
    rows = max(16, next_pow2(up.qt * g))
    if not up.num_tiles:
        return
    keys, kk, vv = ("pages" if plan.rows.paged else "rows"), k, v
    if tma:
        if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
            raise ValueError("tma=True needs a GPU with TMA (Hopper, sm_90, or newer)")
        kk, vv = (None if plan.rows.paged else _key_rows(x, plan.block_size) for x in (k, v))
        if kk is None or vv is None:
            raise ValueError("tma=True reads contiguous (not paged) k, v [total_k, Hkv, D] "
                             "whose heads are adjacent and rows 16-byte aligned")
        keys = "tma"
    w, nw = up.blocks.shape[2], up.bits.shape[3]
    launch_fitting(
        union_fwd_kernel, (up.num_tiles, hkv),
        (q, kk, vv, up.blocks, up.count, up.bits, up.tile_q0, up.tile_n, up.tile_kbase,
         up.tile_off, up.tile_rowbase, plan.rows.row_krow, out, lse, up.num_tiles,
         scale * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
         v.stride(1), out.stride(0), out.stride(1), lse.stride(0)),
        union_configs(rows, d, plan.block_size, q.dtype.itemsize, tma),
        HS=topk_indices.shape[0], G=g, QT=up.qt, ROWS=rows, D=d, KEYS=keys,
        BS=plan.block_size, W=w, NW=nw, PRECISION=precision(q.dtype),
        UPCAST=upcast(q.dtype))


def gluon_applies(q, k, v, plan: SparsePlan) -> bool:
    """Whether the Gluon union kernel runs these inputs over ``plan``'s segments
    (``applies``)."""
    return applies(q, k, v, plan.seg, plan.block_size, plan.rows.paged)


def applies(q, k, v, seg, block_size: int, paged: bool = False) -> bool:
    """Whether the Gluon union kernel runs these inputs (``gluon_union.supported``) and
    its boxes of whole blocks read only their own segment's keys
    (``boxes_stay_in_segments``)."""
    try:
        from . import gluon_union
    except ImportError:                 # a Triton without Gluon
        return False
    return gluon_union.supported(q, k, v, block_size, paged) and \
        boxes_stay_in_segments(seg, block_size, k.shape[0])


def boxes_stay_in_segments(seg, block_size: int, rows: int) -> bool:
    """Whether loading whole blocks of ``block_size`` key rows (TMA boxes) never reads
    another segment's keys out of ``rows`` packed key rows: every segment's keys end on
    a whole block or at the last row (TMA fills rows past the tensor with zeros). Else a
    segment's last, partial block would bring the next segment's first rows, whose
    probabilities are 0 but whose values, were they inf or NaN, would reach this output."""
    return all(n % block_size == 0 or base + n >= rows for base, n in zip(seg.k_base, seg.k_len))


# the Gluon union forward beats the Gluon KV-outer one where a tile of 128 rows walks at
# most this many blocks per block its queries selected (docs/benchmarks.md)
MAX_WALK = 2.0
WALK_SAMPLE = 8         # the walk is estimated on every WALK_SAMPLE-th tile


def prefers_union(q, k, v, topk_indices, plan: SparsePlan) -> bool:
    """Whether the union forward runs these inputs faster than the KV-outer one: the Gluon
    union kernel applies and the selection is ``shared_enough`` over ``plan``'s segments
    (decided once per plan and group)."""
    if not gluon_applies(q, k, v, plan):
        return False
    g = q.shape[1] // k.shape[1]
    return plan.derived(("union_shared", g), lambda: shared_enough(
        topk_indices, g, plan.seg.q_len, plan))


def suits(q, k, v, topk_indices, seg, block_size: int) -> bool:
    """``prefers_union`` without a plan: ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv,
    D]``, ``topk_indices [Hs, total_q, K]`` over segments ``seg`` (``msa.attention_kernel``)."""
    return applies(q, k, v, seg, block_size) and \
        shared_enough(topk_indices, q.shape[1] // k.shape[1], seg.q_len)


def shared_enough(topk_indices: torch.Tensor, group: int, q_lens=None,
                  plan: Optional[SparsePlan] = None) -> bool:
    """Whether the Gluon union kernel's tiles (128 rows of ``group`` heads) of
    ``topk_indices [Hs, total_q, K]`` walk at most ``MAX_WALK`` blocks per selected block,
    estimated on every ``WALK_SAMPLE``-th tile and divided by the tiles' fill over
    segments of ``q_lens`` queries (tiles stay in their segment: a segment of fewer
    queries than a tile leaves rows idle); default one segment. The sample's counts
    reach the host in one host synchronisation, ``plan``'s (``SparsePlan.read``: with its
    queued planning kernels' counts) where given."""
    qt = tile_queries(group, topk_indices.shape[2], GLUON_TILE_ROWS)
    total = topk_indices.shape[1]
    q_lens = [total] if q_lens is None else q_lens
    tiles = sum(-(-n // qt) for n in q_lens)
    fill = total / max(1, tiles * qt)
    if fill * MAX_WALK < 1:                   # even tiles sharing everything would lose
        return False
    def sample():
        return walk_totals(topk_indices, qt, WALK_SAMPLE)
    totals = sample().tolist() if plan is None else plan.read(("walk", qt, WALK_SAMPLE), sample)
    return walk_ratio(totals, qt) <= MAX_WALK * fill


def _check_gluon(q, k, v, plan: SparsePlan, tile_rows, tma) -> None:
    """``ValueError`` unless ``union_fwd(..., gluon=True)`` can run these inputs."""
    if tile_rows is not None or tma:
        raise ValueError("gluon=True takes its own tiles (128 rows) and TMA keys: leave "
                         f"tile_rows and tma unset, got {tile_rows=}, {tma=}")
    if not gluon_applies(q, k, v, plan):
        raise ValueError("gluon=True needs a Hopper GPU (sm_90), bf16 / fp16, head dim 128, "
                         "blocks of 128, contiguous (not paged) k, v [total_k, Hkv, D] "
                         "whose heads are adjacent and rows 16-byte aligned, and segments "
                         "whose keys end on a whole block or at the last row of k")


def _gluon_fwd(q, k, v, topk_indices, plan: SparsePlan, out, lse, scale: float) -> None:
    """``union_fwd`` by the Gluon kernel (inputs it applies to)."""
    from . import gluon_union
    g = q.shape[1] // k.shape[1]
    up = gluon_union_plan(topk_indices, plan, g)
    if up.num_tiles:
        gluon_union.launch(q, k, v, up, out, lse, scale_log2=scale * LOG2E,
                           block_size=plan.block_size, heads_sel=topk_indices.shape[0])
