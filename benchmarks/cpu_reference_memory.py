"""Peak memory of the pure-PyTorch reference forward at long length on the CPU.

    python benchmarks/cpu_reference_memory.py --length 65536

Shape Hq=8, Hkv=2, D=64, Hi=2, block 128, top-16, fp32, one sequence. Measures the
indexer and the sparse attention forward separately: peak resident memory above the
level before the call (inputs excluded), sampled every 2 ms. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import msa
from msa._meter import PeakMemory


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=65536)
    args = ap.parse_args()
    T = args.length
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, h, 64, generator=g) for h in (8, 2, 2))
    qi, ki = torch.randn(T, 2, 64, generator=g), torch.randn(T, 1, 64, generator=g)
    cu = torch.tensor([0, T], dtype=torch.int32)
    inputs_mb = sum(t.numel() * 4 for t in (q, k, v, qi, ki)) / 2 ** 20
    with torch.no_grad():
        with PeakMemory("cpu") as m1:
            t0 = time.perf_counter()
            topk = msa.msa_indexer(qi, ki, cu, cu)
            t_idx = time.perf_counter() - t0
        with PeakMemory("cpu") as m2:
            t0 = time.perf_counter()
            out = msa.msa_sparse_attention(q, k, v, topk, cu, cu)
            t_att = time.perf_counter() - t0
    assert torch.isfinite(out).all()
    print(json.dumps(dict(length=T, shape="Hq8-Hkv2-D64-Hi2-B128-K16", dtype="fp32",
                          inputs_mb=round(inputs_mb, 1),
                          indexer_peak_mb=round(m1.peak / 2 ** 20, 1), indexer_s=round(t_idx, 1),
                          attention_peak_mb=round(m2.peak / 2 ** 20, 1),
                          attention_s=round(t_att, 1), torch=torch.__version__,
                          cpu=platform.processor() or platform.machine(),
                          date=time.strftime("%Y-%m-%d"))))


if __name__ == "__main__":
    main()
