"""Tune the KV-outer forward: kernel configs and partial-buffer budget at one length.

    python benchmarks/sweep_attention_fwd.py --length 128k

Prints one line per variant: attention time (planning + kernel + combine) per launch
config, then per partial-buffer budget.
"""
from __future__ import annotations

import argparse
import json

import torch

import msa.ops.attention.forward as fwd
from msa.cli import parse_lengths
from msa.varlen import Segments

from bench_prefill import BS, D, HKV, HQ, bench, selection, sparse_elements


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", default="128k")
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", default="4x4x2,4x4x3,4x4x1,4x8x2,2x4x2,8x4x2,8x8x3",
                    help="block_q x warps x stages, comma separated")
    ap.add_argument("--q-per-item", default="128,256,1024")
    ap.add_argument("--no-budget", action="store_true", help="skip the partial-budget sweep")
    args = ap.parse_args()
    T = parse_lengths(args.length)[0]
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(T, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
    k = torch.randn(T, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
    v = torch.randn(T, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
    seg = Segments([0], [T], [0], [T], T, T)
    topk = selection(T, "random", dev)
    flops = 4 * D * HQ * sparse_elements(T)
    ref, _ = fwd.sparse_attn_fwd(q, k, v, topk, seg, block_size=BS, scale=D ** -0.5)
    rows = []
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    for bq, warps, stages in configs:
        for qpi in (int(x) for x in args.q_per_item.split(",")):
            try:
                run = lambda: fwd.sparse_attn_fwd(q, k, v, topk, seg, block_size=BS,
                                                  scale=D ** -0.5, block_q=bq,
                                                  num_warps=warps, num_stages=stages,
                                                  q_per_item=qpi)
                out, _ = run()
                err = (out.float() - ref.float()).abs().max().item()
                ms = bench(run, warmup=25, rep=100, return_mode="median")
                rows.append(dict(block_q=bq, warps=warps, stages=stages, q_per_item=qpi,
                                 ms=ms, tflops=flops / ms / 1e9, err=err))
            except Exception as e:
                rows.append(dict(block_q=bq, warps=warps, stages=stages, q_per_item=qpi,
                                 error=repr(e)[:120]))
            print(json.dumps(rows[-1]), flush=True)
    for budget_gb in () if args.no_budget else (3, 6, 12):
        fwd.PARTIAL_BUDGET_BYTES = budget_gb << 30
        run = lambda: fwd.sparse_attn_fwd(q, k, v, topk, seg, block_size=BS, scale=D ** -0.5)
        ms = bench(run, warmup=25, rep=100, return_mode="median")
        rows.append(dict(budget_gb=budget_gb, ms=ms, tflops=flops / ms / 1e9))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(T=T, gpu=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
