"""Building blocks shared by the pure-PyTorch reference operators.

A *key set* is what one chunk of ``C`` queries may attend to:
``rows [R, Hs, S]`` (packed KV row of every candidate key; ``R`` is ``C`` or 1 when all
queries of the chunk share the keys) and ``allowed [C, Hs, S]`` (bool: selected and
causally visible). ``Hs`` is 1 (shared by all heads) or the number of heads it serves.
Every reference loops over segments and query chunks sized so that no buffer grows with
``T x T`` or ``T x T/block``: memory stays linear in sequence length.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

from ..varlen import Segments

# Elements (not bytes) a chunk's largest temporary may hold; 2**23 fp32 = 32 MiB.
CHUNK_BUDGET = 1 << 23


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (all accumulation is at least fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def chunk_size(per_query: int, budget: int = CHUNK_BUDGET, cap: int = 1024) -> int:
    """Queries per chunk so that ``chunk * per_query <= budget`` (at least 1)."""
    return max(1, min(cap, budget // max(1, per_query)))


def query_chunks(seg: Segments, chunk: int) -> Iterator[Tuple[int, int, int]]:
    """Yield ``(b, start, end)``: packed query rows ``[start, end)`` of segment ``b``."""
    for b in range(seg.num_segments):
        s0, n = seg.q_start[b], seg.q_len[b]
        for c in range(s0, s0 + n, chunk):
            yield b, c, min(c + chunk, s0 + n)


def sparse_keys(topk_indices: torch.Tensor, k_base: int, pos: torch.Tensor,
                block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Key set of selected blocks.

    Args:
        topk_indices: ``[Hs, C, K]`` segment-local block ids, ``-1`` = empty slot (ids assumed in
            range, see ``check_topk_indices``).
        k_base: packed row of the segment's key offset 0.
        pos: ``[C]`` key offset of each query (causal limit).
    Returns:
        rows ``[C, Hs, K*block_size]`` int64 and allowed ``[C, Hs, K*block_size]`` bool.
        Disallowed entries point at row ``k_base`` (any valid row; they are masked).
    """
    ids = topk_indices.permute(1, 0, 2).long()                                 # [C, Hs, K]
    offs = torch.arange(block_size, device=ids.device)
    t = ids.clamp_min(0).unsqueeze(-1) * block_size + offs             # [C, Hs, K, BS]
    allowed = (ids >= 0).unsqueeze(-1) & (t <= pos.view(-1, 1, 1, 1))
    rows = torch.where(allowed, t + k_base, torch.full_like(t, k_base))
    c, hs = ids.shape[:2]
    return rows.reshape(c, hs, -1), allowed.reshape(c, hs, -1)


def dense_keys(k_base: int, pos: torch.Tensor, t0: int, t1: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Key set of the key offsets ``[t0, t1)`` shared by a chunk (causal mask only).

    Returns rows ``[1, 1, t1-t0]`` and allowed ``[C, 1, t1-t0]``.
    """
    t = torch.arange(t0, t1, device=pos.device)
    return (t + k_base).view(1, 1, -1), (t <= pos.view(-1, 1)).unsqueeze(1)


def _head_index(num_src: int, nheads: int, device) -> torch.Tensor:
    # head h of the key set reads source head h * num_src // nheads (num_src in {1, nheads})
    return (torch.arange(nheads, device=device) * num_src // nheads).view(1, -1, 1)


def gather_keys(x: torch.Tensor, rows: torch.Tensor, nheads: int,
                dtype: torch.dtype) -> torch.Tensor:
    """``x [T, Hx, D]`` at ``rows [R, Hs, S]`` -> ``[R, nheads, S, D]`` in ``dtype``.

    ``Hx`` and ``Hs`` are each 1 or ``nheads``.
    """
    r, _, s = rows.shape
    return x[rows.expand(r, nheads, s), _head_index(x.shape[1], nheads, x.device)].to(dtype)


def scatter_keys(dst: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
    """Adjoint of ``gather_keys``: ``dst [T, Hx, D] += grad [R, nheads, S, D]`` at rows."""
    r, nheads, s, _ = grad.shape
    idx = (rows.expand(r, nheads, s), _head_index(dst.shape[1], nheads, dst.device))
    dst.index_put_(idx, grad.to(dst.dtype), accumulate=True)


def group_logits(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q.k`` per GQA group: ``q [C, H, D]``, keys ``[R, Hk, S, D]`` ->
    ``[C, Hk, H/Hk, S]`` (``R`` is ``C`` or 1)."""
    c, h, d = q.shape
    hk = keys.shape[1]
    q = q.to(keys.dtype).view(c, hk, h // hk, d)
    if keys.shape[0] == 1 and c > 1:     # shared keys: one GEMM per head, no broadcast copy
        x = torch.matmul(q.transpose(0, 1).reshape(hk, -1, d), keys[0].transpose(-1, -2))
        return x.view(hk, c, h // hk, -1).transpose(0, 1) * scale
    return torch.matmul(q, keys.transpose(-1, -2)) * scale


def apply_keys(p: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``p [C, Hk, G, S] @ keys [R, Hk, S, D] -> [C, Hk, G, D]`` (``R`` is ``C`` or 1)."""
    c, hk, g, s = p.shape
    if keys.shape[0] == 1 and c > 1:
        y = torch.matmul(p.transpose(0, 1).reshape(hk, c * g, s), keys[0])
        return y.view(hk, c, g, -1).transpose(0, 1)
    return torch.matmul(p, keys)


def masked(x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``x [C, Hk, G, S]`` with ``-inf`` where ``allowed [C, Hs, S]`` is False."""
    return x.masked_fill(~allowed.unsqueeze(2), float("-inf"))


def safe_max(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Max over ``dim`` (keepdim) with rows that are all ``-inf`` mapped to 0."""
    m = x.amax(dim, keepdim=True)
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the last dim (keepdim); ``-inf`` for empty rows."""
    m = safe_max(x)
    return m + torch.exp(x - m).sum(-1, keepdim=True).log()
