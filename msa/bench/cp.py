"""``msa bench cp``: context-parallel MSA on several GPUs (NCCL), one process per GPU:

    torchrun --nproc_per_node=2 -m msa bench cp --lengths 256k,1m

MSA shape, bf16. First a check at 16K: the zigzag context-parallel forward + backward
(main branch and indexer KL) against one GPU (cosine of out, dq, dk, dv, dqi, dki); then,
per length, the forward (indexer + attention) and forward + backward on all ranks, next
to one GPU alone where it fits (time, speed-up, peak memory per rank).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import msa
from ..distributed import context_parallel_msa, zigzag_shard
from . import common as C
from .selection import inputs


def _gather(t, world):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    c = t.shape[0] // 2
    chunks = [None] * (2 * world)
    for r, p in enumerate(parts):
        chunks[r], chunks[2 * world - 1 - r] = p[:c], p[c:]
    return torch.cat(chunks)


def check(cfg, T, world, rank) -> dict:
    full = list(inputs(T, cfg))
    local = [zigzag_shard(x, world, rank).clone().requires_grad_(True) for x in full]
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    out = context_parallel_msa(*local, config=cfg, cu_seqlens=cu)
    dout = torch.randn(T, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16,
                       generator=torch.Generator(device="cuda").manual_seed(1))
    out.backward(zigzag_shard(dout, world, rank))
    got = [_gather(t, world) for t in [out.detach()] + [x.grad for x in local]]
    ref_in = [x.clone().requires_grad_(True) for x in full]
    ref = msa.msa_attention(*ref_in, cu, cu, config=cfg)
    ref.backward(dout)
    want = [ref.detach()] + [x.grad for x in ref_in]
    cos = [C.cosine(a, b) for a, b in zip(got, want)]
    return dict(T=T, cosine_out_dq_dk_dv_dqi_dki=cos, passed=min(cos) > 0.99)


def run(args) -> int:
    if "RANK" not in os.environ:
        raise SystemExit("msa bench cp runs one process per GPU: torchrun "
                         "--nproc_per_node=N -m msa bench cp ...")
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    cfg = C.shape_config(args.shape.split(",")[0])
    results = dict(meta=C.metadata("cp"), world=world, check=check(cfg, 16384, world, rank),
                   rows=[])
    for T in C.lengths(args, "256k,1m", "64k"):
        full = list(inputs(T, cfg, seed=T))
        local = [zigzag_shard(x, world, rank).clone().requires_grad_(True) for x in full]
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        r = dict(T=T)

        def forward():
            with torch.no_grad():
                context_parallel_msa(*local, config=cfg, cu_seqlens=cu)

        def train():
            context_parallel_msa(*local, config=cfg, cu_seqlens=cu).sum().backward()
        for name, fn in (("forward", forward), ("train", train)):
            dist.barrier()
            r[f"cp_{name}_ms"] = C.timed(fn, reps=3, warmup=1)
            r[f"cp_{name}_peak_mb"] = C.peak_bytes(fn) / 2 ** 20
        if rank == 0:
            try:
                x = [t.clone().requires_grad_(True) for t in full]
                with torch.no_grad():
                    r["single_forward_ms"] = C.timed(
                        lambda: msa.msa_attention(*x, cu, cu, config=cfg), reps=3, warmup=1)
                r["forward_speedup"] = r["single_forward_ms"] / r["cp_forward_ms"]
            except torch.OutOfMemoryError:
                r["single_forward_ms"] = "out of memory"
        results["rows"].append(r)
        if rank == 0:
            print(r, flush=True)
        full = local = None
        torch.cuda.empty_cache()
    if rank == 0:
        C.write(results, args)
    dist.barrier()                  # no rank tears down while another's last transfer runs
    dist.destroy_process_group()
    return 0
