"""Where the GPU waits during one sparse-attention step: idle gaps and their causes.

    python benchmarks/profile_gaps.py --length 128k --mode train

Profiles one warm step (CPU + CUDA, Python stacks), then walks the GPU timeline: wall
time of the step, GPU busy time, and every idle gap longer than ``--min-gap-us``. A gap
is charged to the host synchronisation that returned at its start (a device-to-host
copy, ``cudaStreamSynchronize``, a pageable host-to-device copy...) when there is one,
else to the launch of the kernel that ends it; each charge names the innermost ``msa``
frame. Same inputs as ``profile_step.py``; ``--mode``: ``train`` (attention forward +
backward), ``prefill`` (attention forward), ``e2e`` (indexer top-k + attention forward),
all through the public API.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench_prefill import bench, run_meta
from msa.cli import parse_lengths
from profile_step import make_step

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_WORDS = ("Synchronize", "Memcpy", "cudaFree", "cudaMalloc", "cudaHostAlloc")


def msa_frame(stack, ts):
    """Innermost ``msa`` (or benchmark) Python frame running at ``ts``."""
    best = None
    for s, e, name in stack:
        if s <= ts <= e and ("msa/" in name or "benchmarks/" in name):
            if best is None or s >= best[0]:
                best = (s, name)
    return best[1] if best else "?"


def analyse(trace, min_gap_us):
    ev = trace["traceEvents"]
    step = next(e for e in ev if e.get("name") == "msa_step")
    t0, t1 = step["ts"], step["ts"] + step["dur"]
    gpu = sorted((e for e in ev if e.get("cat") in GPU_CATS and t0 <= e["ts"] <= t1),
                 key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e for e in ev
              if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in
              e.get("args", {})}
    host = [e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")
            and any(w in e["name"] for w in SYNC_WORDS)]
    stack = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev
             if e.get("cat") == "python_function"]
    busy, gaps, end = 0.0, [], t0
    for e in gpu:
        s, f = e["ts"], e["ts"] + e["dur"]
        if s - end >= min_gap_us:
            gaps.append((end, s, e))
        busy += max(0.0, f - max(s, end))
        end = max(end, f)
    charged = defaultdict(float)
    rows = []
    for gs, ge, nxt in gaps:
        sync = [h for h in host if gs - 20 <= h["ts"] + h["dur"] <= ge and h["dur"] > 5]
        if sync:
            h = max(sync, key=lambda h: h["dur"])
            cause = f"sync {h['name']} at {msa_frame(stack, h['ts'])}"
        else:
            ln = launch.get(nxt.get("args", {}).get("correlation"))
            where = msa_frame(stack, ln["ts"]) if ln else "?"
            cause = f"launch of {nxt['name'][:40]} at {where}"
        charged[cause] += ge - gs
        rows.append(dict(gap_us=ge - gs, next_kernel=nxt["name"][:60], cause=cause))
    tail = t1 - end
    return dict(wall_ms=(t1 - t0) / 1e3, gpu_busy_ms=busy / 1e3,
                idle_ms=(t1 - t0 - busy) / 1e3, tail_after_last_kernel_ms=tail / 1e3,
                gaps=len(gaps), by_cause=sorted(((v / 1e3, k) for k, v in charged.items()),
                                                reverse=True),
                largest=sorted(rows, key=lambda r: -r["gap_us"])[:15])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", default="128k")
    ap.add_argument("--mode", choices=["train", "prefill", "e2e"], default="train")
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    ap.add_argument("--no-stack", action="store_true",
                    help="no Python stacks (they slow the host side and so widen the gaps)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    T = parse_lengths(args.length)[0]
    step = make_step(T, args.mode)
    ms = bench(step, warmup=5, rep=20, return_mode="median")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 with_stack=not args.no_stack) as prof:
        with record_function("msa_step"):
            step()
            torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        res = analyse(json.load(f), args.min_gap_us)
    res["do_bench_ms"] = ms
    print(f"{args.mode} T={T}: do_bench {ms:.2f} ms; profiled step: wall {res['wall_ms']:.2f} ms, GPU busy {res['gpu_busy_ms']:.2f}, "
          f"idle {res['idle_ms']:.2f} in {res['gaps']} gaps "
          f"(after the last kernel: {res['tail_after_last_kernel_ms']:.2f})")
    for ms, cause in res["by_cause"][:20]:
        print(f"  {ms:7.3f} ms  {cause}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=run_meta(args.commit), T=T, mode=args.mode, **res), f,
                      indent=1)


if __name__ == "__main__":
    main()
