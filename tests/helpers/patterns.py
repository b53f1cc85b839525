"""Stress selections for planning, the attention backward and the indexer KL (the stress
patterns of MiniMax's own KL tests).

Every row holds ``k`` distinct block ids in ``[0, visible)``, ``visible = q // block +
base`` for query ``q`` of a segment whose keys start ``(base - 1) * block`` before its
queries (so every query sees at least ``base`` blocks). Their sizes are 4096
queries, ``base`` 256, ``k`` 16, 4 heads; tests on the CPU scale them down. These rows
are stress inputs, not indexer outputs: the local block is not necessarily last.

* ``recent``: the ``k`` newest visible blocks; ``spread``: ``k`` blocks evenly over all
  visible ones; ``random``: ``k`` random visible blocks.
* ``pool<N>``: ``k`` of ``N`` common blocks (spread over the first ``base``), walked with
  a stride coprime to ``N`` from a per-query offset: every block is selected by about
  ``k / N`` of the queries (``N = k``: all queries select the same blocks).
* ``hot<H>_tail<T>``: ``H`` blocks every query selects, plus ``T`` of its own (the local
  block for ``T = 1``, random ones otherwise).
* ``b0p99_local_<X>``: pattern ``X`` with the local block always present and block 0
  (an attention sink) selected by 99% of the queries; ``X`` in the patterns above or
  ``hot<H>`` (``H`` hot blocks, the rest random).
"""
from __future__ import annotations

import math
import random
from typing import List

import torch


def pattern_names(k: int, base: int) -> List[str]:
    """The pattern list for top-``k`` rows over at least ``base`` blocks."""
    pools = [k << i for i in range(8) if k << i <= base]
    hots = [h for h in (2, 4, 6, 8, 12, 14) if h <= k - 2]
    return (["recent", "spread"] + [f"pool{n}" for n in pools]
            + [f"hot{k - 1}_tail1", f"hot{k // 2}_tail{k - k // 2}", "random"]
            + [f"b0p99_local_{x}" for x in ["recent", "spread"] + [f"pool{n}" for n in pools
                                                                 if n <= 4 * k]]
            + [f"b0p99_local_hot{h}" for h in hots])


def _pool(n: int, base: int) -> List[int]:
    return [(i * base) // n for i in range(n)]


def _row(name: str, q: int, vis: int, k: int, base: int, rng: random.Random) -> List[int]:
    if name == "recent":
        return [vis - 1 - j for j in range(k)]
    if name == "spread":
        return [(j * vis) // k for j in range(k)]
    if name == "random":
        return rng.sample(range(vis), k)
    if name.startswith("pool"):
        n = int(name[4:])
        pool, stride = _pool(n, base), next(s for s in (7, 5, 3, 11, 13, 1)
                                            if math.gcd(s, n) == 1)
        return [pool[(q * 3 + j * stride) % n] for j in range(k)]
    if name.startswith("hot") and "_tail" in name:
        h, t = (int(x) for x in name[3:].split("_tail"))
        hot = _pool(h, base // 2)
        if t == 1:
            return hot + [vis - 1]
        return hot + rng.sample(range(base // 2, vis), t)
    if name.startswith("hot"):                          # hot<H>: H shared, the rest random
        hot = _pool(int(name[3:]), base)
        rest = [b for b in rng.sample(range(vis), k + len(hot)) if b not in hot]
        return hot + rest[:k - len(hot)]
    raise ValueError(f"unknown pattern {name!r}")


def topk_pattern(name: str, q_len: int, block: int, base: int, k: int, heads: int,
                 seed: int = 0) -> torch.Tensor:
    """``[heads, q_len, k]`` int32 rows of pattern ``name`` (queries see ``q // block +
    base`` blocks: use ``k_len = q_len + (base - 1) * block``)."""
    rng = random.Random(f"{name}/{seed}")
    out = torch.empty((heads, q_len, k), dtype=torch.int32)
    sink = name.startswith("b0p99_local_")
    inner = name[len("b0p99_local_"):] if sink else name
    for h in range(heads):
        for q in range(q_len):
            vis = q // block + base
            row = _row(inner, q + h, vis, k, base, rng)
            if sink:
                first = [vis - 1] + ([0] if rng.random() < 0.99 else [])
                row = first + [b for b in row if b not in first][:k - len(first)]
            assert len(row) == k == len(set(row)) and 0 <= min(row) and max(row) < vis, name
            out[h, q] = torch.tensor(row, dtype=torch.int32)
    return out
