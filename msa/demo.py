"""Needle-in-a-haystack at attention level: does MSA find and read the needle?

A random haystack of ``T`` keys/values (main and index branch) hides one needle token at
a given depth. The last ``probe`` queries (the "question") are aligned with the needle in
both branches. MSA runs a full causal prefill of all ``T`` queries (chunked, so a progress
bar can follow it); dense causal attention runs the same prefill. Reported per length:
whether the indexer selected the needle's block for every question query and head, whether
the question's output retrieved the needle value (cosine > 0.9), the output error vs dense
attention on the question rows, and time and peak memory of MSA and dense.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ._meter import PeakMemory, Progress
from .config import MSAConfig
from .eval.haystack import make_haystack
from .functional import msa_indexer, msa_sparse_attention
from .ops.dense import dense_attention
from .varlen import make_segments

CPU_SHAPE = dict(num_heads=8, num_kv_heads=2, head_dim=64, block_size=128, topk=16)


@dataclass
class NeedleResult:
    length: int
    depth: float
    needle_selected: bool
    retrieved: bool
    cosine: float
    max_err_vs_dense: float
    msa_seconds: float
    dense_seconds: float
    msa_peak_mb: float
    dense_peak_mb: float


def _chunks(T: int, n: int):
    step = -(-T // n)
    return [(s, min(T, s + step)) for s in range(0, T, step)]


def _prefill(fn, T, nchunks, label, progress, device):
    """Run ``fn(start, end)`` over query chunks (chunked prefill); returns (outs, sec, MB)."""
    outs = []
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with PeakMemory(device) as mem, Progress(nchunks, label, progress) as bar:
        sync()
        t0 = time.perf_counter()
        for s, e in _chunks(T, nchunks):
            outs.append(fn(s, e))
            bar.update()
        sync()
        sec = time.perf_counter() - t0
    return outs, sec, mem.peak / 2 ** 20


def run_needle(T: int, cfg: MSAConfig, depth: float = 0.37, probe: int = 16,
               device="cpu", dtype=torch.float32, nchunks: int = 16, progress: bool = True,
               seed: int = 0) -> NeedleResult:
    """One needle test at length ``T`` (see module docstring)."""
    last_block_start = (T - probe) // cfg.block_size * cfg.block_size
    needle = min(int(depth * T), max(0, last_block_start - 1))
    x = dict(zip(("q", "k", "v", "qi", "ki"),
                 make_haystack(T, cfg, needle, n_queries=T, probe=probe, device=device,
                               dtype=dtype, seed=seed)))
    i32 = dict(dtype=torch.int32, device=device)

    def varlen(s, e):
        return torch.tensor([0, e - s], **i32), torch.tensor([0, e], **i32)

    def msa_chunk(s, e):
        cu_q, cu_k = varlen(s, e)
        topk = msa_indexer(x["qi"][s:e], x["ki"][:e], cu_q, cu_k, block_size=cfg.block_size,
                           topk=cfg.topk, softmax_scale=cfg.index_scale)
        out = msa_sparse_attention(x["q"][s:e], x["k"][:e], x["v"][:e], topk, cu_q, cu_k,
                                   block_size=cfg.block_size, softmax_scale=cfg.scale)
        return out, topk[:, max(0, T - probe - s):]

    def dense_chunk(s, e):
        cu_q, cu_k = varlen(s, e)
        seg = make_segments(e - s, e, cu_q, cu_k)
        return dense_attention(x["q"][s:e], x["k"][:e], x["v"][:e], seg, scale=cfg.scale)

    with torch.no_grad():
        m_outs, m_sec, m_mb = _prefill(msa_chunk, T, nchunks, "msa", progress, device)
        d_outs, d_sec, d_mb = _prefill(dense_chunk, T, nchunks, "dense", progress, device)
    out = torch.cat([o for o, _ in m_outs])[T - probe:].float()
    topk = torch.cat([t for _, t in m_outs], dim=1)                    # [Hi, probe, K]
    dense = torch.cat(d_outs)[T - probe:].float()
    selected = bool((topk == needle // cfg.block_size).any(-1).all())
    v_needle = x["v"][needle].float().repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 0)
    cos = F.cosine_similarity(out, v_needle.unsqueeze(0), dim=-1).min().item()
    return NeedleResult(T, depth, selected, cos > 0.9, cos,
                        (out - dense).abs().max().item(), m_sec, d_sec, m_mb, d_mb)


def main(lengths, device: str = "cpu", depth: float = 0.37, dtype: str = "auto",
         progress: bool = True, json_path=None) -> list:
    """Run the demo over ``lengths`` and print a table; returns the results."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    cfg = MSAConfig() if dev.type == "cuda" else MSAConfig(**CPU_SHAPE)
    dt = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    print(f"MSA needle-in-a-haystack demo on {dev} ({str(dt).replace('torch.', '')}): "
          f"Hq={cfg.num_heads} Hkv={cfg.num_kv_heads} D={cfg.head_dim} Hi={cfg.index_heads} "
          f"block={cfg.block_size} top-k={cfg.topk}, needle at depth {depth:.2f}")
    header = (f"{'T':>8} {'selected':>8} {'retrieved':>9} {'cos':>6} {'err vs dense':>12} "
              f"{'msa s':>8} {'dense s':>8} {'msa MB':>8} {'dense MB':>9}")
    print(header)
    results = []
    for T in lengths:
        if dev.type == "cuda":                  # compile the kernels outside the timing
            run_needle(T, cfg, depth, device=dev, dtype=dt, progress=False)
        r = run_needle(T, cfg, depth, device=dev, dtype=dt, progress=progress)
        results.append(r)
        print(f"{T:>8} {str(r.needle_selected):>8} {str(r.retrieved):>9} {r.cosine:6.3f} "
              f"{r.max_err_vs_dense:12.2e} {r.msa_seconds:8.2f} {r.dense_seconds:8.2f} "
              f"{r.msa_peak_mb:8.0f} {r.dense_peak_mb:9.0f}", flush=True)
    if dev.type == "cpu":
        print("On the CPU msa runs its exact PyTorch reference, written to be checked, not to "
              "be fast;\nthe GPU kernels' times against dense attention are in "
              "docs/benchmarks.md.")
    if json_path:
        import json
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return results
