"""``plan_chunks`` in five Triton kernels and three sorts/scans (``planned_chunks``).

``msa.ops.plan.plan_by_torch`` builds the same plan from about 90 small torch ops, each
a launch and tens of microseconds of host time: on a GPU the planning of an API call is
paced by the host, not by its kernels (docs/benchmarks.md, "Planning"). Here the same
arithmetic runs as

1. ``keys_kernel``: the sort key of every (KV head, query, slot) entry (invalid entries
   sort last, as there);
2. ``torch.sort`` (stable: queries ascending within a KV block row);
3. ``edges_kernel``: each edge's query and slot, and where each key's run starts and ends;
4. ``split_kernel``: each key's edges and items (``ceil(edges / q_per_item)``), then one
   ``torch.cumsum`` over both;
5. ``items_kernel``: each item's key (a binary search of the items' running count),
   edge range and sort key (chunk, then largest first);
6. ``torch.argsort`` (stable), and ``gather_kernel``: the items' fields in that order.

The plan is bitwise the one of ``plan_by_torch`` (the same stable sorts of the same keys;
tests/ops/test_plan.py). Indices are int32: ``applies`` says whether they hold the plan.

``walk_totals`` is ``blocks_per_selected_block``'s sample (distinct and selected blocks
of every ``every``-th tile) in one kernel instead of a dozen torch ops.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .triton_utils import next_pow2

BLOCK = 1024
INT32_MAX = 2 ** 31 - 1


def _sizes(nq: int, kk: int, chunk: int, hkv: int, nrow: int, q_per_item: int):
    """``(nchunks, nkeys, entries, bound)`` of a planning group of ``nq`` queries: chunks,
    sort keys, (KV head, query, slot) entries and item slots (an upper bound of the items,
    ``sum ceil(edges / q) <= entries / q + keys``, as ``plan_by_torch`` sizes them)."""
    nchunks = -(-nq // chunk)
    nkeys, entries = nchunks * hkv * nrow, hkv * nq * kk
    return nchunks, nkeys, entries, nkeys + entries // q_per_item + 1


def applies(topk_indices: torch.Tensor, rows, q0: int, q1: int, chunk: int, hkv: int,
            q_per_item: int) -> bool:
    """Whether ``planned_chunks`` plans these arguments: some entries and keys, and int32
    keys, edge and item indices that hold them."""
    _, nkeys, entries, bound = _sizes(q1 - q0, topk_indices.shape[2], chunk, hkv,
                                      rows.total_rows, q_per_item)
    return 0 < entries < INT32_MAX and 0 < nkeys < INT32_MAX and bound < INT32_MAX


@triton.jit
def keys_kernel(TOPK, QNB, QRB, KEY, q0, nq, kk, stride_h, stride_q, stride_s, chunk, hkv,
                nrow, nkeys, entries, BLOCK: tl.constexpr):
    """Entry ``e`` of ``[hkv, nq, kk]``: ``((q // chunk) * hkv + h) * nrow + rowbase + L``
    for a valid block ``L`` of query ``q0 + q``, else ``nkeys``."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < entries
    h = e // (nq * kk)
    q = (e // kk) % nq
    s = e % kk
    t = tl.load(TOPK + h * stride_h + (q0 + q) * stride_q + s * stride_s, mask=m,
                other=-1).to(tl.int64)
    nb = tl.load(QNB + q0 + q, mask=m, other=0).to(tl.int64)
    rb = tl.load(QRB + q0 + q, mask=m, other=0).to(tl.int64)
    key = ((q // chunk) * hkv + h) * nrow + rb + t
    key = tl.where((t >= 0) & (t < nb), key, nkeys)
    tl.store(KEY + e, key.to(tl.int32), mask=m)


@triton.jit
def edges_kernel(SKEY, PERM, EDGE_Q, EDGE_SLOT, RUNS, nq, kk, chunk, nkeys, entries,
                 BLOCK: tl.constexpr):
    """Sorted entry ``i``: its query (relative to its chunk) and slot; where a key's run
    starts (``RUNS[k]``) and ends (``RUNS[nkeys + k]``, one past)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < entries
    p = tl.load(PERM + i, mask=m, other=0)
    tl.store(EDGE_Q + i, (((p // kk) % nq) % chunk).to(tl.int32), mask=m)
    tl.store(EDGE_SLOT + i, (p % kk).to(tl.int32), mask=m)
    k = tl.load(SKEY + i, mask=m, other=nkeys)
    before = tl.load(SKEY + i - 1, mask=m & (i > 0), other=-1)
    after = tl.load(SKEY + i + 1, mask=m & (i + 1 < entries), other=-1)
    real = m & (k < nkeys)
    tl.store(RUNS + k, i.to(tl.int32), mask=real & (k != before))
    tl.store(RUNS + nkeys + k, (i + 1).to(tl.int32), mask=real & (k != after))


@triton.jit
def split_kernel(RUNS, COUNTS, nkeys, q_per_item, BLOCK: tl.constexpr):
    """Key ``k``'s items ``COUNTS[k]`` and edges ``COUNTS[nkeys + k]``."""
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = k < nkeys
    n = tl.load(RUNS + nkeys + k, mask=m, other=0) - tl.load(RUNS + k, mask=m, other=0)
    tl.store(COUNTS + k, (n + q_per_item - 1) // q_per_item, mask=m)
    tl.store(COUNTS + nkeys + k, n, mask=m)


@triton.jit
def items_kernel(LAST, COUNTS, RUNS, IKEY, IE0, IE1, ORDER_KEY, nkeys, keys_per_chunk,
                 nchunks, q_per_item, bound, steps, BLOCK: tl.constexpr):
    """Item slot ``j``: the key whose items hold it (the first key whose running item
    count ``LAST`` exceeds ``j``, clamped to the last key: spare slots past the items),
    its edge range and its order key: chunk, then size descending (spare slots last)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < bound
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.zeros([BLOCK], dtype=tl.int64) + nkeys
    for _ in range(steps):
        open_ = m & (lo < hi)
        mid = (lo + hi) // 2
        right = tl.load(LAST + mid, mask=open_, other=0) <= j
        lo = tl.where(open_ & right, mid + 1, lo)
        hi = tl.where(open_ & ~right, mid, hi)
    real = lo < nkeys
    key = tl.minimum(lo, nkeys - 1)
    split = tl.load(COUNTS + key, mask=m, other=0)
    start = tl.load(RUNS + key, mask=m, other=0)
    end = tl.load(RUNS + nkeys + key, mask=m, other=0)
    within = j - (tl.load(LAST + key, mask=m, other=0) - split)
    e0 = start + within * q_per_item
    e1 = tl.minimum(e0 + q_per_item, end)
    order = tl.where(real, key // keys_per_chunk, nchunks) * (q_per_item + 1) + \
        q_per_item - tl.where(real, e1 - e0, 0)
    tl.store(IKEY + j, key.to(tl.int32), mask=m)
    tl.store(IE0 + j, e0.to(tl.int32), mask=m)
    tl.store(IE1 + j, e1.to(tl.int32), mask=m)
    tl.store(ORDER_KEY + j, order.to(tl.int32), mask=m)


@triton.jit
def gather_kernel(ORDER, IKEY, IE0, IE1, ROW_KROW, ROW_T0, ROW_NK, H, KROW, T0, NK, E0, E1,
                  nrow, hkv, bound, BLOCK: tl.constexpr):
    """Item ``j`` of the plan: slot ``ORDER[j]``'s head, block row fields and edges."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < bound
    o = tl.load(ORDER + j, mask=m, other=0)
    key = tl.load(IKEY + o, mask=m, other=0)
    row = key % nrow
    tl.store(H + j, ((key // nrow) % hkv).to(tl.int32), mask=m)
    tl.store(KROW + j, tl.load(ROW_KROW + row, mask=m, other=0), mask=m)
    tl.store(T0 + j, tl.load(ROW_T0 + row, mask=m, other=0), mask=m)
    tl.store(NK + j, tl.load(ROW_NK + row, mask=m, other=0), mask=m)
    tl.store(E0 + j, tl.load(IE0 + o, mask=m, other=0), mask=m)
    tl.store(E1 + j, tl.load(IE1 + o, mask=m, other=0), mask=m)


@triton.jit
def walk_kernel(TOPK, TOTALS, stride_h, stride_q, stride_s, qt, every, K: tl.constexpr,
                WP: tl.constexpr):
    """Sampled tile ``tile * every`` of head ``h`` (grid: sampled tiles, heads): its
    distinct valid ids and its valid ids, added to ``TOTALS[0]`` and ``TOTALS[1]``."""
    tile = tl.program_id(0).to(tl.int64) * every
    h = tl.program_id(1).to(tl.int64)
    e = tl.arange(0, WP)
    ok = e < qt * K
    x = tl.load(TOPK + h * stride_h + (tile * qt + e // K) * stride_q + (e % K) * stride_s,
                mask=ok, other=-1)
    x = tl.sort(x)
    new = (x >= 0) & ((e == 0) | (x != tl.gather(x, tl.maximum(e - 1, 0), 0)))
    tl.atomic_add(TOTALS, tl.sum(new.to(tl.int64), 0), sem="relaxed")
    tl.atomic_add(TOTALS + 1, tl.sum((x >= 0).to(tl.int64), 0), sem="relaxed")


def walk_totals(topk: torch.Tensor, qt: int, every: int) -> torch.Tensor:
    """``[2]`` int64: the distinct and the selected valid ids over the tiles ``0, every,
    2 * every, ...`` of ``qt`` consecutive rows of ``topk [Hs, T, K]`` (whole tiles only),
    queued without a host synchronisation (``msa.ops.plan.walk_totals``)."""
    hs, T, K = topk.shape
    tiles = -(-(T // qt) // every)
    totals = torch.zeros(2, dtype=torch.int64, device=topk.device)
    if tiles and hs and K:
        walk_kernel[(tiles, hs)](topk, totals, *topk.stride(), qt, every, K=K,
                                 WP=next_pow2(qt * K))
    return totals


def _grid(n: int) -> tuple:
    return (triton.cdiv(n, BLOCK),)


def planned_chunks(topk_indices: torch.Tensor, rows, q0: int, q1: int, chunk: int,
                   hkv: int, q_per_item: int) -> Tuple[list, torch.Tensor]:
    """``plan_chunks``' arrays for queries ``[q0, q1)`` (arguments as there; ``applies``
    holds), queued without a host synchronisation: ``(fields, ends)``, where ``fields``
    are ``edge_q, edge_slot`` [E] and the items' ``h, krow, t0, nk, e0, e1``
    (chunk-major, largest first, spare slots after) and ``ends [2, nchunks]`` the running
    item and edge counts at each chunk's end (``msa.ops.plan.QueuedChunks``)."""
    hs, _, kk = topk_indices.shape
    nq, nrow, dev = q1 - q0, rows.total_rows, topk_indices.device
    nchunks, nkeys, entries, bound = _sizes(nq, kk, chunk, hkv, nrow, q_per_item)
    key = torch.empty(entries, dtype=torch.int32, device=dev)
    keys_kernel[_grid(entries)](
        topk_indices, rows.q_nblocks, rows.q_rowbase, key, q0, nq, kk,
        topk_indices.stride(0) if hs > 1 else 0, topk_indices.stride(1),
        topk_indices.stride(2), chunk, hkv, nrow, nkeys, entries, BLOCK=BLOCK)
    skey, perm = torch.sort(key, stable=True)
    edge_q = torch.empty(entries, dtype=torch.int32, device=dev)
    edge_slot = torch.empty_like(edge_q)
    runs = torch.zeros(2 * nkeys, dtype=torch.int32, device=dev)
    edges_kernel[_grid(entries)](skey, perm, edge_q, edge_slot, runs, nq, kk, chunk, nkeys,
                                entries, BLOCK=BLOCK)
    counts = torch.empty(2 * nkeys, dtype=torch.int32, device=dev)
    split_kernel[_grid(nkeys)](runs, counts, nkeys, q_per_item, BLOCK=BLOCK)
    last = torch.cumsum(counts.view(2, nkeys), 1, dtype=torch.int32)
    slots = torch.empty(4, bound, dtype=torch.int32, device=dev)
    items_kernel[_grid(bound)](last, counts, runs, slots[0], slots[1], slots[2], slots[3],
                              nkeys, hkv * nrow, nchunks, q_per_item, bound,
                              nkeys.bit_length(), BLOCK=BLOCK)
    order = torch.argsort(slots[3], stable=True)
    h, t0, nk, e0, e1 = (torch.empty(bound, dtype=torch.int32, device=dev) for _ in range(5))
    krow = torch.empty(bound, dtype=rows.row_krow.dtype, device=dev)
    gather_kernel[_grid(bound)](order, slots[0], slots[1], slots[2], rows.row_krow,
                               rows.row_t0, rows.row_nk, h, krow, t0, nk, e0, e1, nrow, hkv,
                               bound, BLOCK=BLOCK)
    return [edge_q, edge_slot, h, krow, t0, nk, e0, e1], last[:, hkv * nrow - 1::hkv * nrow]
