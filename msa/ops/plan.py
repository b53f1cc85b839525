"""k->q planning for the KV-outer kernels: who selected which KV block
(docs/semantics.md, "KV-outer planning").

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
the work lists; ``plan_chunks`` plans many query chunks with one sort (on a GPU in the
Triton kernels of ``msa.ops.plan_triton``, else by torch ops: ``plan_by_torch``).

``SparsePlan`` bundles all of it for one selection and is made once: the indexer's
selected-LSE pass, the attention forward and backward and the indexer-KL backward of a
training step share it (``sparse_plan`` finds it again from the top-k tensor).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..varlen import Segments, host_to_device, query_positions

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"   # Triton kernels on the CPU


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


TILE_ROWS = 64          # MMA rows of a union-forward tile by default: queries x G heads
GLUON_TILE_ROWS = 128   # MMA rows of the Gluon union kernel's tiles (2 warpgroups of 64)
MAX_UNION = 1024        # selected blocks a union-forward tile holds at most


def tile_queries(group: int, topk: int, rows: int = TILE_ROWS) -> int:
    """Queries per tile of the union forward (``msa.ops.attention.union``) for GQA
    groups of ``group`` heads and ``topk`` blocks a query: as many as fill ``rows`` MMA
    rows, 1 to 32, at most ``MAX_UNION`` selected blocks."""
    return max(1, min(32, rows // max(1, group), MAX_UNION // max(1, topk)))


def blocks_per_selected_block(topk: torch.Tensor, qt: int, every: int = 1) -> float:
    """The work of the union forward (``msa.ops.attention.union``) relative to the
    selection, for tiles of ``qt`` consecutive rows of ``topk [Hs, T, K]`` (every
    ``every``-th tile: an estimate from a sample): the distinct blocks of each tile summed,
    over the selected blocks, times ``qt``. 1 when a tile's queries select the same
    blocks, ``qt`` when they share none (a partial last tile is left out). One host
    synchronisation (``walk_totals`` and ``walk_ratio`` without it)."""
    return walk_ratio(walk_totals(topk, qt, every).tolist(), qt)


def walk_ratio(totals: List[int], qt: int) -> float:
    """``blocks_per_selected_block`` from ``walk_totals``' counts read to the host."""
    distinct, selected = totals
    return distinct * qt / max(selected, 1)


def walk_totals(topk: torch.Tensor, qt: int, every: int) -> torch.Tensor:
    """``[2]`` int64 on ``topk``'s device, queued without a host synchronisation: the
    distinct and the selected valid ids over the tiles ``0, every, 2 * every, ...`` of
    ``qt`` consecutive rows of ``topk [Hs, T, K]`` (whole tiles only)."""
    # the kernel on CUDA tensors only: in the interpreter a sample of thousands of tiles
    # takes minutes (its test runs it there on a few)
    fused = _planning_kernels() if topk.is_cuda else None
    if fused is not None:
        return fused.walk_totals(topk, qt, every)
    return _walk_totals_by_torch(topk, qt, every)


def _walk_totals_by_torch(topk: torch.Tensor, qt: int, every: int) -> torch.Tensor:
    hs, T, K = topk.shape
    n = T // qt * qt
    x = topk[:, :n].reshape(hs, n // qt, qt * K)[:, ::every]
    x = torch.sort(x, -1).values
    # empty ids (-1) sort first: a valid id is new where the sorted row changes, or first
    distinct = (x[..., 1:] != x[..., :-1]).sum() + (x[..., 0] >= 0).sum()
    return torch.stack((distinct, (x >= 0).sum()))


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
    edge0: int = 0       # the chunk's edges are edge_q[edge0 : edge0 + num_edges] (one
    num_edges: int = 0   # edge list serves the chunks of a planning group)

    @property
    def num_items(self) -> int:
        return self.item_h.numel()


def plan_chunks(topk_indices: torch.Tensor, rows: BlockRows, q0: int, q1: int, chunk: int,
                hkv: int, q_per_item: int) -> List[Tuple[int, int, Plan]]:
    """Plans of the query chunks ``[c, c + chunk)`` covering ``[q0, q1)``, built at once.

    topk_indices: ``[Hs, total_q, K]`` (Hs 1 or ``hkv``). Returns ``(c0, c1, plan)`` per
    chunk; edge query indices are relative to the chunk start ``c0``. One sort and one host
    synchronisation serve all chunks (``queue_chunks``, then ``QueuedChunks.plans``).
    """
    return _plans_now(queue_chunks(topk_indices, rows, q0, q1, chunk, hkv, q_per_item))


@dataclass(eq=False)
class QueuedChunks:
    """A planning group's arrays on the device, before the host has read its counts:
    ``fields`` (``edge_q, edge_slot`` and the item fields of every chunk, chunk-major) and
    ``ends [2, nchunks]`` (the running item and edge counts at each chunk's end), for the
    queries ``[q0, q1)`` in chunks of ``chunk``, ``hkv`` heads."""
    fields: list
    ends: torch.Tensor
    q0: int
    q1: int
    chunk: int
    hkv: int

    def plans(self, ends: List[int]) -> List[Tuple[int, int, Plan]]:
        """``(c0, c1, plan)`` per chunk, given ``ends`` read to the host (flattened: the
        item counts' ends, then the edge counts')."""
        n = len(ends) // 2
        items, edges = ([b - a for a, b in zip([0] + c[:-1], c)] for c in (ends[:n], ends[n:]))
        return _chunk_plans(self.fields, items, edges, self.q0, self.q1, self.chunk, self.hkv)


def _plans_now(queued: Optional[QueuedChunks]) -> List[Tuple[int, int, Plan]]:
    """``queued``'s plans, its counts read to the host now (one host synchronisation)."""
    return [] if queued is None else queued.plans(queued.ends.reshape(-1).tolist())


def queue_chunks(topk_indices: torch.Tensor, rows: BlockRows, q0: int, q1: int, chunk: int,
                 hkv: int, q_per_item: int) -> Optional[QueuedChunks]:
    """``plan_chunks``' work queued on the device, without a host synchronisation
    (``None``: no queries or no key rows). Built by the Triton kernels of
    ``msa.ops.plan_triton`` on a GPU (and in Triton's interpreter), else by
    ``queue_by_torch``: the same plan."""
    args = (topk_indices, rows, q0, q1, chunk, hkv, q_per_item)
    fused = _planning_kernels()
    if fused is None or not (topk_indices.is_cuda or INTERPRETER) or not fused.applies(*args):
        return queue_by_torch(*args)        # also every empty plan (no queries, no rows)
    fields, ends = fused.planned_chunks(*args)
    return QueuedChunks(fields, ends, q0, q1, chunk, hkv)


def _planning_kernels():
    try:
        from . import plan_triton
    except ImportError:                 # no Triton: the torch ops plan
        return None
    return plan_triton


def _chunk_plans(fields, items: List[int], edges: List[int], q0: int, q1: int, chunk: int,
                 hkv: int) -> List[Tuple[int, int, Plan]]:
    """``(c0, c1, plan)`` per chunk from a planning group's arrays ``fields`` (``edge_q,
    edge_slot`` and the item fields of every chunk, chunk-major) and the chunks' item and
    edge counts."""
    edge_q, edge_slot, *item_fields = fields
    plans, i0, edge0 = [], 0, 0
    for c, (n, ne) in enumerate(zip(items, edges)):
        # views: the kernels read item fields as scalars and do not specialise their
        # pointers on alignment, so slices at odd offsets compile no new variants
        item = [x[i0:i0 + n] for x in item_fields]
        c0 = q0 + c * chunk
        plans.append((c0, min(q1, c0 + chunk), Plan(edge_q, edge_slot, *item, hkv, edge0,
                                                     ne)))
        i0, edge0 = i0 + n, edge0 + ne
    return plans


def plan_by_torch(topk_indices: torch.Tensor, rows: BlockRows, q0: int, q1: int, chunk: int,
                  hkv: int, q_per_item: int) -> List[Tuple[int, int, Plan]]:
    """``plan_chunks`` by torch ops (any device; int64 keys where int32 cannot hold them)."""
    return _plans_now(queue_by_torch(topk_indices, rows, q0, q1, chunk, hkv, q_per_item))


def queue_by_torch(topk_indices: torch.Tensor, rows: BlockRows, q0: int, q1: int, chunk: int,
                   hkv: int, q_per_item: int) -> Optional[QueuedChunks]:
    """``queue_chunks`` by torch ops."""
    t = topk_indices[:, q0:q1].long()
    hs, nq, kk = t.shape
    nrow = rows.total_rows
    valid = (t >= 0) & (t < rows.q_nblocks[q0:q1].view(1, -1, 1))
    q_rel = torch.arange(nq, device=t.device)
    cid = (q_rel // chunk).view(1, -1, 1)
    heads = torch.arange(hkv, device=t.device).view(-1, 1, 1)
    nkeys = -(-nq // chunk) * hkv * nrow
    if nkeys == 0:                                          # no queries (or no key rows)
        return None
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
    # serialises on its atomics)
    bounds = torch.searchsorted(skey, torch.arange(nkeys + 1, device=t.device,
                                                   dtype=skey.dtype))
    starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    nsplit = (counts + q_per_item - 1) // q_per_item
    per_chunk = nsplit.view(-1, hkv * nrow).sum(1)
    # items are built for an upper bound of their count (sum ceil(c / q) <= E / q + keys),
    # so that the counts are read by the host after every planning kernel is queued
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
    edges = counts.view(-1, hkv * nrow).sum(1)
    ends = torch.cumsum(torch.stack((per_chunk, edges)), 1)
    return QueuedChunks([edge_q, edge_slot, head, krow, t0, nk, e0, e1], ends, q0, q1, chunk,
                        hkv)


PLAN_GROUP_QUERIES = 1 << 18      # queries planned by one sort (bounds planning memory)


@dataclass(eq=False)
class SparsePlan:
    """Everything the KV-outer kernels need about one selection, built once.

    seg: segment geometry; block_size; heads: KV heads the work items serve (the
    selection's ``Hs`` is ``heads`` or 1); rows: ``BlockRows``; chunk: queries per chunk;
    q_per_item; ``chunks``: ``[(q0, q1, Plan)]`` covering all queries, built on first use
    (one sort per ``PLAN_GROUP_QUERIES`` queries; the few-query kernels read only
    ``rows``). The plan refers to its selection weakly (it is remembered *with* the
    tensor, which must stay free to die); ``indices(topk)`` is the int32 contiguous form
    the kernels read.

    Host synchronisations: ``queue()`` queues the planning kernels without one; the host
    reads their counts, and every count asked for by ``read`` until then, in one
    synchronisation when the chunks or such a count are first needed. A training step
    queues its plan behind the top-k and the forward's choice of kernel (``read``: the
    union walk's sample) settles both at once, after the host's setup of the forward.
    """

    seg: Segments
    block_size: int
    heads: int
    rows: BlockRows
    chunk: int
    q_per_item: int
    _topk: Callable[[], Optional[torch.Tensor]] = field(repr=False)
    _converted: Optional[torch.Tensor] = field(default=None, repr=False)
    _chunks: Optional[list] = field(default=None, repr=False)
    _derived: dict = field(default_factory=dict, repr=False)
    _queued: Optional[list] = field(default=None, repr=False)      # QueuedChunks per group
    _pending: dict = field(default_factory=dict, repr=False)       # key -> device counts
    _counts: dict = field(default_factory=dict, repr=False)        # key -> host counts

    def derived(self, key, build: Callable[[], object]):
        """What ``build()`` makes from this plan's selection (e.g. the union plan of
        ``msa.ops.attention.union``), made once per ``key``."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def indices(self, topk_indices: torch.Tensor) -> torch.Tensor:
        """``topk_indices`` as the kernels read it: ``[Hs, total_q, K]`` int32
        contiguous."""
        return topk_indices if self._converted is None else self._converted

    def require(self, heads: int, max_chunk: int, consumer: str) -> None:
        """Raise unless the plan serves ``heads`` KV heads in chunks of at most
        ``max_chunk`` queries (what ``consumer``'s buffers are sized for)."""
        if self.heads != heads or self.chunk > max_chunk:
            raise ValueError(f"plan of {self.heads} heads with {self.chunk} queries per "
                             f"chunk; the {consumer} needs {heads} heads and at most "
                             f"{max_chunk}")

    @property
    def chunks(self) -> List[Tuple[int, int, Plan]]:
        if self._chunks is None:
            self.queue()
            self._settle()
        return self._chunks

    def queue(self) -> None:
        """Queue the planning kernels of every planning group, with no host
        synchronisation (``chunks`` reads their counts)."""
        if self._chunks is not None or self._queued is not None:
            return
        idx = self._converted if self._converted is not None else self._topk()
        if idx is None:
            raise RuntimeError("the selection of this plan no longer exists")
        total_q, c = self.seg.total_q, self.chunk
        group = max(c, PLAN_GROUP_QUERIES // c * c)
        queued = (queue_chunks(idx, self.rows, s0, min(total_q, s0 + group), c, self.heads,
                               self.q_per_item) for s0 in range(0, total_q, group))
        self._queued = [x for x in queued if x is not None]

    def read(self, key, make: Callable[[], torch.Tensor]) -> List[int]:
        """The host's copy of ``make()`` (integer counts on the device, queued once per
        ``key``), read in the same host synchronisation as the planning kernels' counts
        when those are queued and not yet read."""
        if key not in self._counts:
            if key not in self._pending:
                self._pending[key] = make().reshape(-1)
            self._settle()
        return self._counts[key]

    def _settle(self) -> None:
        """One host synchronisation: the queued planning groups' counts (building
        ``chunks``) and the pending counts of ``read``."""
        groups = self._queued             # set only while queued and not yet read
        parts = [g.ends.reshape(-1) for g in groups or ()] + list(self._pending.values())
        flat = torch.cat([x.to(torch.int64) for x in parts]).tolist() if parts else []
        at = 0
        if groups is not None:
            self._chunks = []
            for g in groups:
                self._chunks += g.plans(flat[at:at + g.ends.numel()])
                at += g.ends.numel()
            self._queued = None
        for key, x in self._pending.items():
            self._counts[key] = flat[at:at + x.numel()]
            at += x.numel()
        self._pending = {}


def build_plan(topk_indices: torch.Tensor, seg: Segments, *, block_size: int, heads: int,
               chunk: int, q_per_item: int = 256, rows: Optional[BlockRows] = None
               ) -> SparsePlan:
    """A new ``SparsePlan`` of ``topk_indices [Hs, total_q, K]`` (its rows now, its chunks
    on first use; ``rows``: the selection's ``BlockRows`` when made already, e.g.
    ``paged_rows``)."""
    idx = topk_indices
    if idx.dtype != torch.int32 or not idx.is_contiguous():
        idx = idx.to(torch.int32).contiguous()
    rows = rows if rows is not None else block_rows(seg, block_size, topk_indices.device)
    return SparsePlan(seg, block_size, heads, rows, max(1, chunk), q_per_item,
                      weakref.ref(topk_indices), None if idx is topk_indices else idx)


ITEM_ROWS = 4096   # (query, head) rows a work item holds: 64 tiles of 64 MMA rows


def item_queries(group: int) -> int:
    """``q_per_item`` for GQA groups of ``group`` query heads per KV head: items of
    ``ITEM_ROWS`` rows (``group`` per query), at least 256 queries: 256 at the MiniMax-M3
    group of 16, 512 at 8, 682 at 6, 1024 at 4, so that each item's key load and pipeline
    fill are paid over as many tiles at every group (docs/benchmarks.md); times
    ``workspace_scale()``."""
    return max(256, _scaled(ITEM_ROWS) // max(1, group))


# Per-chunk buffer budgets of the plan's consumers (times ``workspace_scale()``): the
# chunk of a shared plan is the smallest of their limits, so every consumer can walk it.
PARTIAL_BUDGET_BYTES = 6 << 30    # forward: partial outputs and LSEs
SLOT_BUDGET_BYTES = 4 << 30       # backward dQ slots; deterministic KL dqi slots
LSE_BUDGET_BYTES = 1 << 30        # selected-LSE pass: partial LSEs
DZ_BUDGET_BYTES = 1 << 30         # indexer KL: its dz and teacher rows, one per edge


def workspace_scale() -> float:
    """``MSA_WORKSPACE_SCALE`` from the environment (default 1): a positive factor on the
    per-chunk buffer budgets above and on ``ITEM_ROWS``. Larger chunks give each KV block
    more of its queries per launch, so the KV-outer programs run longer and pay their
    block load and pipeline fill fewer times, for buffers that grow by the same factor
    (docs/benchmarks.md, "Workspace")."""
    raw = os.environ.get("MSA_WORKSPACE_SCALE")
    if raw is None:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"MSA_WORKSPACE_SCALE must be a positive number, got {raw!r}")
    return value


def _scaled(n: int) -> int:
    return int(n * workspace_scale())


def forward_chunk(hq: int, d: int, itemsize: int, topk: int) -> int:
    """Queries per chunk of the forward: ``Hq * K`` partial rows of ``D`` values + LSE."""
    return max(1, _scaled(PARTIAL_BUDGET_BYTES) // (hq * topk * (d * itemsize + 4)))


def backward_block_n(d: int, block_size: int) -> int:
    """Keys per backward program: the whole block for D <= 128, 64 for D = 256."""
    return min(block_size, 128 if d <= 128 else 64)


def backward_chunk(hq: int, d: int, itemsize: int, topk: int, nsub: int) -> int:
    """Queries per chunk of the backward: one dQ slot row of ``D`` per (query head, slot,
    key sub-block)."""
    return max(1, _scaled(SLOT_BUDGET_BYTES) // (hq * topk * nsub * d * itemsize))


def kl_chunk(hi: int, di: int, topk: int, deterministic: bool, block_size: int) -> int:
    """Queries per chunk of the indexer-KL backward: its dz rows and teacher rows
    (``block_size`` values per (query, index head, slot): dz in the index dtype, the
    teacher in fp32, budgeted at 6 bytes) and, deterministic, fp32 ``dqi`` slots per
    (index head, slot)."""
    rows = max(1, _scaled(DZ_BUDGET_BYTES) // (hi * topk * block_size * 6))
    if deterministic:
        return min(rows, max(1, _scaled(SLOT_BUDGET_BYTES) // (hi * topk * di * 4)))
    return rows


def lse_chunk(hi: int, topk: int) -> int:
    """Queries per chunk of the selected-LSE pass (fp32 partial LSEs)."""
    return max(1, _scaled(LSE_BUDGET_BYTES) // (hi * topk * 4))


def attention_chunk(q: torch.Tensor, topk: int, block_size: int) -> int:
    """The chunk a plan needs to serve the attention forward and backward
    (``q [total_q, Hq, D]``)."""
    hq, d, isz = q.shape[1], q.shape[2], q.dtype.itemsize
    nsub = -(-block_size // backward_block_n(d, block_size))
    return min(forward_chunk(hq, d, isz, topk), backward_chunk(hq, d, isz, topk, nsub))


def training_chunk(q: torch.Tensor, topk: int, block_size: int, hi: int, di: int,
                   deterministic: bool) -> int:
    """The chunk one plan needs to serve a whole training step: selected LSE, forward,
    indexer KL and backward (``q [total_q, Hq, D]``)."""
    return min(attention_chunk(q, topk, block_size),
               kl_chunk(hi, di, topk, deterministic, block_size), lse_chunk(hi, topk))


# top-k tensor id -> (weak reference, version, trusted, plans); an entry lives as long as
# its tensor (a plan saved for the backward lives until the backward has run)
_REGISTRY: Dict[int, list] = {}


def _entry(topk_indices: torch.Tensor, create: bool):
    if topk_indices.is_inference() or not _SHARING:  # inference tensors track no version
        return None
    key = id(topk_indices)
    e = _REGISTRY.get(key)
    if e is not None and (e[0]() is not topk_indices or e[1] != topk_indices._version):
        e = None
    if e is None and create:
        e = [weakref.ref(topk_indices, lambda _, key=key: _REGISTRY.pop(key, None)),
             topk_indices._version, False, []]
        _REGISTRY[key] = e
    return e


def forget(topk_indices: torch.Tensor) -> None:
    """Drop what is remembered about ``topk_indices`` (its plans and trust); benchmarks use it to
    time planning again on the same tensor."""
    _REGISTRY.pop(id(topk_indices), None)


@contextmanager
def sharing_disabled():
    """Within the block every consumer plans a selection itself and nothing is trusted
    (how a training step ran before plans were shared; for A/B measurements)."""
    global _SHARING
    _SHARING = False
    try:
        yield
    finally:
        _SHARING = True


_SHARING = True


def mark_trusted(topk_indices: torch.Tensor) -> None:
    """Record that ``topk_indices`` was produced by the library (valid by construction): it is
    not validated again while it is not modified in place."""
    e = _entry(topk_indices, True)
    if e is not None:
        e[2] = True


def is_trusted(topk_indices: torch.Tensor) -> bool:
    e = _entry(topk_indices, False)
    return e is not None and e[2]


def sparse_plan(topk_indices: torch.Tensor, seg: Segments, *, block_size: int, heads: int,
                max_chunk: int, q_per_item: int = 256) -> SparsePlan:
    """The plan of selection ``topk_indices [Hs, total_q, K]`` served to ``heads`` KV
    heads, with chunks of at most ``max_chunk`` queries: the one made earlier for this
    very tensor (not modified since) when it fits, else a new one (remembered with the
    tensor)."""
    e = _entry(topk_indices, True)
    for p in (e[3] if e is not None else ()):
        if p.block_size == block_size and p.heads == heads and p.chunk <= max_chunk and \
                p.q_per_item == q_per_item and p.seg == seg:
            return p
    plan = build_plan(topk_indices, seg, block_size=block_size, heads=heads, chunk=max_chunk,
                      q_per_item=q_per_item)
    if e is not None:
        e[3] = [p for p in e[3] if not (p.block_size == block_size and p.heads == heads)]
        e[3].append(plan)
    return plan
