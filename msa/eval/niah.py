"""Kernel-level needle-in-a-haystack grid: length x depth.

For each (length ``T``, depth ``d``) a random haystack of keys/values (main and index
branch) hides one needle token at position ``d * (T - probe - block)``; the last
``probe`` queries ask for it (their q / index q are aligned with the needle's k / index k).
Only the probe queries are computed (as a chunked prefill over the whole context), so
the grid reaches 1M tokens on a CPU. Per cell:

* ``selected``: share of (probe query, index head) rows whose top-k holds the needle block;
* ``recall``: mean share of the dense attention probability mass (per probe query and
  query head) that falls inside the selected blocks;
* ``max_err``: max abs difference of MSA and dense attention outputs on the probe rows;
* ``cosine``: min cosine of the probe outputs with the needle value (retrieval).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F

from .._meter import Progress
from ..config import MSAConfig
from ..functional import msa_indexer, msa_sparse_attention
from ..ops.dense import dense_attention
from ..varlen import Segments
from .haystack import make_haystack
from .plots import grid_of, heatmaps, require_matplotlib


@dataclass
class Cell:
    length: int
    depth: float
    selected: float
    recall: float
    max_err: float
    cosine: float
    seconds: float


def _needle_position(T: int, depth: float, probe: int, block_size: int) -> int:
    span = max(1, T - probe - block_size)
    return min(int(depth * span), span - 1) if T > probe + block_size else 0


def block_mass(q, k, seg: Segments, cfg: MSAConfig) -> torch.Tensor:
    """Dense causal attention mass per key block: ``[probe, Hq, ceil(T / block)]`` (rows
    sum to 1). q ``[probe, Hq, D]`` are the last ``probe`` of the ``T`` keys' positions."""
    hq, hkv, bs = cfg.num_heads, cfg.num_kv_heads, cfg.block_size
    g = hq // hkv
    T, probe = seg.k_len[0], seg.q_len[0]
    pos = torch.arange(T - probe, T, device=q.device)
    lse = torch.full((probe, hq), float("-inf"), device=q.device)
    mass = torch.zeros(probe, hq, -(-T // bs), device=q.device)
    chunk = max(1024, (1 << 24) // (hq * q.shape[-1])) // bs * bs   # whole blocks per step
    for pass_ in range(2):                                 # 1: LSE, 2: mass per block
        for t0 in range(0, T, chunk):
            kk = k[t0:t0 + chunk].float().repeat_interleave(g, 1)        # [n, Hq, D]
            x = torch.einsum("phd,nhd->phn", q.float(), kk) * cfg.scale
            t = torch.arange(t0, t0 + kk.shape[0], device=q.device)
            x = x.masked_fill(t.view(1, 1, -1) > pos.view(-1, 1, 1), float("-inf"))
            if pass_ == 0:
                lse = torch.logaddexp(lse, torch.logsumexp(x, -1))
                continue
            p = torch.exp(x - lse.unsqueeze(-1))
            mass.index_add_(2, t0 // bs + torch.arange(p.shape[-1], device=q.device) // bs,
                            p)
    return mass


def _check_mass(mass: torch.Tensor) -> None:
    if mass.dim() != 3:
        raise ValueError(f"mass must be a block_mass [probe, Hq, blocks], got shape "
                         f"{tuple(mass.shape)}")


def dense_mass(q, k, topk, seg: Segments, cfg: MSAConfig) -> float:
    """Mean share of dense causal attention mass inside the selected blocks (``topk``
    ``[Hs, probe, K]``, -1 padded)."""
    return mass_inside(block_mass(q, k, seg, cfg), topk)


def mass_inside(mass: torch.Tensor, topk: torch.Tensor) -> float:
    """:func:`dense_mass` from a :func:`block_mass` ``[probe, Hq, blocks]``."""
    _check_mass(mass)
    hq, nb = mass.shape[1], mass.shape[2]
    if topk.dim() != 3 or topk.shape[1] != mass.shape[0] or hq % topk.shape[0]:
        raise ValueError(f"topk must be [Hs, probe={mass.shape[0]}, K] with Hs dividing "
                         f"Hq={hq}, got {tuple(topk.shape)}")
    if topk.numel() and (topk.min() < -1 or topk.max() >= nb):
        raise IndexError(f"topk block ids must lie in [-1, {nb - 1}], got "
                         f"[{int(topk.min())}, {int(topk.max())}]")
    sel = topk.transpose(0, 1).repeat_interleave(hq // topk.shape[0], 1)    # [p, Hq, K]
    inside = torch.zeros(*mass.shape[:2], nb + 1, dtype=torch.bool, device=mass.device)
    inside.scatter_(2, torch.where(sel >= 0, sel, nb), True)     # padding -> extra column
    return (mass * inside[..., :nb]).sum(-1).mean().item()


def oracle_mass(q, k, seg: Segments, cfg: MSAConfig, num_groups: int) -> float:
    """The best :func:`dense_mass` any selection under MSA's rule reaches: per query and
    group of ``Hq / num_groups`` heads sharing one selection, the local block plus the
    ``topk - 1`` other causal blocks of largest group-mean dense mass."""
    return best_mass(block_mass(q, k, seg, cfg), seg, cfg, num_groups)


def best_mass(mass: torch.Tensor, seg: Segments, cfg: MSAConfig, num_groups: int) -> float:
    """:func:`oracle_mass` from a :func:`block_mass` ``[probe, Hq, blocks]``."""
    _check_mass(mass)
    probe, hq, nb = mass.shape
    if num_groups < 1 or hq % num_groups:
        raise ValueError(f"num_groups must divide Hq={hq}, got {num_groups}")
    T = seg.k_len[0]
    local = torch.arange(T - probe, T, device=mass.device) // cfg.block_size       # [p]
    gm = mass.view(probe, num_groups, hq // num_groups, nb).mean(2)
    blocks = torch.arange(nb, device=mass.device)
    ranked = gm.masked_fill((blocks.view(1, 1, -1) >= local.view(-1, 1, 1)), -1.0)
    top = ranked.topk(min(cfg.topk - 1, nb), dim=-1)
    keep = torch.zeros_like(gm, dtype=torch.bool)
    keep.scatter_(2, top.indices, top.values >= 0)
    keep.scatter_(2, local.view(-1, 1, 1).expand(-1, num_groups, 1), True)
    keep = keep.repeat_interleave(hq // num_groups, 1)
    return (mass * keep).sum(-1).mean().item()


def as_fp8_cache(k, v, ki, qi, which: str):
    """What scoring and attention see of ``k, v`` (``which="kv"``) or ``k, v, ki``
    (``"all"``) held by an FP8 cache: e4m3 rows with one scale each, dequantized
    (``msa.ops.quant``); e4m3 index keys are scored against e4m3 index queries, so
    ``"all"`` quantizes ``qi`` as well (docs/semantics.md). Returns ``k, v, ki, qi``."""
    from ..ops.quant import fake_quantize

    def fq(x):
        return fake_quantize(x).to(x.dtype)
    k, v = (fq(k), fq(v)) if which != "none" else (k, v)
    return (k, v, fq(ki), fq(qi)) if which == "all" else (k, v, ki, qi)


def run_cell(T: int, depth: float, cfg: MSAConfig, *, probe: int = 16, device="cpu",
             dtype=torch.float32, seed: int = 0, fp8_cache: str = "none",
             index_precision: str = None) -> Cell:
    """One (length, depth) cell; ``fp8_cache``: the context's K/V (``"kv"``) or K/V and
    index keys (``"all"``) as an FP8 cache holds them; the needle's value compared is the
    unquantized one. ``index_precision``: the selection rule (default ``cfg``'s;
    ``"int4"``, the decode scan of an int4 copy, by the reference)."""
    rule = index_precision or cfg.index_precision
    t_start = time.perf_counter()
    needle = _needle_position(T, depth, probe, cfg.block_size)
    q, k, v0, qi, ki = make_haystack(T, cfg, needle, n_queries=probe, probe=probe,
                                     device=device, dtype=dtype, seed=seed)
    k, v, ki, qi = as_fp8_cache(k, v0, ki, qi, fp8_cache)
    i32 = dict(dtype=torch.int32, device=device)
    cu_q, cu_k = torch.tensor([0, probe], **i32), torch.tensor([0, T], **i32)
    with torch.no_grad():
        topk = msa_indexer(qi, ki, cu_q, cu_k, block_size=cfg.block_size, topk=cfg.topk,
                           softmax_scale=cfg.index_scale, index_precision=rule,
                           backend="reference" if rule == "int4" else "auto")
        out = msa_sparse_attention(q, k, v, topk, cu_q, cu_k, block_size=cfg.block_size,
                                   softmax_scale=cfg.scale).float()
        seg = Segments([0], [probe], [0], [T], probe, T)
        dense = dense_attention(q, k, v, seg, scale=cfg.scale).float()
        recall = dense_mass(q, k, topk.long(), seg, cfg)
    selected = (topk == needle // cfg.block_size).any(-1).float().mean().item()
    vn = v0[needle].float().repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 0)
    cos = F.cosine_similarity(out, vn.unsqueeze(0), dim=-1).min().item()
    return Cell(T, depth, selected, recall, (out - dense).abs().max().item(), cos,
                time.perf_counter() - t_start)


def run_grid(lengths: Sequence[int], depths: Sequence[float], cfg: MSAConfig, *,
             device="cpu", dtype=torch.float32, progress=True,
             fp8_cache: str = "none", index_precision: str = None) -> List[Cell]:
    cells = []
    with Progress(len(lengths) * len(depths), "niah", progress) as bar:
        for T in lengths:
            for d in depths:
                cells.append(run_cell(T, d, cfg, device=device, dtype=dtype,
                                      seed=int(T + 1000 * d), fp8_cache=fp8_cache,
                                      index_precision=index_precision))
                bar.update()
    return cells


def heatmap(cells: List[Cell], path: str, field: str = "selected") -> None:
    """PNG heatmap of ``field`` over (depth, length); needs matplotlib."""
    panel = grid_of(cells, field, "depth", "length")
    panel.update(rows=[f"{d:.2f}" for d in panel["rows"]],
                 cols=[f"{L // 1024}K" for L in panel["cols"]], xlabel="context length",
                 ylabel="needle depth", title=f"MSA kernel-level NIAH: {field}")
    heatmaps([panel], path)


def main(lengths, depths, device="cpu", json_path=None, png_path=None, progress=True,
         preset="auto", index_precision="input", fp8_cache="none") -> List[Cell]:
    if png_path:
        require_matplotlib()
    dev = torch.device(device)
    use_m3 = preset == "m3" or (preset == "auto" and dev.type == "cuda")
    layer_rule = "input" if index_precision == "int4" else index_precision   # decode only
    cfg = MSAConfig(index_precision=layer_rule) if use_m3 else MSAConfig(
        num_heads=8, num_kv_heads=2, head_dim=64, block_size=128, topk=16,
        index_precision=layer_rule)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cells = run_grid(lengths, depths, cfg, device=dev, dtype=dtype, progress=progress,
                     fp8_cache=fp8_cache, index_precision=index_precision)
    print(f"{'T':>9} {'depth':>6} {'selected':>8} {'recall':>7} {'max err':>9} {'cos':>6} "
          f"{'s':>6}")
    for c in cells:
        print(f"{c.length:>9} {c.depth:6.2f} {c.selected:8.2f} {c.recall:7.3f} "
              f"{c.max_err:9.2e} {c.cosine:6.3f} {c.seconds:6.1f}")
    if json_path:
        meta = dict(device=str(dev), preset="m3" if use_m3 else "cpu-small", fp8_cache=fp8_cache,
                    index_precision=index_precision,
                    config=asdict(cfg), dtype=str(dtype), torch=torch.__version__,
                    date=time.strftime("%Y-%m-%d"))
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, cells=[asdict(c) for c in cells]), f, indent=1)
    if png_path:
        heatmap(cells, png_path)
    return cells

