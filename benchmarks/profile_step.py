"""GPU time per kernel of one sparse-attention step, from the PyTorch profiler.

    python benchmarks/profile_step.py --length 128k --mode train

MSA shape, bf16, random selection (``bench_prefill.selection``). ``train``: Triton forward
+ backward through the public API; ``prefill``: the forward only; ``e2e``: indexer top-k
(planted-topic index inputs) + forward. Prints the kernels by
total GPU time (one warm step profiled) and writes them as JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

import msa
from msa.cli import parse_lengths
from bench_prefill import D, HKV, HQ, planted_topics, run_meta, selection


def make_step(T: int, mode: str):
    """One step at the MSA shape through the public API (see the module docstring)."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(T, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(T, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
            for _ in range(2))
    leaves = [x.requires_grad_(mode == "train") for x in (q, k, v)]
    topk = selection(T, "random", dev)
    cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
    dout = torch.randn_like(q)
    qi, ki = planted_topics(T, dev, seed=T)

    def step():
        sel = topk
        if mode == "e2e":
            sel = msa.msa_indexer(qi, ki, cu, cu, topk=16, backend="triton")
        out = msa.msa_sparse_attention(*leaves, sel, cu, cu, backend="triton")
        if mode == "train":
            torch.autograd.grad(out, leaves, dout)

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", default="128k")
    ap.add_argument("--mode", choices=["train", "prefill", "e2e"], default="train")
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    T = parse_lengths(args.length)[0]
    step = make_step(T, args.mode)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = getattr(e, "self_cuda_time_total", 0) if us is None else us
        if us > 0:                                  # kernels (no double-counted parents)
            rows.append(dict(kernel=e.key[:90], calls=e.count, ms=us / 1e3))
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    for r in rows[:25]:
        print(f"{r['ms']:9.2f} ms {r['calls']:5d}x  {r['kernel']}")
    print(f"{total:9.2f} ms total GPU time ({args.mode}, T={T})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=run_meta(args.commit), T=T, mode=args.mode,
                           total_ms=total, kernels=rows), f, indent=1)


if __name__ == "__main__":
    main()
