"""Context-parallel MSA over ``torch.distributed`` (simple all-gather path).

The sequence (length ``T``, one document or several packed ones: ``cu_seqlens``) is cut
into ``2 * W`` equal chunks and sharded *zigzag*: rank ``r`` holds chunks ``r`` and
``2W - 1 - r`` (balanced causal work). Each rank all-gathers K, V and the index keys
(autograd-aware: the backward all-reduces the gradient and keeps the local slice), then
runs MSA for its query fragments (one per document a chunk touches) as varlen segments
that share each document's gathered KV prefix through ``fragment_indices``
(docs/semantics.md, "Segments").
Outputs, LSEs and gradients equal single-device MSA; the KL weight is divided by ``W`` so
the summed per-rank losses equal the single-device loss.

A sparse exchange of only the selected K/V blocks is not built: measured on 2 GPUs, every
remote block is selected by some query of a rank in prefill/training, so it would move
what the all-gather moves (docs/experiments.md).
"""
from __future__ import annotations

from dataclasses import replace
from typing import List

import torch
import torch.distributed as dist

from .config import MSAConfig
from .functional import msa_attention
from .ops.checks import check_config


def zigzag_chunks(world: int, rank: int) -> List[int]:
    """Chunk ids (of ``2 * world``) held by ``rank``."""
    return [rank, 2 * world - 1 - rank]


def zigzag_shard(x: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s zigzag shard of a full sequence ``x [T, ...]`` (T % 2W == 0)."""
    chunks = x.chunk(2 * world)
    return torch.cat([chunks[i] for i in zigzag_chunks(world, rank)])


class _GatherSequence(torch.autograd.Function):
    """All-gather zigzag shards ``[n, ...]`` into the full sequence ``[W * n, ...]``."""

    @staticmethod
    def forward(ctx, x, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        c = x.shape[0] // 2
        chunks = [None] * (2 * world)
        for r, p in enumerate(parts):
            a, b = zigzag_chunks(world, r)
            chunks[a], chunks[b] = p[:c], p[c:]
        ctx.group, ctx.world, ctx.rank, ctx.c = group, world, rank, c
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        chunks = grad.chunk(2 * ctx.world)
        a, b = zigzag_chunks(ctx.world, ctx.rank)
        return torch.cat([chunks[a], chunks[b]]), None


def gather_sequence(x: torch.Tensor, group=None) -> torch.Tensor:
    return _GatherSequence.apply(x, group)


def local_segments(total: int, world: int, rank: int, doc_bounds: List[int]):
    """Varlen metadata of rank ``rank``'s zigzag shard of a packed sequence of ``total``
    tokens whose documents start at ``doc_bounds`` (``[0, ..., total]``).

    Each local chunk is cut into fragments (one per document it touches); a fragment
    attends to its document's prefix up to its last query. Each touched document's
    prefix is packed once; its fragments share it through ``fragment_indices`` (a
    document crossing from the rank's first chunk to its second has one fragment in
    each, adjacent). Returns ``cu_q, cu_k, frag`` (python lists) and the packed KV as
    ranges ``[(start, end)]`` of rows of the full sequence.
    """
    c = total // (2 * world)
    cu_q, cu_k, frag, ranges = [0], [0], [], []
    doc_base = doc_first = last_doc = None
    for ch in zigzag_chunks(world, rank):
        lo, hi = ch * c, (ch + 1) * c
        for d in range(len(doc_bounds) - 1):
            d0, d1 = doc_bounds[d], doc_bounds[d + 1]
            q0, q1 = max(d0, lo), min(d1, hi)
            if q0 >= q1:
                continue
            if d != last_doc:                       # a new document: pack its prefix
                doc_base, doc_first, last_doc = cu_k[-1], len(frag), d
                ranges.append([d0, q1])
            ranges[-1][1] = q1                      # the prefix reaches this fragment
            cu_q.append(cu_q[-1] + q1 - q0)
            cu_k.append(doc_base + q1 - d0)
            frag.append(doc_first)
    return cu_q, cu_k, frag, [tuple(r) for r in ranges]


def context_parallel_msa(q, k, v, qi, ki, *, config: MSAConfig, group=None,
                         mode: str = "sparse", return_aux: bool = False,
                         cu_seqlens: torch.Tensor = None):
    """MSA on this rank's zigzag shard.

    Args:
        q ``[n, Hq, D]``, k, v ``[n, Hkv, D]``, qi ``[n, Hi, Di]``, ki ``[n, 1, Di]``: the
            local shard (``n = 2 * T / (2W)``: two chunks), as made by ``zigzag_shard``.
        cu_seqlens: optional ``[docs + 1]`` document boundaries of the *full* packed
            sequence (the same on every rank; read on the host once per call): queries
            attend within their document only. Default: one document.
    Returns:
        the local output ``[n, Hq, D]`` (and ``MSAAux`` with ``return_aux``).
    """
    config = check_config(config)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = q.shape[0]
    if n % 2 or any(t.shape[0] != n for t in (k, v, qi, ki)):
        raise ValueError(f"each rank needs two equal chunks of q/k/v/qi/ki, got lengths "
                         f"{[t.shape[0] for t in (q, k, v, qi, ki)]}")
    total = n * world
    if cu_seqlens is None:
        bounds = [0, total]
    else:
        bounds = [int(x) for x in torch.as_tensor(cu_seqlens).flatten().tolist()]
        if (len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total
                or any(b <= a for a, b in zip(bounds, bounds[1:]))):
            raise ValueError(f"cu_seqlens must rise strictly from 0 to the full length "
                             f"{total} (world {world} x local {n}), got {bounds[:8]}"
                             f"{'...' if len(bounds) > 8 else ''}")
    cu_q, cu_k, frag, ranges = local_segments(total, world, rank, bounds)
    end = max(e for _, e in ranges)                  # no rank needs KV past its last query
    k_all, v_all, ki_all = (gather_sequence(t, group)[:end] for t in (k, v, ki))
    if ranges != [(0, end)]:                         # pack the touched documents' prefixes
        rows = torch.cat([torch.arange(a, b, device=q.device) for a, b in ranges])
        k_all, v_all, ki_all = (t.index_select(0, rows) for t in (k_all, v_all, ki_all))
    i32 = dict(dtype=torch.int32, device=q.device)
    cfg = replace(config, kl_loss_coeff=config.kl_loss_coeff / world)
    return msa_attention(q, k_all, v_all, qi, ki_all, torch.tensor(cu_q, **i32),
                         torch.tensor(cu_k, **i32), fragment_indices=torch.tensor(frag, **i32),
                         config=cfg, mode=mode, return_aux=return_aux)
