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

A KV block row is (segment ``b``, level ``L``, ``msa.ops.geometry``). An entry is valid
iff ``0 <= L < ceil(k_len_b / block)``; selected blocks after the query are kept here and
masked causally in the kernel. One host synchronisation (the item count per chunk) sizes
the work lists; ``plan_chunks`` plans many query chunks with one sort (on a GPU in the
Triton kernels of ``msa.ops.plan_triton``, else by torch ops: ``plan_by_torch``).

``SparsePlan`` bundles all of it for one selection and is made once: the indexer's
selected-LSE pass, the attention forward and backward and the indexer-KL backward of a
training step share it (``sparse_plan`` finds it again from the top-k tensor); its
chunk and item sizes come from ``msa.ops.workspace``.
"""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..varlen import Segments
from .geometry import BlockRows, block_rows

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"   # Triton kernels on the CPU


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
