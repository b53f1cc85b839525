"""Gluon FP8 index scan for Hopper (sm_90): warp-specialized ``indexer_topk_kernel``.

Same contract as the one-pass Triton FP8 scan (``scan_topk(fp8=True, kernel="one_pass")``:
e4m3 queries and keys, per-key scales, the ``topk - 1`` best earlier blocks per (query,
index head), then the local block, then -1), built the way Triton's own ``tl.*``
pipelining cannot build it (its automatic warp specialization rejects this loop,
docs/experiments.md): one loader warp brings each key block into a shared-memory ring
by TMA, two ranking warpgroups each own half of the tile's ``BLOCK_T x Hi`` rows, run one
asynchronous e4m3 wgmma per key block on the shared block and do the max-pool and the
top-k bookkeeping of the previous block while it runs.

Status: its rows equal the Triton scan's on a Hopper GPU
(``tests/ops/indexer/test_gluon.py``), but it is slower (548 vs 741-750 TFLOP/s at 1M
tokens on an H200, docs/fp8_index.md), so ``scan_topk`` runs it only when asked
(``kernel="gluon"``); ``python -m msa bench prefill --index-precision fp8`` times both.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                               warpgroup_mma, warpgroup_mma_wait)

from ..launch import on_hopper

STAGES = 3              # key blocks in flight (16 KB each)


@gluon.jit
def _load_keys(k_desc, k_ring, ready, empty, kbase, n_blocks, BS: gl.constexpr,
               STAGES: gl.constexpr):
    """Loader warp: key block ``blk`` (rows ``kbase + blk * BS``) into ring slot
    ``blk % STAGES`` once both rankers released it."""
    for blk in range(n_blocks):
        s = blk % STAGES
        mbarrier.wait(empty.index(s), ((blk // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kbase + blk * BS, 0], ready.index(s),
                                        k_ring.index(s))


@gluon.jit
def _keep(acc, ks, blk, live, local, vals, ids, scale):
    """Block ``blk``'s scores ``acc [M, BS]`` (e4m3 products) times the key scales ``ks``,
    max-pooled per row, enter each row's kept set when ``live`` and better than its
    worst."""
    book: gl.constexpr = vals.type.layout
    m = gl.convert_layout(gl.max(acc * gl.expand_dims(ks, 0), 1) * scale,
                          gl.SliceLayout(1, book))
    m = gl.where(m != m, -3.4028234663852886e38, m)         # NaN as -FLT_MAX
    m = gl.where(m == 0.0, 0.0, m)                          # -0 as +0
    worst = gl.min(vals, 1)
    wid = gl.max(gl.where(vals == gl.expand_dims(worst, 1), ids, -2147483647), 1)
    ins = live & (blk < local) & (m > worst)
    hit = gl.expand_dims(ins, 1) & (ids == gl.expand_dims(wid, 1))
    return gl.where(hit, gl.expand_dims(m, 1), vals), gl.where(hit, blk, ids)


@gluon.jit
def _rank_rows(q_smem, k_ring, ready, empty, KS, OUT_ID, q0, n, kbase, off, n_blocks, scale,
               stride_oh, stride_ot, row0, HI: gl.constexpr, M: gl.constexpr,
               BS: gl.constexpr, KR: gl.constexpr, NRANK: gl.constexpr,
               STAGES: gl.constexpr, BOOK: gl.constexpr, WARPS: gl.constexpr):
    """One warpgroup ranks rows ``row0 .. row0 + M`` of the tile (token ``row // HI``,
    index head ``row % HI``) as ``indexer_topk_kernel`` does: each key block scored by
    one asynchronous e4m3 wgmma that runs while the previous block is max-pooled and
    ranked; ``BOOK`` (``book_layout``) keeps each row of the kept set in the threads
    that hold that row of the wgmma result."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BS, 32])
    rows_l: gl.constexpr = gl.SliceLayout(1, BOOK)
    offs_m = row0 + gl.arange(0, M, layout=rows_l)
    tok = offs_m // HI
    h = offs_m % HI
    rmask = tok < n
    local = gl.where(rmask, (off + tok) // BS, 0)
    slots = gl.arange(0, KR, layout=gl.SliceLayout(0, BOOK))
    ids = gl.zeros([M, KR], gl.int32, BOOK) - 1 - gl.expand_dims(slots, 0)
    vals = gl.where(gl.expand_dims(slots, 0) < NRANK, float("-inf"), float("inf")) + \
        gl.zeros([M, KR], gl.float32, BOOK)
    offs_n = gl.arange(0, BS, layout=gl.SliceLayout(0, mma))
    zero = gl.zeros([M, BS], gl.float32, mma)
    prev = zero
    ks_prev = gl.zeros([BS], gl.float32, gl.SliceLayout(0, mma))
    for blk in range(n_blocks):
        s = blk % STAGES
        ks = gl.load(KS + kbase + blk * BS + offs_n)
        mbarrier.wait(ready.index(s), (blk // STAGES) & 1)
        cur = warpgroup_mma(q_smem, k_ring.index(s).permute((1, 0)), zero, use_acc=False,
                            is_async=True)
        vals, ids = _keep(prev, ks_prev, blk - 1, blk > 0, local, vals, ids, scale)
        cur = warpgroup_mma_wait(0, deps=[cur])
        mbarrier.arrive(empty.index(s), count=1)
        prev = cur
        ks_prev = ks
    vals, ids = _keep(prev, ks_prev, n_blocks - 1, n_blocks > 0, local, vals, ids, scale)
    valid = ids >= 0
    rank = gl.zeros([M, KR], gl.int32, BOOK)
    for i in range(KR):
        pick = gl.expand_dims(slots, 0) == i
        vi = gl.max(gl.where(pick, vals, float("-inf")), 1)
        ii = gl.max(gl.where(pick, ids, -2147483647), 1)
        first = (gl.expand_dims(vi, 1) > vals) | \
            ((gl.expand_dims(vi, 1) == vals) & (gl.expand_dims(ii, 1) < ids))
        rank += (gl.expand_dims(ii >= 0, 1) & first).to(gl.int32)
    orow = h.to(gl.int64) * stride_oh + (q0 + tok) * stride_ot
    gl.store(OUT_ID + gl.expand_dims(orow, 1) + rank, ids,
             mask=gl.expand_dims(rmask, 1) & valid)
    gl.store(OUT_ID + orow + gl.minimum(local, NRANK), local, mask=rmask)


@gluon.jit
def fp8_scan_kernel(QI, k_desc, KS, TILE_Q0, TILE_N, TILE_KBASE, TILE_OFF, OUT_ID, scale,
                    stride_oh, stride_ot, HI: gl.constexpr, DI: gl.constexpr,
                    BS: gl.constexpr, BLOCK_T: gl.constexpr, KR: gl.constexpr,
                    NRANK: gl.constexpr, STAGES: gl.constexpr, BOOK: gl.constexpr,
                    num_warps: gl.constexpr):
    """One program per tile of ``BLOCK_T`` queries x ``HI`` index heads (two halves of
    ``M`` rows, one per ranking warpgroup) over e4m3 ``QI [total_q * HI, DI]`` (row
    ``t * HI + h``) and keys ``k_desc`` (``[total_k, DI]`` e4m3, TMA) with key scales
    ``KS``."""
    M: gl.constexpr = BLOCK_T * HI // 2
    pid = gl.program_id(0)
    q0 = gl.load(TILE_Q0 + pid).to(gl.int64)
    n = gl.load(TILE_N + pid)
    kbase = gl.load(TILE_KBASE + pid)
    off = gl.load(TILE_OFF + pid)
    n_blocks = (off + n - 1) // BS
    q_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8,
                                                  rank=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [num_warps, 1], [1, 0])
    rows = gl.arange(0, M, layout=gl.SliceLayout(1, ld))
    cols = gl.expand_dims(gl.arange(0, DI, layout=gl.SliceLayout(0, ld)), 0)
    lo = gl.load(QI + (q0 * HI + gl.expand_dims(rows, 1)) * DI + cols,
                 mask=gl.expand_dims(rows < n * HI, 1), other=0.0)
    hi_rows = rows + M
    hi = gl.load(QI + (q0 * HI + gl.expand_dims(hi_rows, 1)) * DI + cols,
                 mask=gl.expand_dims(hi_rows < n * HI, 1), other=0.0)
    q_lo = gl.allocate_shared_memory(gl.float8e4nv, [M, DI], q_layout, lo)
    q_hi = gl.allocate_shared_memory(gl.float8e4nv, [M, DI], q_layout, hi)
    k_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BS, DI], k_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    fence_async_shared()
    gl.warp_specialize([
        (_rank_rows, (q_lo, k_ring, ready, empty, KS, OUT_ID, q0, n, kbase, off, n_blocks,
                      scale, stride_oh, stride_ot, 0, HI, M, BS, KR, NRANK, STAGES, BOOK,
                      num_warps)),
        (_rank_rows, (q_hi, k_ring, ready, empty, KS, OUT_ID, q0, n, kbase, off, n_blocks,
                      scale, stride_oh, stride_ot, M, HI, M, BS, KR, NRANK, STAGES, BOOK, 4)),
        (_load_keys, (k_desc, k_ring, ready, empty, kbase, n_blocks, BS, STAGES))],
        [4, 1], [232, 24])


def key_layout():
    """Shared-memory layout of a ``[128, 128]`` e4m3 key block (TMA and wgmma)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)


def book_layout(kr: int):
    """Layout of a ranking warpgroup's kept set ``[64, kr]``: row ``r`` in the four
    threads (a lane quad) that hold row ``r`` of the ``m64`` wgmma result (lanes -> rows
    1, 2, 4; one register bit -> row 8; warps -> rows 16, 32), its ``kr`` slots split
    over the quad and registers, so that the per-row block maxima need no shuffle."""
    cols = [1 << i for i in range(kr.bit_length() - 1)]
    quad = (cols[-2:] + [0, 0])[:2]
    return gl.DistributedLinearLayout(
        reg_bases=[[0, c] for c in cols[:-2]] + [[8, 0]],
        lane_bases=[[0, c] for c in quad] + [[1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, kr])


def supported(device, hi: int, di: int, block_size: int) -> bool:
    """Whether the Gluon scan runs this shape on ``device``: a Hopper GPU (sm_90), ``hi``
    a power of two up to 16 (tiles of ``128 / hi`` queries), ``di = 128``, blocks of
    128."""
    return on_hopper(device) and hi in (1, 2, 4, 8, 16) and di == 128 and block_size == 128


def launch_fp8_scan(q8, k8, ks, tiles, out, *, scale: float, block_size: int, block_t: int,
                    kr: int, topk: int) -> None:
    """``fp8_scan_kernel`` over ``tiles`` (``msa.ops.geometry.query_tiles`` of ``block_t``
    queries): ``q8 [total_q, Hi, Di]`` and ``k8 [total_k, Di]`` e4m3 contiguous, ``ks
    [total_k]`` fp32, ``out [Hi, total_q, topk]`` int32 pre-filled with -1; ``kr`` kept
    slots per row (a power of two >= ``topk - 1``)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    hi, di = q8.shape[1], q8.shape[2]
    desc = TensorDescriptor.from_tensor(k8, [block_size, di], key_layout())
    fp8_scan_kernel[(tiles[0].numel(),)](
        q8, desc, ks, *tiles, out, scale, out.stride(0), out.stride(1), HI=hi, DI=di,
        BS=block_size, BLOCK_T=block_t, KR=kr, NRANK=topk - 1, STAGES=STAGES,
        BOOK=book_layout(kr), num_warps=4)
