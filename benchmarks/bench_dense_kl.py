"""Dense warm-up indexer KL on the GPU (Triton passes) vs the PyTorch reference.

    python benchmarks/bench_dense_kl.py --lengths 8k,32k,64k --out dense_kl.json

MSA shape (Hq=64, Hkv=4, D=128, Hi=4, Di=128, block 128), bf16. Per length: the Triton
dense KL (loss + dqi + dki over all causal keys), its peak memory above the inputs, the
reference (chunked PyTorch, where ``T <= --reference-max``) with the cosine of dqi/dki,
the time of the two LSE passes alone (teacher over 64 heads, student over 4), a sweep of
the gradient kernel's launch (``--sweep``: queries per item x tokens per tile), and dense
causal attention forward (cuDNN) as a yardstick.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton

from msa.cli import parse_lengths
from msa.ops.kl.dense import causal_lse, indexer_kl_dense
from msa.ops.kl.naive import indexer_kl_reference
from msa.varlen import Segments

from bench_prefill import BS, D, HKV, HQ, bench, planted_topics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8k,32k,64k")
    ap.add_argument("--reference-max", type=int, default=8192)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--rep", type=int, default=1000, help="ms of repetitions per timing "
                    "(one call at 64K takes ~0.5 s)")
    ap.add_argument("--sweep", default="1024x16x1,1024x8x1,512x16x1,2048x16x1",
                    help="q_per_item x block_t [x num_stages] launches to time ('' to skip)")
    args = ap.parse_args()
    dev = "cuda"
    rows = []
    for T in parse_lengths(args.lengths):
        g = torch.Generator(device=dev).manual_seed(T)
        q = torch.randn(T, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
        k = torch.randn(T, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
        qi, ki = planted_topics(T, dev, seed=T)
        seg = Segments([0], [T], [0], [T], T, T)
        kw = dict(block_size=BS, scale=D ** -0.5, index_scale=D ** -0.5)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, dqi, dki = indexer_kl_dense(q, k, qi, ki, seg, **kw)
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        ms = bench(lambda: indexer_kl_dense(q, k, qi, ki, seg, **kw),
                   warmup=2, rep=args.rep, return_mode="median")
        r = dict(T=T, triton_ms=ms, loss=loss.item(), peak_extra_gb=peak)
        r["lse_ms"] = bench(
            lambda: (causal_lse(q, k, seg, scale=kw["scale"], block_size=BS),
                     causal_lse(qi, ki, seg, scale=kw["index_scale"], block_size=BS)),
            warmup=2, rep=100, return_mode="median")
        r["sweep"] = {}
        for cfg in filter(None, args.sweep.split(",")):
            qpi, bt, st = (int(x) for x in (cfg + "x1").split("x")[:3])
            try:
                r["sweep"][cfg] = bench(
                    lambda: indexer_kl_dense(q, k, qi, ki, seg, q_per_item=qpi, block_t=bt,
                                             num_stages=st, **kw),
                    warmup=2, rep=args.rep, return_mode="median")
            except triton.runtime.errors.OutOfResources as e:      # tile too large
                r["sweep"][cfg] = f"out of resources: {e}"
        if T <= args.reference_max:
            t0 = time.perf_counter()
            rl, rq, rk = indexer_kl_reference(q, k, qi, ki, seg, None, **kw)
            torch.cuda.synchronize()
            r["reference_ms"] = (time.perf_counter() - t0) * 1e3
            r["speedup"] = r["reference_ms"] / ms
            r["loss_ref"] = rl.item()
            r["cos_dqi"], r["cos_dki"] = (F.cosine_similarity(
                a.float().flatten(), b.float().flatten(), dim=0).item()
                for a, b in ((dqi, rq), (dki, rk)))
        qd = q.transpose(0, 1).unsqueeze(0)
        kd = k.transpose(0, 1).unsqueeze(0).repeat_interleave(HQ // HKV, 1)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            r["cudnn_fwd_ms"] = bench(
                lambda: F.scaled_dot_product_attention(qd, kd, kd, is_causal=True),
                warmup=5, rep=100, return_mode="median")
        del qd, kd
        rows.append(r)
        print(json.dumps(r), flush=True)
    if args.out:
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                    triton=triton.__version__, date=time.strftime("%Y-%m-%d"),
                    commit=args.commit)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
