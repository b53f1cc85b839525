"""Sparse attention forward on the GPU: correctness, then timings vs same-run baselines.

    python benchmarks/bench_attention_fwd.py --lengths 16k,64k,128k --out results.json

Shape: the MSA preset (Hq=64, Hkv=4, D=128, block 128, top-16), batch 1, bf16.
Selections (local block always last):
  random   - 15 distinct uniformly random earlier blocks (worst case for locality);
  recency  - the 7 most recent earlier blocks + 8 random older ones.
Variants: ours (planning + KV-outer kernel + combine; stages also timed alone),
dense causal SDPA with the cuDNN and FlashAttention-2 backends, and fla's query-major
``parallel_nsa`` fed the same block indices (also used as a cross-check of outputs).
Useful FLOPs: ``4 * D * Hq * sparse_elements`` (dense: ``2 * D * Hq * T^2``).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
import triton

from msa.ops.attention.forward import (LOG2E, _next_pow2, sparse_attn_combine_kernel,
                                       sparse_attn_fwd, sparse_attn_fwd_kernel)
from msa.ops.attention.naive import attention_forward_reference
from msa.ops.prepare import block_rows, plan_chunk
from msa.varlen import Segments

HQ, HKV, D, BS, K = 64, 4, 128, 128, 16


def selection(T, pattern, device, seed=0, chunk=16384):
    """``[Hkv, T, K]`` int32: ranked earlier blocks then the local block, -1 padded."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.cat([_selection(s, min(T, s + chunk), pattern, device, g)
                      for s in range(0, T, chunk)], dim=1)


def _selection(s0, s1, pattern, device, g):
    T = s1 - s0
    local = torch.arange(s0, s1, device=device) // BS
    r = torch.rand(HKV, T, local.max().item() + 1, generator=g, device=device)
    blocks = torch.arange(r.shape[-1], device=device)
    earlier = blocks.view(1, 1, -1) < local.view(1, -1, 1)
    if pattern == "recency":
        recent = earlier & (blocks.view(1, 1, -1) >= local.view(1, -1, 1) - 7)
        r = r + 2 * recent
    r = torch.where(earlier, r, torch.full_like(r, -1.0))
    top = torch.topk(r, min(K - 1, r.shape[-1]), dim=-1)
    ids = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
    out = torch.full((HKV, T, K), -1, dtype=torch.int32, device=device)
    nvalid = (ids >= 0).sum(-1)                                         # [HKV, T]
    ids_sorted = torch.sort(torch.where(ids >= 0, ids, torch.full_like(ids, 1 << 30)),
                            dim=-1).values
    ids_sorted = torch.where(ids_sorted == 1 << 30, torch.full_like(ids_sorted, -1), ids_sorted)
    out[..., :ids.shape[-1]] = ids_sorted.to(torch.int32)
    out.scatter_(2, nvalid.unsqueeze(-1).long(), local.view(1, -1, 1).expand(HKV, T, 1).int())
    return out


def sparse_elements(T):
    pos = torch.arange(T, dtype=torch.float64)
    return torch.minimum(pos + 1, (K - 1) * BS + pos % BS + 1).sum().item()


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def stages(q, k, v, topk, seg):
    """Time planning, the KV-outer kernel and the combine separately (one query chunk)."""
    T = q.shape[0]
    rows = block_rows(seg, BS, q.device)
    g = HQ // HKV
    po = torch.empty(T * HKV * K * g * D, dtype=torch.bfloat16, device=q.device)
    pl = torch.empty(T * HKV * K * g, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    lse = torch.empty(T, HQ, dtype=torch.float32, device=q.device)
    plan = plan_chunk(topk, rows, 0, T, HKV, 256)

    def kern():
        sparse_attn_fwd_kernel[(plan.num_items,)](
            q, k, v, po, pl, rows.q_pos, plan.edge_q, plan.edge_slot, plan.item_h,
            plan.item_krow, plan.item_t0, plan.item_nk, plan.item_e0, plan.item_e1, 0,
            D ** -0.5 * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), HKV=HKV, G=g, G_PAD=g, D=D, BS=BS, KSEL=K, BLOCK_Q=8,
            PRECISION="tf32", UPCAST=False, num_warps=8, num_stages=2)

    def comb():
        sparse_attn_combine_kernel[(T * HKV,)](
            po, pl, topk, rows.q_nblocks, out, lse, 0, topk.stride(0), topk.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), HKV=HKV, HS=HKV, G=g, G_PAD=g, D=D,
            KSEL=K, KSEL_PAD=K, num_warps=4)

    return dict(plan_ms=bench(lambda: plan_chunk(topk, rows, 0, T, HKV, 256), 100),
                kernel_ms=bench(kern), combine_ms=bench(comb),
                partial_gb=(po.numel() * 2 + pl.numel() * 4) / 1e9)


def correctness(device):
    """Small MSA-shape case vs the fp32 reference (spec 5.7 tolerances)."""
    T = 3000
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(T, HQ, D, device=device, generator=g).bfloat16()
    k = torch.randn(T, HKV, D, device=device, generator=g).bfloat16()
    v = torch.randn(T, HKV, D, device=device, generator=g).bfloat16()
    seg = Segments([0], [T], [0], [T], T, T)
    topk = selection(T, "random", device)
    out, lse = sparse_attn_fwd(q, k, v, topk, seg, block_size=BS, scale=D ** -0.5,
                               out=torch.full_like(q, float("nan")))
    ro, rl = attention_forward_reference(q.float(), k.float(), v.float(), topk, seg,
                                         block_size=BS, scale=D ** -0.5)
    err_o = (out.float() - ro).abs().max().item()
    err_l = (lse - rl).abs().max().item()
    ok = err_o < 3e-2 and err_l < 1e-3 and not torch.isnan(out).any().item()
    return dict(T=T, max_abs_err_out=err_o, max_abs_err_lse=err_l, passed=ok)


def run_length(T, device, dense_max, fla_fn):
    res = dict(T=T)
    gen = torch.Generator(device=device).manual_seed(T)
    q = torch.randn(T, HQ, D, device=device, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(T, HKV, D, device=device, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(T, HKV, D, device=device, generator=gen, dtype=torch.bfloat16)
    seg = Segments([0], [T], [0], [T], T, T)
    flops = 4 * D * HQ * sparse_elements(T)
    for pattern in ("random", "recency"):
        topk = selection(T, pattern, device)
        fwd = lambda: sparse_attn_fwd(q, k, v, topk, seg, block_size=BS, scale=D ** -0.5)
        ms = bench(fwd, 100 if T <= 131072 else 20)
        r = dict(ms=ms, tflops=flops / ms / 1e9, peak_mb=peak_mb(fwd))
        if T <= 131072:
            r.update(stages(q, k, v, topk, seg))
        if fla_fn is not None and T <= 262144:
            idx = topk.transpose(0, 1).unsqueeze(0).long()                 # [1, T, Hkv, K]
            counts = (idx >= 0).sum(-1)
            idx_sorted = torch.sort(torch.where(idx >= 0, idx, torch.full_like(idx, 1 << 30)),
                                    -1).values
            idx_f = torch.where(idx_sorted == 1 << 30, torch.zeros_like(idx_sorted), idx_sorted)
            qb, kb, vb = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            call = lambda: fla_fn(qb, kb, vb, block_indices=idx_f, block_counts=counts,
                                  block_size=BS, scale=D ** -0.5)
            o_fla = call()[0]
            o_ours = fwd()[0]
            r["fla_ms"] = bench(call, 100 if T <= 131072 else 20)
            r["fla_tflops"] = flops / r["fla_ms"] / 1e9
            r["fla_max_abs_diff"] = (o_fla.float() - o_ours.float()).abs().max().item()
            r["speedup_vs_fla"] = r["fla_ms"] / ms
        res[pattern] = r
    if T <= dense_max:
        qd = q.transpose(0, 1).unsqueeze(0)
        kd = k.transpose(0, 1).unsqueeze(0).repeat_interleave(HQ // HKV, 1)
        vd = v.transpose(0, 1).unsqueeze(0).repeat_interleave(HQ // HKV, 1)
        dflops = 2 * D * HQ * T * T
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("fa2", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    fn = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
                    ms = bench(fn, 100 if T <= 65536 else 10)
                res[name] = dict(ms=ms, tflops=dflops / ms / 1e9)
                res[f"speedup_vs_{name}"] = {p: ms / res[p]["ms"] for p in ("random", "recency")}
            except Exception as e:                                   # backend unavailable
                res[name] = dict(error=repr(e)[:200])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="16k,64k,128k")
    ap.add_argument("--dense-max", type=int, default=131072)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    lengths = [int(s[:-1]) * 1024 if s.endswith("k") else int(s) for s in args.lengths.split(",")]
    device = torch.device("cuda")
    try:
        from fla.ops.nsa.parallel import parallel_nsa as fla_fn
    except Exception as e:
        print("fla unavailable:", repr(e)[:200])
        fla_fn = None
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, date=time.strftime("%Y-%m-%d"),
                commit=args.commit, host=platform.node(),
                shape=dict(Hq=HQ, Hkv=HKV, D=D, block=BS, topk=K, dtype="bf16", batch=1))
    check = correctness(device)
    print("correctness:", check, flush=True)
    results = []
    for T in lengths:
        r = run_length(T, device, args.dense_max, fla_fn if check["passed"] else None)
        results.append(r)
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()
    summary = dict(meta=meta, correctness=check, results=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"\n{meta['gpu']} torch {meta['torch']} triton {meta['triton']}")
    print(f"{'T':>8} {'pattern':>8} {'ours ms':>9} {'TFLOP/s':>8} {'fla ms':>8} {'x fla':>6} "
          f"{'cudnn ms':>9} {'x cudnn':>8} {'plan':>6} {'kern':>6} {'comb':>6} {'peak MB':>8}")
    for r in results:
        for p in ("random", "recency"):
            x = r[p]
            cud = r.get("cudnn", {}).get("ms", float("nan"))
            print(f"{r['T']:>8} {p:>8} {x['ms']:9.2f} {x['tflops']:8.1f} "
                  f"{x.get('fla_ms', float('nan')):8.2f} {x.get('speedup_vs_fla', float('nan')):6.2f} "
                  f"{cud:9.2f} {cud / x['ms']:8.2f} {x.get('plan_ms', float('nan')):6.2f} "
                  f"{x.get('kernel_ms', float('nan')):6.2f} {x.get('combine_ms', float('nan')):6.2f} "
                  f"{x['peak_mb']:8.0f}")


if __name__ == "__main__":
    main()
