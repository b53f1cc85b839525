"""Tune the KV-outer backward (and time the indexer-KL backward) at one length.

    python benchmarks/sweep_attention_bwd.py --length 64k

MSA shape, bf16, random selection. One line per launch config of ``sparse_attn_bwd``
(key sub-block, query tokens per tile, warps, stages, queries per item): kernel time
(planning included), useful TFLOP/s (2.5x the forward FLOPs) and the max error of dq
against the default config; then the deterministic mode and the KL backward.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton

from msa.cli import parse_lengths
from msa.ops.attention.backward import sparse_attn_bwd
from msa.ops.attention.forward import sparse_attn_fwd
from msa.ops.indexer.triton import selected_lse
from msa.ops.kl.triton import indexer_kl_bwd
from msa.varlen import Segments

from bench_prefill import BS, D, HKV, HQ, bench, planted_topics, selection, sparse_elements


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", default="64k")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", choices=["attention", "kl", "launch"], default=None)
    args = ap.parse_args()
    T = parse_lengths(args.length)[0]
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q, dout = (torch.randn(T, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
               for _ in range(2))
    k, v = (torch.randn(T, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
            for _ in range(2))
    seg = Segments([0], [T], [0], [T], T, T)
    topk = selection(T, "random", dev)
    flops = 2.5 * 4 * D * HQ * sparse_elements(T)
    out, lse = sparse_attn_fwd(q, k, v, topk, seg, block_size=BS, scale=D ** -0.5)
    kw = dict(block_size=BS, scale=D ** -0.5)
    ref = [x.float() for x in sparse_attn_bwd(q, k, v, topk, seg, out, lse, dout, **kw)]
    rows = []

    def timed(name, fn, **info):
        try:
            res = fn()
            err = max((a.float() - b).abs().max().item() for a, b in zip(res, ref)) \
                if name != "kl" else res[0].item()  # kl: the loss value
            ms = bench(fn, warmup=10, rep=200, return_mode="median")
            rows.append(dict(variant=name, **info, ms=ms, err=err,
                             tflops=None if name == "kl" else flops / ms / 1e9))
        except Exception as e:                      # a config that does not compile
            rows.append(dict(variant=name, **info, error=repr(e)[:160]))
        print(json.dumps(rows[-1]), flush=True)

    attn_configs = [] if args.only == "kl" else [
        (128, 4, 8, 3), (128, 4, 8, 2), (128, 2, 8, 3), (128, 2, 8, 2), (128, 1, 8, 3),
        (128, 8, 8, 2), (128, 4, 4, 3), (64, 4, 4, 3), (64, 8, 8, 2), (128, 4, 16, 2)]
    for bn, bq, warps, stages in attn_configs:
        cfg = dict(block_n=bn, block_q=bq, num_warps=warps, num_stages=stages)
        timed("fast", lambda: sparse_attn_bwd(q, k, v, topk, seg, out, lse, dout, **kw,
                                              **cfg), **cfg)
    for qpi in (128, 512) if attn_configs and args.only != "launch" else ():
        timed("fast", lambda: sparse_attn_bwd(q, k, v, topk, seg, out, lse, dout, **kw,
                                              q_per_item=qpi), q_per_item=qpi)
    for qpi in (256, 1024) if attn_configs and args.only != "launch" else ():
        timed("deterministic", lambda: sparse_attn_bwd(
            q, k, v, topk, seg, out, lse, dout, **kw, deterministic=True, q_per_item=qpi),
            q_per_item=qpi)
    qi, ki = planted_topics(T, dev, seed=T)
    ilse = selected_lse(qi, ki, topk, seg, block_size=BS, scale=D ** -0.5)
    kl_configs = [(16, 8, 1), (8, 8, 1), (16, 8, 2), (32, 8, 1), (16, 4, 1), (16, 16, 1)]
    for bt, warps, stages in [] if args.only == "attention" else kl_configs:
        cfg = dict(block_t=bt, num_warps=warps, num_stages=stages)
        timed("kl", lambda: indexer_kl_bwd(q, k, lse, qi, ki, ilse, topk, seg, **kw,
                                           index_scale=D ** -0.5, **cfg), **cfg)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(T=T, gpu=torch.cuda.get_device_name(), triton=triton.__version__,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
