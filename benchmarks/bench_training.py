"""Sparse attention forward + backward on the GPU vs same-run baselines (training issue).

    python benchmarks/bench_training.py --lengths 16k,64k,128k --out training.json

MSA shape (Hq=64, Hkv=4, D=128, block 128, top-16), bf16, random selection with the
local block. Checks the Triton backward against the reference at T=4000 first (cosine
> 0.99 per gradient, spec 6), then times ours (Triton forward + backward), fla
``parallel_nsa`` forward + backward on the same indices, dense causal SDPA (cuDNN)
forward + backward, and the Triton indexer-KL backward on the same selection.
Also times the deterministic backward and checks that two runs are bitwise equal; the
same for the indexer-KL backward (fast and deterministic).
Useful FLOPs: forward ``4 D Hq sparse_elements``, backward 2.5x.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import msa
from msa.cli import parse_lengths
from msa.ops.attention.forward import sparse_attn_fwd
from msa.ops.attention.naive import attention_backward_reference
from msa.ops.indexer.triton import selected_lse
from msa.ops.kl.triton import indexer_kl_bwd
from msa.varlen import Segments

from bench_prefill import (BS, D, HKV, HQ, bench, fla_call, load_fla, planted_topics, run_meta,
                           selection, sparse_elements)


def _inputs(T, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(T, h, D, device=device, generator=g, dtype=torch.bfloat16)
            .requires_grad_(True) for h in (HQ, HKV, HKV)]


def check(device, T=4000):
    q, k, v = _inputs(T, device, 1)
    topk = selection(T, "random", device)
    cu = torch.tensor([0, T], dtype=torch.int32, device=device)
    out = msa.msa_sparse_attention(q, k, v, topk, cu, cu, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    _, lse = msa.msa_sparse_attention(q.detach(), k.detach(), v.detach(), topk, cu, cu,
                                      backend="triton", return_lse=True)
    ref = attention_backward_reference(q.detach().float(), k.detach().float(),
                                       v.detach().float(), topk, Segments([0], [T], [0], [T],
                                                                          T, T),
                                       out.detach().float(), lse, dout.float(),
                                       block_size=BS, scale=D ** -0.5)
    cos = [F.cosine_similarity(a.float().flatten(), r.flatten(), dim=0).item()
           for a, r in zip(grads, ref)]
    return dict(T=T, cosine_dq_dk_dv=cos, passed=min(cos) > 0.99)


def run(T, device, fla_fn, dense_max):
    q, k, v = _inputs(T, device, T)
    topk = selection(T, "random", device)
    cu = torch.tensor([0, T], dtype=torch.int32, device=device)
    dout = torch.randn(T, HQ, D, device=device, dtype=torch.bfloat16)
    flops = 4 * D * HQ * sparse_elements(T) * 3.5
    rep = 50 if T <= 131072 else 10

    def ours():
        out = msa.msa_sparse_attention(q, k, v, topk, cu, cu, backend="triton")
        torch.autograd.grad(out, [q, k, v], dout)

    ms = bench(ours, rep)
    torch.cuda.reset_peak_memory_stats()
    ours()
    r = dict(T=T, ours_ms=ms, ours_tflops=flops / ms / 1e9,
             ours_peak_mb=torch.cuda.max_memory_allocated() / 2 ** 20)

    with torch.no_grad():
        r["fwd_ms"] = bench(
            lambda: msa.msa_sparse_attention(q, k, v, topk, cu, cu, backend="triton"), rep)
    r["bwd_ms"] = ms - r["fwd_ms"]

    def ours_det():
        out = msa.msa_sparse_attention(q, k, v, topk, cu, cu, backend="triton",
                                       deterministic=True)
        return torch.autograd.grad(out, [q, k, v], dout)

    r["det_ms"] = bench(ours_det, rep)
    r["det_bitwise_repeat"] = all(torch.equal(a, b) for a, b in zip(ours_det(), ours_det()))
    # indexer KL backward on the same selection (Hi = Hkv = 4 index heads, Di = 128)
    seg = Segments([0], [T], [0], [T], T, T)
    qi, ki = planted_topics(T, device, seed=T)
    _, lse = sparse_attn_fwd(q.detach(), k.detach(), v.detach(), topk, seg, block_size=BS,
                             scale=D ** -0.5)
    ilse = selected_lse(qi, ki, topk, seg, block_size=BS, scale=D ** -0.5)
    kl = lambda: indexer_kl_bwd(q.detach(), k.detach(), lse, qi, ki, ilse, topk, seg,
                                block_size=BS, scale=D ** -0.5, index_scale=D ** -0.5)
    r["kl_bwd_ms"] = bench(kl, rep)
    kl_det = lambda: indexer_kl_bwd(q.detach(), k.detach(), lse, qi, ki, ilse, topk, seg,
                                    block_size=BS, scale=D ** -0.5, index_scale=D ** -0.5,
                                    deterministic=True)
    r["kl_det_ms"] = bench(kl_det, rep)
    r["kl_det_bitwise_repeat"] = all(torch.equal(a, b) for a, b in zip(kl_det(), kl_det()))
    ref = kl()
    r["kl_det_cos_vs_fast"] = min(F.cosine_similarity(a.float().flatten(), b.float().flatten(),
                                                      dim=0).item()
                                  for a, b in zip(kl_det()[1:], ref[1:]))
    if fla_fn is not None:
        call = fla_call(fla_fn, q, k, v, topk)
        fla = lambda: torch.autograd.grad(call(), [q, k, v], dout.unsqueeze(0))
        r["fla_ms"] = bench(fla, rep)
        r["speedup_vs_fla"] = r["fla_ms"] / ms
    if T <= dense_max:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qd = q.detach().transpose(0, 1).unsqueeze(0).requires_grad_(True)
        kd = k.detach().transpose(0, 1).unsqueeze(0).repeat_interleave(HQ // HKV, 1)
        vd = v.detach().transpose(0, 1).unsqueeze(0).repeat_interleave(HQ // HKV, 1)
        kd.requires_grad_(True)
        vd.requires_grad_(True)
        dd = dout.transpose(0, 1).unsqueeze(0)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = lambda: torch.autograd.grad(
                F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), [qd, kd, vd], dd)
            r["cudnn_ms"] = bench(dense, rep)
        r["cudnn_tflops"] = 2 * D * HQ * T * T * 3.5 / r["cudnn_ms"] / 1e9
        r["speedup_vs_cudnn"] = r["cudnn_ms"] / ms
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="16k,64k,128k")
    ap.add_argument("--dense-max", type=int, default=131072)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    device = torch.device("cuda")
    fla_fn = load_fla()
    meta = run_meta(args.commit)
    c = check(device)
    print("check:", json.dumps(c), flush=True)
    results = []
    for T in parse_lengths(args.lengths):
        results.append(run(T, device, fla_fn if c["passed"] else None, args.dense_max))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, check=c, results=results), f, indent=1)


if __name__ == "__main__":
    main()
