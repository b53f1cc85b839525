"""The layout of a public call: packed varlen or batched inputs, checked once.

``call_layout`` reads the rank of ``q``: packed ``[total_q, H, D]`` with ``cu_seqlens_q``,
``cu_seqlens_k`` ``[B+1]`` (optional ``max_seqlen_q/k``, ``fragment_indices``), or batched
``[B, T, H, D]`` (``Tk >= Tq``). The ``CallLayout`` it returns packs batched tensors to the
packed form the ops take and unpacks their results (docs/semantics.md, "Shapes and names").
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .config import MAX_TOPK
from .ops import checks as C
from .ops.custom_ops import segments
from .varlen import Segments


@dataclass
class CallLayout:
    """Layout of a call: packed (``batch == -1``, varlen metadata) or batched."""

    total_q: int
    total_k: int
    device: torch.device
    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    frag: Optional[torch.Tensor] = None
    max_q: Optional[int] = None
    max_k: Optional[int] = None
    batch: int = -1
    seqlen_q: int = 0
    seqlen_k: int = 0

    @property
    def meta(self) -> tuple:
        """Arguments 3.. of the custom ops (``msa.ops.custom_ops``)."""
        return (self.cu_q, self.cu_k, self.frag, self.max_q, self.max_k, self.batch,
                self.seqlen_q, self.seqlen_k)

    @functools.cached_property
    def seg(self) -> Segments:
        """Validated segment geometry (reads ``cu_seqlens`` once)."""
        return segments(self.total_q, self.total_k, *self.meta, self.device)

    def pack(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``[B, T, H, D]`` -> ``[B*T, H, D]`` (packed inputs pass through)."""
        if x is None or self.batch < 0:
            return x
        return x.reshape(-1, *x.shape[2:])

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[total_q, ...]`` -> ``[B, Tq, ...]``."""
        return x if self.batch < 0 else x.reshape(self.batch, self.seqlen_q, *x.shape[1:])

    def pack_heads(self, x: torch.Tensor, heads: Optional[tuple] = None) -> torch.Tensor:
        """``[B, H, Tq, K]`` -> ``[H, total_q, K]``; ``heads``: the allowed ``H`` (any if
        None)."""
        if self.batch < 0:
            return x
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != self.batch or \
                x.shape[2] != self.seqlen_q or not 1 <= x.shape[3] <= MAX_TOPK or \
                (heads is not None and x.shape[1] not in heads):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            among = "" if heads is None else f"H in {sorted(set(heads))}, "
            raise ValueError(f"topk_indices must have shape [B={self.batch}, H, "
                             f"Tq={self.seqlen_q}, K] with {among}1 <= K <= {MAX_TOPK} in the "
                             f"batched layout, got {shape}")
        h, kk = x.shape[1], x.shape[3]
        base = None if torch.compiler.is_compiling() else x._base
        # the batched view of a packed top-k (an aux output passed back in): no copy back
        if base is not None and base.shape == (h, self.total_q, kk) and \
                base.is_contiguous() and x.data_ptr() == base.data_ptr() and \
                x.stride() == (self.seqlen_q * kk, self.total_q * kk, kk, 1):
            return base
        return x.transpose(0, 1).reshape(h, -1, kk)

    def unpack_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[H, total_q, ...]`` -> ``[B, H, Tq, ...]``."""
        if self.batch < 0:
            return x
        return x.reshape(x.shape[0], self.batch, self.seqlen_q, *x.shape[2:]).transpose(0, 1)


def int_vector(name: str, x, device):
    """``cu_seqlens`` / ``fragment_indices`` given as a list, tuple or numpy array become an
    int32 tensor on ``device``; tensors pass as they are (checked later)."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)) or type(x).__module__ == "numpy":
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a 1-D integer tensor or sequence, got {x!r}") \
                from e
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {t.dtype}")
        return t.to(device=device, dtype=torch.int32)
    raise TypeError(f"{name} must be a 1-D int32/int64 tensor (or a list of ints), got "
                    f"{type(x).__name__}")


def check_max_seqlen(name: str, x) -> None:
    if x is not None and (isinstance(x, bool) or not isinstance(x, int)):
        raise TypeError(f"{name} must be an int or None, got {x!r}")


def check_ranks(q_name, q, k_name, k) -> None:
    """``q`` packed ``[total_q, H, D]`` or batched ``[B, T, H, D]``, ``k`` of its rank and
    device (float tensors both)."""
    if not isinstance(q, torch.Tensor) or q.dim() not in (3, 4):
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"{q_name} must be [total_q, H, D] (packed) or [B, T, H, D] "
                         f"(batched), got {shape}")
    C.check_float_tensor(q_name, q, q.dim())
    if isinstance(k, torch.Tensor) and k.dim() != q.dim():
        layout = "batched [B, T, H, D]" if q.dim() == 4 else "packed [total_q, H, D]"
        raise ValueError(f"{q_name} is {layout}, so {k_name} must be {q.dim()}-D as well, "
                         f"got shape {tuple(k.shape)} (one layout for all inputs)")
    C.check_float_tensor(k_name, k, q.dim(), q.device)


def call_layout(q_name, q, k_name, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                fragment_indices) -> CallLayout:
    """The layout of a call whose query-like input is ``q`` and key-like input ``k``
    (named ``q_name``, ``k_name`` in errors): batched when ``q`` is 4-D (no varlen
    arguments allowed), else packed with both ``cu_seqlens``, validated now (read once)."""
    check_ranks(q_name, q, k_name, k)
    if q.dim() == 4:
        if cu_seqlens_q is not None or cu_seqlens_k is not None or fragment_indices is not None:
            raise ValueError("cu_seqlens_q/cu_seqlens_k/fragment_indices are for the packed "
                             f"layout; {q_name} is batched [B, T, H, D]")
        bsz, tq, tk = q.shape[0], q.shape[1], k.shape[1]
        if k.shape[0] != bsz:
            raise ValueError(f"{k_name} batch {k.shape[0]} != {q_name} batch {bsz}")
        if tk < tq:
            raise ValueError(f"{k_name} length {tk} < {q_name} length {tq}: queries must be "
                             "the causal suffix of the keys")
        return CallLayout(bsz * tq, bsz * tk, q.device, batch=bsz, seqlen_q=tq, seqlen_k=tk)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError(f"packed {q_name} [total_q, H, D] needs cu_seqlens_q and cu_seqlens_k")
    check_max_seqlen("max_seqlen_q", max_seqlen_q)
    check_max_seqlen("max_seqlen_k", max_seqlen_k)
    lay = CallLayout(q.shape[0], k.shape[0], q.device,
                     int_vector("cu_seqlens_q", cu_seqlens_q, q.device),
                     int_vector("cu_seqlens_k", cu_seqlens_k, q.device),
                     int_vector("fragment_indices", fragment_indices, q.device),
                     max_seqlen_q, max_seqlen_k)
    if not torch.compiler.is_compiling():     # traced: the ops validate it
        lay.seg                               # validate the metadata now (read once)
    return lay
