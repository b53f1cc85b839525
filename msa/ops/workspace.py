"""Workspace of the KV-outer kernels: how many queries one chunk of a plan holds, so
that each consumer's per-chunk buffers (forward partials, backward ``dQ`` slots, the
selected LSE's partials, the indexer KL's rows) stay within a fixed budget whatever the
sequence length, and how many queries one work item holds (docs/benchmarks.md,
"Workspace"). ``MSA_WORKSPACE_SCALE`` scales every budget.
"""
from __future__ import annotations

import math
import os

import torch


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
