"""Context-parallel MSA over ``torch.distributed`` (simple all-gather path).

The sequence (batch 1, length ``T``) is cut into ``2 * W`` equal chunks and sharded
*zigzag*: rank ``r`` holds chunks ``r`` and ``2W - 1 - r`` (balanced causal work). Each rank
all-gathers K, V and the index keys (autograd-aware: the backward all-reduces the
gradient and keeps the local slice), then runs MSA for its two query chunks as two
varlen segments that share the gathered KV rows through ``fragment_indices`` (spec 3).
Outputs, LSEs and gradients equal single-device MSA; the KL weight is divided by ``W`` so
the summed per-rank losses equal the single-device loss.

A sparse exchange of only the selected K/V blocks is not built: measured on 2 GPUs, every
remote block is selected by some query of a rank in prefill/training, so it would move
what the all-gather moves (docs/benchmarks.md, "Context parallelism").
"""
from __future__ import annotations

from dataclasses import replace
from typing import List

import torch
import torch.distributed as dist

from .config import MSAConfig
from .functional import msa_attention


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


def context_parallel_msa(q, k, v, qi, ki, *, config: MSAConfig, group=None,
                         mode: str = "sparse", return_aux: bool = False):
    """MSA on this rank's zigzag shard.

    Args:
        q ``[n, Hq, D]``, k, v ``[n, Hkv, D]``, qi ``[n, Hi, Di]``, ki ``[n, 1, Di]``: the
            local shard (``n = 2 * T / (2W)``: two chunks), as made by ``zigzag_shard``.
    Returns:
        the local output ``[n, Hq, D]`` (and ``MSAAux`` with ``return_aux``).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = q.shape[0]
    if n % 2 or any(t.shape[0] != n for t in (k, v, qi, ki)):
        raise ValueError(f"each rank needs two equal chunks of q/k/v/qi/ki, got lengths "
                         f"{[t.shape[0] for t in (q, k, v, qi, ki)]}")
    c = n // 2
    end_b = (2 * world - rank) * c                   # KV needed by the later chunk
    k_all, v_all, ki_all = (gather_sequence(t, group)[:end_b] for t in (k, v, ki))
    dev = q.device
    cu_q = torch.tensor([0, c, 2 * c], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, (rank + 1) * c, end_b], dtype=torch.int32, device=dev)
    frag = torch.tensor([0, 0], dtype=torch.int32, device=dev)
    cfg = replace(config, kl_loss_coeff=config.kl_loss_coeff / world)
    return msa_attention(q, k_all, v_all, qi, ki_all, cu_q, cu_k, fragment_indices=frag,
                         config=cfg, mode=mode, return_aux=return_aux)
