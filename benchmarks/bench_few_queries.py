"""Query-major vs KV-outer forward for few queries over a long context (crossover).

    python benchmarks/bench_few_queries.py --context 131072

MSA shape (Hq=64, Hkv=4, D=128, block 128, top-16), bf16, one sequence whose last
``n`` tokens are the queries (chunked prefill / multi-token decode), random selection
with the local block. Prints ms of both kernels per ``n`` and their max difference.
"""
from __future__ import annotations

import argparse
import json

import torch

from msa.ops.attention.forward import sparse_attn_fwd
from msa.varlen import Segments

from bench_prefill import BS, D, HKV, HQ, bench, selection


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    T = args.context
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(T, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
    v = torch.randn(T, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
    full = selection(T, "random", dev)
    rows = []
    for n in (1, 4, 16, 64, 256, 1024, 4096):
        q = torch.randn(n, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
        seg = Segments([0], [n], [0], [T], n, T)
        topk = full[:, T - n:].contiguous()
        r = dict(n=n)
        outs = {}
        for name, qm in (("query_major", True), ("kv_outer", False)):
            fn = lambda: sparse_attn_fwd(q, k, v, topk, seg, block_size=BS, scale=D ** -0.5,
                                         query_major=qm)
            outs[name] = fn()[0]
            r[name + "_ms"] = bench(fn, warmup=25, rep=100,
                                                      return_mode="median")
        r["max_abs_diff"] = (outs["query_major"].float() - outs["kv_outer"].float()).abs().max().item()
        rows.append(r)
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), context=T, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
