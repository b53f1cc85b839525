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
masked causally in the kernel. Two host synchronisations (edge and item counts) size
the outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..varlen import Segments


@dataclass
class BlockRows:
    """Per-query and per-row geometry of a segment layout, on the device.

    q_pos, q_nblocks, q_rowbase: ``[total_q]`` int32/int64 position, blocks in the
    query's segment, first global block row of its segment.
    row_krow, row_t0, row_nk: ``[total_rows]`` packed first key row, key offset, keys.
    """

    q_pos: torch.Tensor
    q_nblocks: torch.Tensor
    q_rowbase: torch.Tensor
    row_krow: torch.Tensor
    row_t0: torch.Tensor
    row_nk: torch.Tensor
    total_rows: int


def block_rows(seg: Segments, block_size: int, device) -> BlockRows:
    nb = [seg.num_blocks(b, block_size) for b in range(seg.num_segments)]
    rowbase = [0]
    for n in nb:
        rowbase.append(rowbase[-1] + n)
    q_len = torch.tensor(seg.q_len, dtype=torch.int64)
    q_nb = torch.repeat_interleave(torch.tensor(nb, dtype=torch.int64), q_len)
    q_rb = torch.repeat_interleave(torch.tensor(rowbase[:-1], dtype=torch.int64), q_len)
    nb_t = torch.tensor(nb, dtype=torch.int64)
    row_seg = torch.repeat_interleave(torch.arange(seg.num_segments), nb_t)
    row_level = torch.arange(rowbase[-1]) - torch.tensor(rowbase[:-1],
                                                         dtype=torch.int64)[row_seg]
    t0 = row_level * block_size
    krow = torch.tensor(seg.k_base, dtype=torch.int64)[row_seg] + t0
    nk = torch.clamp(torch.tensor(seg.k_len, dtype=torch.int64)[row_seg] - t0, max=block_size)
    to = dict(device=device)
    return BlockRows(seg.positions(device).to(torch.int32), q_nb.to(**to), q_rb.to(**to),
                     krow.to(**to), t0.to(dtype=torch.int32, **to),
                     nk.to(dtype=torch.int32, **to), rowbase[-1])


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


def plan_chunk(topk: torch.Tensor, rows: BlockRows, q0: int, q1: int, hkv: int,
               q_per_item: int) -> Plan:
    """Edges and work items of queries ``[q0, q1)``; topk ``[Hs, total_q, K]`` (Hs 1/Hkv)."""
    t = topk[:, q0:q1].long()
    hs, nq, kk = t.shape
    valid = (t >= 0) & (t < rows.q_nblocks[q0:q1].view(1, -1, 1))
    heads = torch.arange(hkv, device=t.device).view(-1, 1, 1)
    sentinel = hkv * rows.total_rows
    key = heads * rows.total_rows + rows.q_rowbase[q0:q1].view(1, -1, 1) + t
    key = torch.where(valid, key, torch.full_like(key, sentinel)).expand(hkv, nq, kk)
    skey, perm = torch.sort(key.reshape(-1), stable=True)   # q ascending within a row
    n_edges = int((skey < sentinel).sum())                    # host sync 1
    skey, perm = skey[:n_edges], perm[:n_edges]
    edge_q = ((perm // kk) % nq).to(torch.int32)
    edge_slot = (perm % kk).to(torch.int32)
    counts = torch.bincount(skey, minlength=sentinel)
    starts = torch.cumsum(counts, 0) - counts
    nchunks = (counts + q_per_item - 1) // q_per_item
    n_items = int(nchunks.sum())                              # host sync 2
    item_key = torch.repeat_interleave(torch.arange(sentinel, device=t.device), nchunks,
                                       output_size=n_items)
    first_item = torch.cumsum(nchunks, 0) - nchunks
    within = torch.arange(n_items, device=t.device) - first_item[item_key]
    e0 = starts[item_key] + within * q_per_item
    e1 = torch.minimum(e0 + q_per_item, starts[item_key] + counts[item_key])
    order = torch.argsort(e0 - e1, stable=True)               # largest items first
    item_key, e0, e1 = item_key[order], e0[order], e1[order]
    row = item_key % rows.total_rows
    return Plan(edge_q, edge_slot, (item_key // rows.total_rows).to(torch.int32),
                rows.row_krow[row], rows.row_t0[row], rows.row_nk[row],
                e0.to(torch.int32), e1.to(torch.int32), hkv)
