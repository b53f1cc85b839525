"""k->q planning for the KV-outer kernels: who selected which KV block (spec section 4).

For a chunk of queries ``[q0, q1)`` and top-k ``[Hs, total_q, K]`` it builds, on the
device:

* the *edge list* (CSR): one edge per valid (KV head ``h``, query ``q``, slot ``j``),
  sorted by (``h``, KV block row, ``q``): ``edge_q [E]`` (query index relative to ``q0``)
  and ``edge_slot [E]``;
* the *work list*: each non-empty (``h``, block row) cut into items of at most
  ``q_per_item`` edges, largest first: ``item_h, item_krow`` (packed row of the block's
  first key), ``item_t0`` (key offset of that row in its segment), ``item_nk`` (keys
  present, < block on a partial tail), ``item_e0, item_e1`` (edge range).

A KV block row is (segment ``b``, level ``L``), numbered segment-major. An entry is valid
iff ``0 <= L < ceil(k_len_b / block)``; selected blocks after the query are kept here and
masked causally in the kernel. One host synchronisation (the item count per chunk) sizes
the work lists; ``plan_chunks`` plans many query chunks with one sort.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from ..varlen import Segments, host_to_device, query_positions


@dataclass
class BlockRows:
    """Per-query and per-row geometry of a segment layout, on the device.

    q_pos, q_nblocks, q_rowbase, q_kbase: ``[total_q]`` int32/int64 position, blocks in
    the query's segment, first global block row of its segment, packed row of its key 0.
    row_krow, row_t0, row_nk: ``[total_rows]`` packed first key row, key offset, keys.
    """

    q_pos: torch.Tensor
    q_nblocks: torch.Tensor
    q_rowbase: torch.Tensor
    q_kbase: torch.Tensor
    row_krow: torch.Tensor
    row_t0: torch.Tensor
    row_nk: torch.Tensor
    total_rows: int


def block_rows(seg: Segments, block_size: int, device) -> BlockRows:
    """Built on ``device`` from the per-segment numbers (one pinned copy, no host sync)."""
    nseg = seg.num_segments
    nb = [seg.num_blocks(b, block_size) for b in range(nseg)]
    rowbase = [0]
    for n in nb:
        rowbase.append(rowbase[-1] + n)
    nrows = rowbase[-1]
    per = host_to_device([nb, rowbase[:-1], seg.q_start, seg.q_len, seg.k_base, seg.k_len],
                         device) if nseg else torch.zeros((6, 0), dtype=torch.int64,
                                                          device=device)
    nb_t, rb_t, qs_t, ql_t, kb_t, kl_t = per.unbind(0)
    ids = torch.arange(nseg, device=device)
    q_seg = torch.repeat_interleave(ids, ql_t, output_size=seg.total_q)
    q_pos = query_positions(q_seg, qs_t, ql_t, kl_t)
    row_seg = torch.repeat_interleave(ids, nb_t, output_size=nrows)
    t0 = (torch.arange(nrows, device=device) - rb_t[row_seg]) * block_size
    krow = kb_t[row_seg] + t0
    nk = torch.clamp(kl_t[row_seg] - t0, max=block_size)
    return BlockRows(q_pos.to(torch.int32), nb_t[q_seg], rb_t[q_seg], kb_t[q_seg], krow,
                     t0.to(torch.int32), nk.to(torch.int32), nrows)


# kernel parameters that receive a plan's item arrays (slices of one allocation: their
# kernels must not specialise on pointer alignment, see ``plan_chunks``)
ITEM_FIELDS = ("ITEM_H", "ITEM_KROW", "ITEM_T0", "ITEM_NK", "ITEM_E0", "ITEM_E1")


@dataclass
class Plan:
    edge_q: torch.Tensor
    edge_slot: torch.Tensor
    item_h: torch.Tensor
    item_krow: torch.Tensor
    item_t0: torch.Tensor
    item_nk: torch.Tensor
    item_e0: torch.Tensor
    item_e1: torch.Tensor

    num_heads: int = 1

    @property
    def num_items(self) -> int:
        return self.item_h.numel()


def plan_chunks(topk: torch.Tensor, rows: BlockRows, q0: int, q1: int, chunk: int,
                hkv: int, q_per_item: int) -> List[Tuple[int, int, Plan]]:
    """Plans of the query chunks ``[c, c + chunk)`` covering ``[q0, q1)``, built at once.

    topk: ``[Hs, total_q, K]`` (Hs 1 or ``hkv``). Returns ``(c0, c1, plan)`` per chunk; edge
    query indices are relative to the chunk start ``c0``. One sort and one host
    synchronisation serve all chunks.
    """
    t = topk[:, q0:q1].long()
    hs, nq, kk = t.shape
    nrow = rows.total_rows
    valid = (t >= 0) & (t < rows.q_nblocks[q0:q1].view(1, -1, 1))
    q_rel = torch.arange(nq, device=t.device)
    cid = (q_rel // chunk).view(1, -1, 1)
    heads = torch.arange(hkv, device=t.device).view(-1, 1, 1)
    nkeys = -(-nq // chunk) * hkv * nrow
    if nkeys == 0:                                          # no queries (or no key rows)
        return []
    key = (cid * hkv + heads) * nrow + rows.q_rowbase[q0:q1].view(1, -1, 1) + t
    key = torch.where(valid, key, torch.full_like(key, nkeys)).expand(hkv, nq, kk)
    if nkeys < 2 ** 31 - 1:
        key = key.to(torch.int32)                           # 4-byte radix sort
    skey, perm = torch.sort(key.reshape(-1), stable=True)   # q ascending within a row
    # invalid entries (key nkeys) sort last; no item's edge range reaches them
    q_of_edge = (perm // kk) % nq
    edge_q = (q_of_edge % chunk).to(torch.int32)
    edge_slot = (perm % kk).to(torch.int32)
    # keys are sorted: row boundaries by binary search (a histogram of sorted keys
    # serialises on its atomics: 0.9 of the 2.3 ms of planning at 128K on an H100)
    bounds = torch.searchsorted(skey, torch.arange(nkeys + 1, device=t.device,
                                                   dtype=skey.dtype))
    starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    nsplit = (counts + q_per_item - 1) // q_per_item
    per_chunk = nsplit.view(-1, hkv * nrow).sum(1)
    # items are built for an upper bound of their count (sum ceil(c / q) <= E / q + keys),
    # so that the only host sync comes after every planning kernel is queued
    bound = nkeys + key.numel() // q_per_item + 1
    last = torch.cumsum(nsplit, 0)                            # one past each key's items
    idx = torch.arange(bound, device=t.device)
    item_key = torch.searchsorted(last, idx, right=True)      # nkeys: past the last item
    real = item_key < nkeys
    item_key = torch.clamp(item_key, max=nkeys - 1)
    within = idx - (last - nsplit)[item_key]
    e0 = starts[item_key] + within * q_per_item
    e1 = torch.minimum(e0 + q_per_item, starts[item_key] + counts[item_key])
    # chunk-major, largest items first inside a chunk, the spare entries after all
    item_chunk = torch.where(real, item_key // (hkv * nrow), -(-nq // chunk))
    size = torch.where(real, e1 - e0, 0)
    order = torch.argsort(item_chunk * (q_per_item + 1) + (q_per_item - size), stable=True)
    item_key, e0, e1 = item_key[order], e0[order], e1[order]
    row = item_key % nrow
    head = ((item_key // nrow) % hkv).to(torch.int32)
    krow, t0, nk = rows.row_krow[row], rows.row_t0[row], rows.row_nk[row]
    e0, e1 = e0.to(torch.int32), e1.to(torch.int32)
    per_chunk_host = per_chunk.tolist()                       # the one host sync
    plans, i0 = [], 0
    for c, n in enumerate(per_chunk_host):
        # views: the kernels read item fields as scalars and do not specialise their
        # pointers on alignment, so slices at odd offsets compile no new variants
        item = [x[i0:i0 + n] for x in (head, krow, t0, nk, e0, e1)]
        c0 = q0 + c * chunk
        plans.append((c0, min(q1, c0 + chunk), Plan(edge_q, edge_slot, *item, hkv)))
        i0 += n
    return plans


def plan_chunk(topk: torch.Tensor, rows: BlockRows, q0: int, q1: int, hkv: int,
               q_per_item: int) -> Plan:
    """Edges and work items of queries ``[q0, q1)`` as one chunk (see ``plan_chunks``)."""
    return plan_chunks(topk, rows, q0, q1, max(1, q1 - q0), hkv, q_per_item)[0][2]
