"""Decode step latency of one layer: fused paged MSA decoder vs dense decode (GPU).

    python benchmarks/bench_decode.py --out decode.json

MSA shape (Hq=64, Hkv=4, D=128, 4 index heads x 128 over one shared index-key head,
page = block = 128, top-16), bf16. For batch B x context T x Q query tokens per request:

* ours: ``PagedDecoder.run`` (indexer over all cached index keys + top-k + attention over
  the selected pages) captured in a CUDA graph, replayed; pages randomly permuted;
* dense: ``scaled_dot_product_attention`` over the same K/V stored contiguously
  ``[B, Hkv, T, D]`` (the group's query heads x the Q drafts as query rows of their KV
  head; causal mask among the drafts), also replayed from a CUDA graph; and the dense
  HBM floor (all K/V bytes over the copy bandwidth), the bound no dense kernel beats;
* HBM floor: bytes of all index keys plus the distinct selected K/V pages, over the
  copy bandwidth measured in the same run.

Shapes with more than ``--max-tokens`` cached tokens in total are skipped (memory). At
128K and up, batch 1/Q 1 and batch 64/Q 8 also time index-kernel launch variants. Last,
chunked prefill with a prefix: 8K new tokens over a 128K cache (tokens per second).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton

from msa import MSAConfig
from msa.inference.decode import PagedDecoder

HQ, HKV, D, HI, DI, BS, K = 64, 4, 128, 4, 128, 128, 16


def graph_ms(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=5, rep=100, return_mode="median")
    return 2 * x.numel() / ms / 1e6                                  # GB/s


def run(B, T, Q, bw):
    dev = "cuda"
    pages_per = T // BS
    npages = B * pages_per
    k = torch.empty(npages, HKV, BS, D, device=dev, dtype=torch.bfloat16).normal_()
    v = torch.empty_like(k).normal_()
    ki = torch.empty(npages, BS, DI, device=dev, dtype=torch.bfloat16).normal_()
    table = torch.randperm(npages, device=dev, dtype=torch.int64).view(B, pages_per)
    table = table.to(torch.int32)
    lens = torch.full((B,), T, dtype=torch.int32, device=dev)
    cfg = MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, num_index_heads=HI,
                    index_head_dim=DI, block_size=BS, topk=K)
    q = torch.randn(B * Q, HQ, D, device=dev, dtype=torch.bfloat16)
    qi = torch.randn(B * Q, HI, DI, device=dev, dtype=torch.bfloat16)
    dec = PagedDecoder(cfg, max_batch=B, num_q=Q, max_pages=pages_per, device=dev)
    dec.plan(table, lens)
    ours = graph_ms(lambda: dec.run(q, qi, k, v, ki))
    _, topk = dec.run(q, qi, k, v, ki)
    # distinct (request, KV head, page) read by the attention
    heads = torch.arange(HKV, device=dev).view(HKV, 1, 1)
    req = (torch.arange(B * Q, device=dev) // Q).view(1, -1, 1)
    ids = topk.long().expand(HKV, -1, -1) if topk.shape[0] == 1 else topk.long()
    key = ((req * HKV + heads) * pages_per + ids)[ids >= 0]
    kv_bytes = torch.unique(key).numel() * BS * D * 2 * 2
    floor_ms = (npages * BS * DI * 2 + kv_bytes) / bw / 1e6
    variants = {}
    if (B, Q) in ((1, 1), (64, 8)) and T >= 131072:            # index-kernel launch sweep
        for per in (4, 8, 32):
            for stages in (1, 3):
                dv = PagedDecoder(cfg, max_batch=B, num_q=Q, max_pages=pages_per,
                                  device=dev, pages_per_program=per, index_stages=stages)
                dv.plan(table, lens)
                variants[f"pages{per}_stages{stages}"] = graph_ms(
                    lambda: dv.run(q, qi, k, v, ki))
    del ki
    # dense: contiguous copy of the same cache
    kd = k[table.long()].permute(0, 2, 1, 3, 4).reshape(B, HKV, T, D)
    del k
    vd = v[table.long()].permute(0, 2, 1, 3, 4).reshape(B, HKV, T, D)
    del v
    # GQA as query rows: the group's heads x the Q drafts share their KV head
    G = HQ // HKV
    qd = q.view(B, Q, HKV, G, D).permute(0, 2, 1, 3, 4).reshape(B, HKV, Q * G, D)
    mask = None
    if Q > 1:                                   # row (i, g) sees keys t <= T - Q + i
        pos = (T - Q + torch.arange(Q, device=dev)).repeat_interleave(G).view(-1, 1)
        mask = torch.arange(T, device=dev).view(1, T) <= pos
    dense = graph_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask))
    dense_floor = B * T * HKV * D * 2 * 2 / bw / 1e6
    return dict(B=B, T=T, Q=Q, ours_ms=ours, dense_ms=dense, speedup=dense / ours,
                dense_floor_ms=dense_floor, speedup_vs_dense_floor=dense_floor / ours,
                floor_ms=floor_ms, vs_floor=ours / floor_ms,
                selected_kv_mb=kv_bytes / 2 ** 20, variants=variants)


def prefill_with_prefix(T=131072, chunk=8192):
    """Chunked prefill: the last ``chunk`` tokens of a ``T``-token sequence attend to the
    whole cache (indexer + top-k + attention, packed layout). Tokens per second."""
    import msa
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(chunk, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(T, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
            for _ in range(2))
    qi = torch.randn(chunk, HI, DI, device=dev, generator=g, dtype=torch.bfloat16)
    ki = torch.randn(T, 1, DI, device=dev, generator=g, dtype=torch.bfloat16)
    cu_q = torch.tensor([0, chunk], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, T], dtype=torch.int32, device=dev)

    def step():
        topk = msa.msa_indexer(qi, ki, cu_q, cu_k, block_size=BS, topk=K)
        return msa.msa_sparse_attention(q, k, v, topk, cu_q, cu_k, block_size=BS)

    ms = triton.testing.do_bench(step, warmup=10, rep=200, return_mode="median")
    return dict(T=T, chunk=chunk, ms=ms, tokens_per_s=chunk / ms * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--lengths", default="8k,32k,128k,1m")
    ap.add_argument("--qs", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=8 << 20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    mult = {"k": 1024, "m": 1 << 20}
    lengths = [int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)
               for s in args.lengths.split(",")]
    bw = copy_bandwidth()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, date=time.strftime("%Y-%m-%d"),
                commit=args.commit, copy_gbps=bw,
                shape=dict(Hq=HQ, Hkv=HKV, D=D, Hi=HI, Di=DI, block=BS, topk=K,
                           dtype="bf16"))
    print(json.dumps(meta), flush=True)
    rows = []
    for T in lengths:
        for B in (int(x) for x in args.batches.split(",")):
            if B * T > args.max_tokens:
                continue
            for Q in (int(x) for x in args.qs.split(",")):
                try:
                    rows.append(run(B, T, Q, bw))
                except torch.OutOfMemoryError as e:
                    rows.append(dict(B=B, T=T, Q=Q, error=repr(e)[:100]))
                torch.cuda.empty_cache()
                print(json.dumps(rows[-1]), flush=True)
    rows.append(dict(prefill_with_prefix=prefill_with_prefix()))
    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
