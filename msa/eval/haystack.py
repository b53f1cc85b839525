"""Random haystacks with one needle, for the demo and the NIAH grid.

``make_haystack`` draws keys / values / index keys of ``T`` tokens and ``n_queries``
queries (the last ``n_queries`` positions); the needle token at ``needle`` gets a fixed
main-branch and index-branch direction, and the last ``probe`` queries point the same
way in both branches, so both the indexer and the attention should find it.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..config import MSAConfig


def make_haystack(T: int, cfg: MSAConfig, needle: int, *, n_queries: int, probe: int,
                  device="cpu", dtype=torch.float32, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """``(q [n, Hq, D], k [T, Hkv, D], v [T, Hkv, D], qi [n, Hi, Di], ki [T, 1, Di])``."""
    if not 0 <= needle < T or not 1 <= probe <= n_queries <= T:
        raise ValueError(f"need 0 <= needle < T and 1 <= probe <= n_queries <= T, got "
                         f"needle={needle}, probe={probe}, n_queries={n_queries}, T={T}")
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    k, v = rnd(T, cfg.num_kv_heads, cfg.head_dim), rnd(T, cfg.num_kv_heads, cfg.head_dim)
    ki = rnd(T, 1, cfg.index_dim)
    q = rnd(n_queries, cfg.num_heads, cfg.head_dim)
    qi = rnd(n_queries, cfg.index_heads, cfg.index_dim)
    u = F.normalize(rnd(cfg.index_dim).float(), dim=0) * cfg.index_dim ** 0.5
    w = F.normalize(rnd(cfg.head_dim).float(), dim=0) * cfg.head_dim ** 0.5
    ki[needle, 0] = u.to(dtype)
    qi[n_queries - probe:] = u.to(dtype)
    k[needle] = (2 * w).to(dtype)
    q[n_queries - probe:] = (2 * w).to(dtype)
    return q, k, v, qi, ki
