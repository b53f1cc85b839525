"""The benchmarks' inputs, and what the selection the indexer makes over them looks like.

``--selection random`` (the default): q, k, v, qi, ki i.i.d. Gaussian; the indexer's
top-k is then uniform over each query's causal blocks, the worst case for the KV-outer
kernels (a block's queries are scattered over the sequence, neighbouring queries share
nothing but their own block).

``--selection structured``: the same q, k, v; index keys and queries with the three
features of selections in text (docs/benchmarks.md gives their measured shares):

* locality: every index key carries a component that drifts along the sequence (a
  moving sum of Gaussian steps over ``DRIFT_KEYS`` tokens), of which each query holds a
  part (``LOCAL``), so nearby blocks score higher;
* topics shared by neighbours: each index head's query adds its own drift over
  ``DRIFT_QUERIES`` tokens, so the far blocks a query picks stay picked by the queries
  around it and change every few hundred tokens;
* an attention sink: the first block's keys and every query share one direction.

Shapes: ``q [T, Hq, D]``, ``k, v [T, Hkv, D]``, ``qi [T, Hi, Di]``, ``ki [T, 1, Di]``.
"""
from __future__ import annotations

import torch

from . import SELECTIONS

DRIFT_KEYS = 4096          # tokens over which the keys' shared component drifts
DRIFT_QUERIES = 256        # tokens over which each query head's own component drifts
LOCAL = 0.3                # share of the key drift a query holds
SINK = 3.0                 # the sink direction's weight in the first block's keys
SINK_QUERY = 0.15          # ... and in every query


def inputs(T: int, cfg, seed: int = 0, selection: str = "random", device="cuda"):
    """bf16 ``(q, k, v, qi, ki)`` on ``device`` for ``T`` tokens of shape ``cfg``."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=g, dtype=torch.bfloat16)
    q, k, v = (rnd(T, cfg.num_heads, cfg.head_dim), rnd(T, cfg.num_kv_heads, cfg.head_dim),
               rnd(T, cfg.num_kv_heads, cfg.head_dim))
    if selection == "random":
        return q, k, v, rnd(T, cfg.index_heads, cfg.index_dim), rnd(T, 1, cfg.index_dim)
    qi, ki = _structured_index(T, cfg.index_heads, cfg.index_dim, cfg.block_size, g)
    return q, k, v, qi, ki


def _drift(T: int, heads: int, dim: int, window: int, g) -> torch.Tensor:
    """``[T, heads, dim]`` fp32: at ``t`` the sum of the ``window`` unit Gaussian steps
    ending at ``t``, over ``sqrt(window)`` (unit variance; correlation ``1 - d / window``
    between tokens ``d`` apart)."""
    steps = torch.randn(T + window, heads, dim, device=g.device, generator=g,
                        dtype=torch.float64)
    s = torch.nn.functional.pad(torch.cumsum(steps, 0), (0, 0, 0, 0, 1, 0))
    return ((s[window:window + T] - s[:T]) / window ** 0.5).float()


def _structured_index(T: int, hi: int, di: int, block_size: int, g):
    keys = _drift(T, 1, di, DRIFT_KEYS, g)
    ki = keys + torch.randn(T, 1, di, device=g.device, generator=g)
    sink = torch.randn(di, device=g.device, generator=g)
    sink = sink * (di ** 0.5 / sink.norm())
    ki[:block_size] += SINK * sink
    qi = LOCAL * keys + _drift(T, hi, di, DRIFT_QUERIES, g) + SINK_QUERY * sink
    return qi.to(torch.bfloat16), ki.to(torch.bfloat16)


def selection_stats(topk: torch.Tensor, block_size: int, near: int = 16,
                    first: int = 0) -> dict:
    """What a selection ``topk [Hs, T, K]`` (valid ids first, ``-1`` after; row ``t`` the
    query at position ``first + t``) looks like: the share of the selected blocks that lie
    within ``near`` blocks of their query's own (the own one included), and over the rows
    with ``K`` blocks the share that select the first block and the share of a row's
    blocks the next query's row selects too."""
    hs, T, K = topk.shape
    own = ((first + torch.arange(T, device=topk.device)) // block_size).view(1, T, 1)
    valid = topk >= 0
    full = valid.all(-1)                                         # [Hs, T]
    near_share = ((own - topk <= near) & valid).sum() / valid.sum()
    sink = ((topk == 0).any(-1) & full).sum() / full.sum().clamp(min=1)
    a, b = torch.sort(topk[:, :-1], -1).values, torch.sort(topk[:, 1:], -1).values
    both = full[:, :-1] & full[:, 1:]
    # ids in common of two sorted rows: every id of a found in b
    pos = torch.searchsorted(b.contiguous(), a.contiguous()).clamp(max=K - 1)
    common = (b.gather(-1, pos) == a).sum(-1)
    shared = (common * both).sum() / (both.sum() * K).clamp(min=1)
    return dict(selection_near_share=near_share.item(), selection_sink_share=sink.item(),
                selection_next_query_share=shared.item())
