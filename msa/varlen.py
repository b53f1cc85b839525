"""Packed ("varlen") sequence metadata: validation and per-segment geometry.

Packed layout: the tokens of all segments are concatenated along dim 0.
Segment ``b`` owns query rows ``[cu_seqlens_q[b], cu_seqlens_q[b+1])`` and the KV rows
``[k_base_b, cu_seqlens_k[b+1])`` with ``k_base_b = cu_seqlens_k[fragment_indices[b]]``
(``cu_seqlens_k[b]`` without fragments). Queries are the causal *suffix* of their KV
(bottom-right alignment, which covers chunked prefill)::

    pos(query i of segment b) = k_len_b - q_len_b + i        # key offset of the query
    query i sees key offsets t = 0 .. pos                  (k_len=6, q_len=3)
                                                            t: 0 1 2 3 4 5
                                                      i=0     x x x x . .
                                                      i=1     x x x x x .
                                                      i=2     x x x x x x
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass(frozen=True)
class Segments:
    """Host-side geometry of the segments of a packed batch (python ints)."""

    q_start: List[int]
    q_len: List[int]
    k_base: List[int]
    k_len: List[int]
    total_q: int
    total_k: int

    @property
    def num_segments(self) -> int:
        return len(self.q_len)

    @property
    def max_seqlen_q(self) -> int:
        return max(self.q_len, default=0)

    @property
    def max_seqlen_k(self) -> int:
        return max(self.k_len, default=0)

    def num_blocks(self, b: int, block_size: int) -> int:
        """Blocks of segment ``b``'s KV: ``ceil(k_len_b / block_size)``."""
        return -(-self.k_len[b] // block_size)

    def total_rows(self, block_size: int) -> int:
        """``sum_b ceil(k_len_b / block_size)``: logical KV-block rows."""
        return sum(self.num_blocks(b, block_size) for b in range(self.num_segments))

    def positions(self, device=None) -> torch.Tensor:
        """``pos(q)`` for every packed query: ``[total_q]`` int64, built on ``device`` from
        the per-segment numbers (one pinned copy, no host sync, no per-segment loop)."""
        device = torch.device("cpu") if device is None else device
        if not self.num_segments:
            return torch.zeros(0, dtype=torch.int64, device=device)
        q_start, q_len, k_len = host_to_device([self.q_start, self.q_len, self.k_len],
                                               device).unbind(0)
        seg = torch.repeat_interleave(torch.arange(self.num_segments, device=device), q_len,
                                      output_size=self.total_q)
        return query_positions(seg, q_start, q_len, k_len)


def query_positions(q_seg: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
                    k_len: torch.Tensor) -> torch.Tensor:
    """``pos(q)`` of every packed query from its segment id ``q_seg [total_q]`` and the
    per-segment ``q_start, q_len, k_len [num_segments]`` (same device): bottom-right
    alignment, ``pos = k_len - q_len + (q - q_start)``."""
    return (torch.arange(q_seg.numel(), device=q_seg.device) - q_start[q_seg]
            + (k_len - q_len)[q_seg])


def _check_int_vector(name: str, t, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but the tensors are on {device}")


def _host_lists(*vectors: torch.Tensor) -> List[List[int]]:
    """The vectors as python ints, with one device-to-host copy (one host sync) in all."""
    if all(v.device.type == "cpu" for v in vectors):
        return [[int(x) for x in v.tolist()] for v in vectors]
    flat = torch.cat([v.to(torch.int64) for v in vectors]).tolist()     # one device
    out, i = [], 0
    for v in vectors:
        out.append(flat[i:i + v.numel()])
        i += v.numel()
    return out


def host_to_device(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    """Equal-length int lists -> ``[len(rows), n]`` int64 on ``device``, copied from pinned
    memory without a host synchronisation."""
    t = torch.tensor(rows, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _cumulative(name: str, values: List[int], total: int, total_name: str) -> None:
    if len(values) < 2:
        raise ValueError(f"{name} must hold at least 2 entries (B+1), got {len(values)}")
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}]={values[i]} "
                             f"< {name}[{i - 1}]={values[i - 1]}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1]={values[-1]} must equal {total_name}={total}")


def make_segments(total_q: int, total_k: int, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int] = None,
                  max_seqlen_k: Optional[int] = None,
                  fragment_indices: Optional[torch.Tensor] = None,
                  device=None) -> Segments:
    """Validate varlen metadata and return the segment geometry.

    Args:
        total_q / total_k: packed rows of the Q and KV tensors.
        cu_seqlens_q: ``[B+1]`` int32/int64, ``0 = cu[0] <= cu[1] <= ... = total_q``.
        cu_seqlens_k: ``[B+1]``, end of segment ``b``'s KV is ``cu_seqlens_k[b+1]``.
        max_seqlen_q / max_seqlen_k: optional upper bounds (checked when given).
        fragment_indices: optional ``[B]``; segment ``b``'s KV starts at
            ``cu_seqlens_k[fragment_indices[b]]``, ``0 <= fragment_indices[b] <= b``
            (segments may share KV rows).
    """
    _check_int_vector("cu_seqlens_q", cu_seqlens_q, device)
    _check_int_vector("cu_seqlens_k", cu_seqlens_k, device)
    if fragment_indices is not None:
        _check_int_vector("fragment_indices", fragment_indices, device)
        if fragment_indices.device != cu_seqlens_q.device:
            raise ValueError(f"fragment_indices is on {fragment_indices.device} but "
                             f"cu_seqlens_q is on {cu_seqlens_q.device}")
    if cu_seqlens_k.device != cu_seqlens_q.device:
        raise ValueError(f"cu_seqlens_k is on {cu_seqlens_k.device} but cu_seqlens_q is on "
                         f"{cu_seqlens_q.device}")
    host = _host_lists(*(t for t in (cu_seqlens_q, cu_seqlens_k, fragment_indices)
                         if t is not None))
    cq, ck = host[0], host[1]
    _cumulative("cu_seqlens_q", cq, total_q, "total_q (q.shape[0])")
    _cumulative("cu_seqlens_k", ck, total_k, "total_k (k.shape[0])")
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, "
                         f"got {len(cq)} and {len(ck)}")
    nseg = len(cq) - 1
    if fragment_indices is None:
        frag = list(range(nseg))
    else:
        frag = host[2]
        if len(frag) != nseg:
            raise ValueError(f"fragment_indices must have B={nseg} entries, got {len(frag)}")
        for b, f in enumerate(frag):
            if not 0 <= f <= b:
                raise ValueError(f"fragment_indices[{b}]={f} must lie in [0, {b}]")
    q_start, q_len, k_base, k_len = [], [], [], []
    for b in range(nseg):
        ql, base = cq[b + 1] - cq[b], ck[frag[b]]
        kl = ck[b + 1] - base
        if kl < ql:
            raise ValueError(f"segment {b}: k_len={kl} < q_len={ql}; queries must be the "
                             f"causal suffix of their keys (check cu_seqlens_k)")
        q_start.append(cq[b])
        q_len.append(ql)
        k_base.append(base)
        k_len.append(kl)
    seg = Segments(q_start, q_len, k_base, k_len, total_q, total_k)
    if max_seqlen_q is not None and int(max_seqlen_q) < seg.max_seqlen_q:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} < longest query segment "
                         f"{seg.max_seqlen_q}")
    if max_seqlen_k is not None and int(max_seqlen_k) < seg.max_seqlen_k:
        raise ValueError(f"max_seqlen_k={max_seqlen_k} < longest key segment "
                         f"{seg.max_seqlen_k}")
    return seg


def cu_seqlens_from_lengths(lengths, device=None) -> torch.Tensor:
    """``[B+1]`` int32 prefix sums of ``lengths``."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(lengths, 0)
    return out.to(dtype=torch.int32, device=device)


_SEGMENTS_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_SEGMENTS_CACHE_SIZE = 16


def cached_segments(total_q: int, total_k: int, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int] = None,
                    max_seqlen_k: Optional[int] = None,
                    fragment_indices: Optional[torch.Tensor] = None,
                    device=None) -> Segments:
    """``make_segments``, remembered per metadata tensor object and version.

    Reading device-side ``cu_seqlens`` costs a host synchronisation; every layer of a
    model and its backward pass the same tensors, so the geometry is read once. An entry
    is reused only for the very same tensor objects (held by weak reference, so a new
    tensor at a recycled address misses) at the same in-place version; inference-mode
    tensors, which track no version, are always read.
    """
    tensors = (cu_seqlens_q, cu_seqlens_k, fragment_indices)
    stamps = []
    for t in tensors:
        if t is None:
            stamps.append(None)
        elif not isinstance(t, torch.Tensor) or t.is_inference():
            stamps = None
            break
        else:
            stamps.append((id(t), t._version))
    if stamps is None:
        return make_segments(total_q, total_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, fragment_indices, device)
    key = (total_q, total_k, max_seqlen_q, max_seqlen_k, str(device), *stamps)
    hit = _SEGMENTS_CACHE.get(key)
    if hit is not None and all((r is None and t is None) or (r is not None and r() is t)
                               for r, t in zip(hit[0], tensors)):
        _SEGMENTS_CACHE.move_to_end(key)
        return hit[1]
    seg = make_segments(total_q, total_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, fragment_indices, device)
    _SEGMENTS_CACHE[key] = (tuple(None if t is None else weakref.ref(t) for t in tensors), seg)
    while len(_SEGMENTS_CACHE) > _SEGMENTS_CACHE_SIZE:
        _SEGMENTS_CACHE.popitem(last=False)
    return seg
