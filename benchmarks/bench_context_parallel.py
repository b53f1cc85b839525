"""Context-parallel MSA on several GPUs (NCCL): correctness and scaling.

    torchrun --nproc_per_node=2 benchmarks/bench_context_parallel.py --out cp.json

MSA shape (Hq=64, Hkv=4, D=128, 4 index heads over one index-key head of 128, block 128,
top-16), bf16, Triton kernels.

1. Check (T = ``--check-length``): zigzag context-parallel forward + backward (main
   branch and indexer KL) against single-GPU MSA on rank 0: cosine of out, dq, dk, dv,
   dqi, dki; one document, then six packed documents (``cu_seqlens``).
2. Forward (indexer + attention) per length on all ranks, and on one GPU alone where it
   fits (``--single-max``): time, speedup, peak memory per rank.
3. Forward + backward (``--train-lengths``) on all ranks and on one GPU alone.
4. Communication per rank: bytes of the K/V all-gather, and bytes a sparse exchange
   would move (the distinct remote (KV head, block) pairs its queries selected, measured
   from the indexer's selection on planted-topic index inputs; index keys are
   all-gathered either way).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton

import msa
from msa.distributed import context_parallel_msa, zigzag_chunks, zigzag_shard

from bench_prefill import planted_topics

HQ, HKV, D, HI, DI, BS, K = 64, 4, 128, 4, 128, 128, 16
CFG = msa.MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, num_index_heads=HI,
                    index_head_dim=DI, block_size=BS, topk=K)
SHAPES = ((HQ, D), (HKV, D), (HKV, D), (HI, DI), (1, DI))


def _full(T, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(T, *s, device=dev, generator=g, dtype=torch.bfloat16)
            for s in SHAPES]


def check(T, world, rank, dev, docs=None):
    full = _full(T, dev)
    local = [zigzag_shard(x, world, rank).clone().requires_grad_(True) for x in full]
    cu = torch.tensor(docs or [0, T], dtype=torch.int32, device=dev)
    out = context_parallel_msa(*local, config=CFG, cu_seqlens=cu)
    g = torch.Generator(device=dev).manual_seed(1)
    dout_full = torch.randn(T, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
    out.backward(zigzag_shard(dout_full, world, rank))
    got = [out.detach()] + [x.grad for x in local]
    gathered = []
    for t in got:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        gathered.append(parts)
    if rank != 0:
        return None
    ref_in = [x.clone().requires_grad_(True) for x in full]
    ref_out = msa.msa_attention(*ref_in, cu, cu, config=CFG)
    ref_out.backward(dout_full)
    refs = [ref_out.detach()] + [x.grad for x in ref_in]
    names = ["out", "dq", "dk", "dv", "dqi", "dki"]
    cos = {}
    for name, parts, ref in zip(names, gathered, refs):
        mine = torch.empty_like(ref)
        c = T // (2 * world)
        for r, p in enumerate(parts):
            a, b = zigzag_chunks(world, r)
            mine[a * c:(a + 1) * c], mine[b * c:(b + 1) * c] = p[:c], p[c:]
        cos[name] = F.cosine_similarity(mine.float().flatten(), ref.float().flatten(),
                                        dim=0).item()
    return dict(T=T, documents=len(cu) - 1, cosine=cos, passed=min(cos.values()) > 0.99)


def _timed(fn, iters=5):
    """Median ms of ``iters`` calls after 2 warm-ups; the same count on every rank
    (collectives inside ``fn`` must match)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def forward(T, world, rank, dev, single_max):
    n = T // world
    g = torch.Generator(device=dev).manual_seed(rank)
    local = [torch.randn(n, *s, device=dev, generator=g, dtype=torch.bfloat16)
             for s in SHAPES[:3]]
    qi, ki = planted_topics(T, dev, seed=1)                   # the same on every rank
    local += [zigzag_shard(qi, world, rank).contiguous(),
              zigzag_shard(ki, world, rank).contiguous()]
    del qi, ki
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn = lambda: context_parallel_msa(*local, config=CFG, return_aux=True)
        dist.barrier()
        ms = _timed(fn)
        _, aux = fn()
    r = dict(T=T, world=world, cp_ms=ms, peak_gb=torch.cuda.max_memory_allocated() / 2**30)
    # communication: K/V all-gather vs the distinct remote (KV head, block) pairs this
    # rank's queries selected (index keys are all-gathered in both cases)
    c = n // 2
    own = torch.zeros(T // BS, dtype=torch.bool, device=dev)
    for chunk in zigzag_chunks(world, rank):
        own[chunk * c // BS:(chunk + 1) * c // BS] = True
    topk = aux.topk_indices.long()                              # [Hi, n, K] segment-local
    heads = torch.arange(topk.shape[0], device=dev).view(-1, 1, 1).expand_as(topk)
    valid = topk >= 0
    pairs = torch.unique(heads[valid] * (T // BS) + topk[valid])
    remote = int((~own[pairs % (T // BS)]).sum())
    kv_row_bytes = 2 * HKV * D * 2
    r["kv_allgather_bytes"] = (world - 1) * n * kv_row_bytes
    r["kv_sparse_bytes"] = remote * BS * (kv_row_bytes // HKV)  # one KV head per pair
    r["index_key_bytes"] = (world - 1) * n * DI * 2
    del local, aux
    torch.cuda.empty_cache()
    if rank == 0 and T <= single_max:
        full = [torch.randn(T, *s, device=dev, generator=g, dtype=torch.bfloat16)
                for s in SHAPES[:3]] + list(planted_topics(T, dev, seed=1))
        cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
        with torch.no_grad():
            single = _timed(lambda: msa.msa_attention(*full, cu, cu, config=CFG))
        r["single_ms"] = single
        r["speedup"] = single / ms
        del full
        torch.cuda.empty_cache()
    dist.barrier()
    return r


def train_step(T, world, rank, dev, single_max):
    """Forward + backward (main branch and indexer KL) per rank vs one GPU."""
    n = T // world
    g = torch.Generator(device=dev).manual_seed(rank)
    local = [torch.randn(n, *s, device=dev, generator=g, dtype=torch.bfloat16)
             .requires_grad_(True) for s in SHAPES]
    dout = torch.randn(n, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    fn = lambda: context_parallel_msa(*local, config=CFG).backward(dout)
    dist.barrier()
    r = dict(T=T, world=world, cp_train_ms=_timed(fn),
             peak_gb=torch.cuda.max_memory_allocated() / 2**30)
    del local, dout
    torch.cuda.empty_cache()
    if rank == 0 and T <= single_max:
        full = [torch.randn(T, *s, device=dev, generator=g, dtype=torch.bfloat16)
                .requires_grad_(True) for s in SHAPES]
        d_full = torch.randn(T, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
        cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
        r["single_train_ms"] = _timed(
            lambda: msa.msa_attention(*full, cu, cu, config=CFG).backward(d_full))
        r["speedup"] = r["single_train_ms"] / r["cp_train_ms"]
        del full, d_full
        torch.cuda.empty_cache()
    dist.barrier()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="256k,1m,2m")
    ap.add_argument("--check-length", type=int, default=32768)
    ap.add_argument("--single-max", type=int, default=1 << 20)
    ap.add_argument("--train-lengths", default="256k",
                    help="forward + backward lengths ('' to skip)")
    ap.add_argument("--train-single-max", type=int, default=1 << 18)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(dev)
    res = dict(meta=dict(gpu=torch.cuda.get_device_name(), world=world,
                         torch=torch.__version__, triton=triton.__version__,
                         date=time.strftime("%Y-%m-%d"), commit=args.commit))
    res["check"] = check(args.check_length, world, rank, dev)
    T = args.check_length            # packed documents: crossing chunks, a 1-token one
    docs = sorted({0, T // 7, T // 7 + 1, T // 2 + 333, 3 * T // 4, T - 5, T})
    res["check_packed"] = check(T, world, rank, dev, docs)
    if rank == 0:
        print(json.dumps(res["check"]), json.dumps(res["check_packed"]), flush=True)
    mult = {"k": 1024, "m": 1 << 20}
    res["forward"] = []
    for s in args.lengths.split(","):
        T = int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)
        r = forward(T, world, rank, dev, args.single_max)
        if rank == 0:
            print(json.dumps(r), flush=True)
            res["forward"].append(r)
    res["train"] = []

    def save():
        if rank == 0 and args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    for s in filter(None, args.train_lengths.split(",")):
        save()                                  # a length that does not fit ends the run
        T = int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)
        r = train_step(T, world, rank, dev, args.train_single_max)
        if rank == 0:
            print(json.dumps(r), flush=True)
            res["train"].append(r)
    save()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
