"""Device geometry of a segment layout, shared by the indexer, the attention and their
plans (docs/semantics.md, "KV-outer planning"): per query and per KV block row
(``BlockRows``, ``block_rows``; ``paged_rows`` for keys in pages) and query tiles that
stay inside one segment (``query_tiles``). Each is built from the per-segment numbers
with one pinned copy and no host synchronisation, and remembered for the layouts used
last (``geometry``).

A KV block row is (segment ``b``, level ``L``), numbered segment-major.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from ..varlen import Segments, host_to_device, query_positions


@dataclass
class BlockRows:
    """Per-query and per-row geometry of a segment layout, on the device.

    q_pos, q_nblocks, q_rowbase, q_kbase: ``[total_q]`` int32/int64 position, blocks in
    the query's segment, first global block row of its segment, packed row of its key 0.
    row_krow, row_t0, row_nk: ``[total_rows]`` packed first key row, key offset, keys.
    paged: whether ``row_krow`` points into pages (``paged_rows``) rather than at
    ``q_kbase + t0``.
    """

    q_pos: torch.Tensor
    q_nblocks: torch.Tensor
    q_rowbase: torch.Tensor
    q_kbase: torch.Tensor
    row_krow: torch.Tensor
    row_t0: torch.Tensor
    row_nk: torch.Tensor
    total_rows: int
    block_size: int
    paged: bool = False


# device geometry of recent segment layouts: every layer of a model (and the indexer,
# the attention and their backward) derives the same from the same segments
GEOMETRY_CACHE_SIZE = 8
_GEOMETRY: "OrderedDict[tuple, object]" = OrderedDict()


def geometry(kind: str, seg: Segments, param: int, device, build: Callable[[], object]):
    """``build()`` (tensors on ``device`` derived from ``seg`` and ``param`` alone, never
    modified by their users), remembered for the ``GEOMETRY_CACHE_SIZE`` layouts used
    last (built outside inference mode, so that a layout first seen under
    ``torch.inference_mode`` serves training too). Built afresh, and not remembered, while
    a CUDA graph is being captured: its kernels would not have run, and the graph must
    own the memory it reads."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return build()
    key = (kind, param, str(device), tuple(seg.q_start), tuple(seg.q_len),
           tuple(seg.k_base), tuple(seg.k_len))
    hit = _GEOMETRY.get(key)
    if hit is None:
        with torch.inference_mode(False):    # plain tensors, usable outside inference too
            hit = _GEOMETRY[key] = build()
        while len(_GEOMETRY) > GEOMETRY_CACHE_SIZE:
            _GEOMETRY.popitem(last=False)
    _GEOMETRY.move_to_end(key)
    return hit


def block_rows(seg: Segments, block_size: int, device) -> BlockRows:
    """``seg``'s ``BlockRows`` on ``device`` (built from the per-segment numbers with one
    pinned copy and no host sync; remembered per layout, ``geometry``)."""
    return geometry("rows", seg, block_size, device,
                    lambda: _build_rows(seg, block_size, device))


def _build_rows(seg: Segments, block_size: int, device) -> BlockRows:
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
                     t0.to(torch.int32), nk.to(torch.int32), nrows, block_size)


def paged_rows(rows: BlockRows, seg: Segments, block_table: torch.Tensor,
               rows_per_page: int) -> BlockRows:
    """``rows`` whose keys live in pages: block ``j`` of segment ``b`` is page
    ``block_table[b, j]``, its first key row ``page * rows_per_page`` (in units of the
    key tensor's token stride; one page per block). The query geometry is unchanged."""
    nb = host_to_device([[seg.num_blocks(b, rows.block_size)
                          for b in range(seg.num_segments)]], block_table.device)[0]
    row_seg = torch.repeat_interleave(torch.arange(seg.num_segments, device=nb.device), nb,
                                      output_size=rows.total_rows)
    page = block_table[row_seg, rows.row_t0.long() // rows.block_size].long()
    return dataclasses.replace(rows, row_krow=page * rows_per_page, paged=True)


def query_tiles(seg: Segments, block_t: int, device):
    """Query tiles that stay inside one segment, heaviest (latest) first: ``q0, n, kbase,
    off`` ``[tiles]`` int32 (built on ``device``, no host sync; remembered per layout,
    ``geometry``)."""
    return geometry("tiles", seg, block_t, device, lambda: _build_tiles(seg, block_t, device))


def _build_tiles(seg: Segments, block_t: int, device):
    nseg = seg.num_segments
    ntiles = [-(-ql // block_t) for ql in seg.q_len]
    total = sum(ntiles)
    if not total:
        return tuple(torch.zeros(0, dtype=torch.int32, device=device) for _ in range(4))
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
    return tuple(x.clone() for x in tiles[:, order].to(torch.int32).unbind(0))
