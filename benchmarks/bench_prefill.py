"""MSA prefill on one GPU: correctness, stage profile and same-run baselines.

    python benchmarks/bench_prefill.py --lengths 16k,64k,128k,256k,1024k --out prefill.json

Shape: the MSA preset (Hq=64, Hkv=4, D=128, Hi=4, Di=128, one index-key head, block 128,
top-16), batch 1, bf16. Attention runs on three selections (local block always last):
  random  - 15 distinct uniformly random earlier blocks (worst case for locality);
  recency - the 7 most recent earlier blocks + 8 random older ones;
  indexer - what our indexer selects on inputs with planted topics (each key block has
            one of 64 topics, each query/index head asks for one topic).
Stages: indexer top-k, selected LSE (training only, not in prefill), planning, KV-outer
kernel, combine; "e2e" = indexer top-k + planning + attention + combine. e2e and the
attention rows time the public calls (``msa.msa_indexer``, ``msa.msa_sparse_attention``:
argument checks and varlen metadata included); the stages time the internal kernels.
Baselines in the same run: dense causal SDPA (cuDNN and FlashAttention-2 backends) and
fla's query-major ``parallel_nsa`` on the same block indices (also an output cross-check).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton

import msa
from msa.cli import parse_lengths
from msa.ops.attention.forward import (PARTIAL_BUDGET_BYTES, launch_combine,
                                       launch_partials, sparse_attn_fwd)
from msa.ops.attention.naive import attention_forward_reference
from msa.ops.indexer.naive import indexer_reference
from msa.ops.indexer.triton import indexer_topk, selected_lse
from msa.ops.prepare import block_rows, plan_chunks
from msa.varlen import Segments

HQ, HKV, D, HI, DI, BS, K = 64, 4, 128, 4, 128, 128, 16
SCALE = D ** -0.5


def bench(fn, rep=100, warmup=25, return_mode="median", min_runs=10):
    """``triton.testing.do_bench`` over at least ``min_runs`` timed calls (and ``rep`` ms)
    after at least two warm-up calls: ``do_bench`` alone sizes its repetitions by the
    time budget, which at long lengths would time one or two calls."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=max(warmup, 2 * est),
                                   rep=max(rep, 1.2 * min_runs * est), return_mode=return_mode)


def sync_peak(fn):
    """(peak bytes allocated above the level before ``fn``, fn's result)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, r


def one_segment(T):
    return Segments([0], [T], [0], [T], T, T)


def selection(T, pattern, device, seed=0, chunk=16384):
    """``[Hkv, T, K]`` int32 synthetic selections (see module docstring)."""
    g = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for s0 in range(0, T, chunk):
        s1 = min(T, s0 + chunk)
        local = torch.arange(s0, s1, device=device) // BS
        r = torch.rand(HKV, s1 - s0, int(local.max()) + 1, generator=g, device=device)
        blocks = torch.arange(r.shape[-1], device=device).view(1, 1, -1)
        earlier = blocks < local.view(1, -1, 1)
        if pattern == "recency":
            r = r + 2 * (earlier & (blocks >= local.view(1, -1, 1) - 7))
        r = torch.where(earlier, r, torch.full_like(r, -1.0))
        top = torch.topk(r, min(K - 1, r.shape[-1]), dim=-1)
        ids = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
        out = torch.full((HKV, s1 - s0, K), -1, dtype=torch.int32, device=device)
        out[..., :ids.shape[-1]] = ids.to(torch.int32)
        nvalid = (ids >= 0).sum(-1, keepdim=True)
        out.scatter_(2, nvalid, local.view(1, -1, 1).expand(HKV, -1, 1).to(torch.int32))
        parts.append(out)
    return torch.cat(parts, 1)


def planted_topics(T, device, seed=0, ntopics=64, strength=0.5):
    """Index inputs ``qi [T, Hi, Di]``, ``ki [T, 1, Di]`` with planted block topics."""
    g = torch.Generator(device=device).manual_seed(seed)
    u = F.normalize(torch.randn(ntopics, DI, device=device, generator=g), dim=-1) * DI ** 0.5
    nb = -(-T // BS)
    block_topic = torch.randint(ntopics, (nb,), device=device, generator=g)
    ki = torch.randn(T, 1, DI, device=device, generator=g)
    ki[:, 0] += strength * u[block_topic.repeat_interleave(BS)[:T]]
    qi = torch.randn(T, HI, DI, device=device, generator=g)
    qi += strength * u[torch.randint(ntopics, (T, HI), device=device, generator=g)]
    return qi.bfloat16(), ki.bfloat16()


def causal_elements(T):
    return T * (T + 1) / 2


def sparse_elements(T):
    pos = torch.arange(T, dtype=torch.float64)
    return torch.minimum(pos + 1, (K - 1) * BS + pos % BS + 1).sum().item()


def stage_profile(q, k, v, topk, seg):
    """Planning, KV-outer kernel and combine timed alone over all query chunks."""
    T = q.shape[0]
    g = HQ // HKV
    rows = block_rows(seg, BS, q.device)
    chunk = min(T, PARTIAL_BUDGET_BYTES // (HKV * K * g * (D * 2 + 4)))
    po = torch.empty(chunk * HKV * K * g * D, dtype=torch.bfloat16, device=q.device)
    pl = torch.empty(chunk * HKV * K * g, dtype=torch.float32, device=q.device)
    out, lse = torch.empty_like(q), torch.empty(T, HQ, dtype=torch.float32, device=q.device)
    plans = plan_chunks(topk, rows, 0, T, chunk, HKV, 256)
    starts = [c0 for c0, _, _ in plans]
    plans = [p for _, _, p in plans]

    def kernels():
        for s, p in zip(starts, plans):
            launch_partials(q, k, v, rows, p, s, po, pl, scale=SCALE, ksel=K, block_size=BS)

    def combines():
        for s in starts:
            launch_combine(po, pl, topk, rows, out, lse, s, min(T, s + chunk), HKV)

    return dict(chunks=len(starts),
                plan_ms=bench(lambda: plan_chunks(topk, rows, 0, T, chunk, HKV, 256), 50),
                kernel_ms=bench(kernels, 50), combine_ms=bench(combines, 50),
                partial_bytes_per_pass=T * HKV * K * g * (D * 2 + 4))


def correctness(device, T=4000):
    """Indexer ids/LSE and attention vs the fp32 reference at the MSA shape."""
    seg = one_segment(T)
    g = torch.Generator(device=device).manual_seed(1)
    qi, ki = planted_topics(T, device, seed=1)
    idx = indexer_topk(qi, ki, seg, block_size=BS, topk=K, scale=DI ** -0.5)
    ref_idx, ref_lse = indexer_reference(qi.float(), ki.float(), seg, block_size=BS, topk=K,
                                         scale=DI ** -0.5)
    same_set = (torch.sort(idx, -1).values == torch.sort(ref_idx, -1).values).all(-1)
    local_last = idx.gather(-1, (torch.clamp(torch.arange(T, device=device) // BS, max=K - 1))
                            .view(1, -1, 1).expand(HI, T, 1).long())
    lse = selected_lse(qi, ki, idx, seg, block_size=BS, scale=DI ** -0.5)
    q = torch.randn(T, HQ, D, device=device, generator=g).bfloat16()
    k = torch.randn(T, HKV, D, device=device, generator=g).bfloat16()
    v = torch.randn(T, HKV, D, device=device, generator=g).bfloat16()
    out, alse = sparse_attn_fwd(q, k, v, idx, seg, block_size=BS, scale=SCALE,
                                out=torch.full_like(q, float("nan")))
    ro, rl = attention_forward_reference(q.float(), k.float(), v.float(), idx, seg,
                                         block_size=BS, scale=SCALE)
    res = dict(T=T, indexer_same_set_frac=same_set.float().mean().item(),
               indexer_local_last=bool((local_last.squeeze(-1) == (torch.arange(
                   T, device=device) // BS).int()).all()),
               indexer_lse_max_err=(lse - ref_lse).abs().max().item(),
               attn_out_max_err=(out.float() - ro).abs().max().item(),
               attn_lse_max_err=(alse - rl).abs().max().item(),
               any_nan=bool(torch.isnan(out).any()))
    res["passed"] = (res["indexer_same_set_frac"] > 0.999 and res["indexer_local_last"]
                     and res["indexer_lse_max_err"] < 2e-3 and res["attn_out_max_err"] < 3e-2
                     and res["attn_lse_max_err"] < 1e-3 and not res["any_nan"])
    return res


def fla_call(fla_fn, q, k, v, topk):
    idx = topk.transpose(0, 1).unsqueeze(0).long()                     # [1, T, Hkv, K]
    counts = (idx >= 0).sum(-1)
    srt = torch.sort(torch.where(idx >= 0, idx, torch.full_like(idx, 1 << 30)), -1).values
    srt = torch.where(srt == 1 << 30, torch.zeros_like(srt), srt)
    qb, kb, vb = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    return lambda: fla_fn(qb, kb, vb, block_indices=srt, block_counts=counts, block_size=BS,
                          scale=SCALE)


def run_length(T, device, dense_max, fla_fn, fla_max, profile_max):
    res = dict(T=T)
    gen = torch.Generator(device=device).manual_seed(T)
    q = torch.randn(T, HQ, D, device=device, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(T, HKV, D, device=device, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(T, HKV, D, device=device, generator=gen, dtype=torch.bfloat16)
    qi, ki = planted_topics(T, device, seed=T)
    seg = one_segment(T)
    rep = 100 if T <= 131072 else 10
    attn_flops = 4 * D * HQ * sparse_elements(T)
    idx_flops = 2 * DI * HI * causal_elements(T)
    topk_fn = lambda: indexer_topk(qi, ki, seg, block_size=BS, topk=K, scale=DI ** -0.5)
    idx = topk_fn()
    ms = bench(topk_fn, rep)
    res["indexer_topk"] = dict(ms=ms, tflops=idx_flops / ms / 1e9)
    ms = bench(lambda: selected_lse(qi, ki, idx, seg, block_size=BS, scale=DI ** -0.5), rep)
    res["selected_lse"] = dict(ms=ms)
    cu = torch.tensor([0, T], dtype=torch.int32, device=device)
    # e2e and attention go through the public API (argument checks, varlen metadata)
    e2e = lambda: msa.msa_sparse_attention(
        q, k, v, msa.msa_indexer(qi, ki, cu, cu, block_size=BS, topk=K, backend="triton"),
        cu, cu, block_size=BS, backend="triton")
    ms = bench(e2e, rep)
    peak, _ = sync_peak(e2e)
    res["e2e"] = dict(ms=ms, peak_extra_mb=(peak - q.numel() * 2) / 2 ** 20,
                      inputs_and_output_mb=(2 * q.numel() + 2 * k.numel() + qi.numel()
                                            + ki.numel()) * 2 / 2 ** 20)
    for pattern in ("random", "recency", "indexer"):
        topk = idx if pattern == "indexer" else selection(T, pattern, device)
        fn = lambda: msa.msa_sparse_attention(q, k, v, topk, cu, cu, block_size=BS,
                                              backend="triton")
        ms = bench(fn, rep)
        r = dict(ms=ms, tflops=attn_flops / ms / 1e9)
        if T <= profile_max:
            r.update(stage_profile(q, k, v, topk, seg))
        if fla_fn is not None and T <= fla_max:
            call = fla_call(fla_fn, q, k, v, topk)
            r["fla_max_abs_diff"] = (call()[0].float() - fn().float()).abs().max().item()
            r["fla_ms"] = bench(call, rep)
            r["speedup_vs_fla"] = r["fla_ms"] / ms
        res[pattern] = r
    if T <= dense_max:
        res.update(dense_baselines(q, k, v, rep, once=T > 262144))
    return res


def dense_baselines(q, k, v, rep, once=False):
    """Dense causal SDPA times (cuDNN, FlashAttention-2). ``once`` (beyond 256K tokens,
    where one call takes seconds): cuDNN only, one warm-up and one timed call (CUDA
    events), on the 16 query heads of one KV head (64 heads do not fit next to our inputs
    on an 80 GB card at 1M tokens), reported x Hq/16: dense attention is the same kernel
    over 4x the heads, linear in them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    T = q.shape[0]
    res = {}
    heads = HQ // HKV if once else HQ
    backends = (("cudnn", SDPBackend.CUDNN_ATTENTION),) if once else (
        ("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION))
    torch.cuda.empty_cache()
    qd = q[:, :heads].transpose(0, 1).unsqueeze(0)
    kd = k[:, :max(1, heads * HKV // HQ)].transpose(0, 1).unsqueeze(0) \
        .repeat_interleave(HQ // HKV, 1)
    vd = v[:, :max(1, heads * HKV // HQ)].transpose(0, 1).unsqueeze(0) \
        .repeat_interleave(HQ // HKV, 1)
    for name, backend in backends:
        try:
            with sdpa_kernel(backend):
                fn = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
                ms = (one_call_ms(fn) if once else bench(fn, rep)) * HQ / heads
            res[name] = dict(ms=ms, tflops=2 * D * HQ * T * T / ms / 1e9,
                             timing=f"one call on {heads} heads x {HQ // heads}" if once
                             else "do_bench median")
        except Exception as e:
            res[name] = dict(error=repr(e)[:200])
    return res


def one_call_ms(fn):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def recompile_check(device):
    """Wall time of the first call at a new length vs the warm call (no recompilation)."""
    out = {}
    for T in (20000, 20001, 33333):
        qi, ki = planted_topics(T, device, seed=T)
        q = torch.randn(T, HQ, D, device=device, dtype=torch.bfloat16)
        k = torch.randn(T, HKV, D, device=device, dtype=torch.bfloat16)
        seg = one_segment(T)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sparse_attn_fwd(q, k, k, indexer_topk(qi, ki, seg, block_size=BS, topk=K,
                                                  scale=DI ** -0.5), seg, block_size=BS,
                            scale=SCALE)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        out[T] = dict(first_ms=times[0], second_ms=times[1])
    return out


def load_fla():
    """fla's ``parallel_nsa`` or None (printed) when fla-core is not installed."""
    try:
        from fla.ops.nsa.parallel import parallel_nsa
        return parallel_nsa
    except Exception as e:
        print("fla unavailable:", repr(e)[:200])
        return None


def run_meta(commit):
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, date=time.strftime("%Y-%m-%d"), commit=commit,
                shape=dict(Hq=HQ, Hkv=HKV, D=D, Hi=HI, Di=DI, block=BS, topk=K, dtype="bf16"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="16k,64k,128k")
    ap.add_argument("--dense-max", type=int, default=262144)
    ap.add_argument("--fla-max", type=int, default=262144)
    ap.add_argument("--profile-max", type=int, default=262144)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    lengths = parse_lengths(args.lengths)
    device = torch.device("cuda")
    fla_fn = load_fla()
    meta = run_meta(args.commit)
    check = correctness(device)
    print("correctness:", json.dumps(check), flush=True)
    recompile = recompile_check(device)
    print("first call at new lengths:", json.dumps(recompile), flush=True)
    results = []
    for T in lengths:
        r = run_length(T, device, args.dense_max, fla_fn if check["passed"] else None,
                       args.fla_max, args.profile_max)
        results.append(r)
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, correctness=check, recompile=recompile,
                           results=results), f, indent=1)
    nan = float("nan")
    print(f"\n{meta['gpu']} torch {meta['torch']} triton {meta['triton']}")
    print(f"{'T':>8} {'idx ms':>8} {'idx TF':>7} {'e2e ms':>8} {'cudnn':>8} {'x cudnn':>7} "
          f"{'peak+ MB':>8} | attn ms random/recency/indexer (x fla)")
    for r in results:
        cud = r.get("cudnn", {}).get("ms", nan)
        att = " ".join(f"{r[p]['ms']:.1f}({r[p].get('speedup_vs_fla', nan):.2f})"
                       for p in ("random", "recency", "indexer"))
        print(f"{r['T']:>8} {r['indexer_topk']['ms']:8.1f} {r['indexer_topk']['tflops']:7.1f} "
              f"{r['e2e']['ms']:8.1f} {cud:8.1f} {cud / r['e2e']['ms']:7.2f} "
              f"{r['e2e']['peak_extra_mb']:8.0f} | {att}")


if __name__ == "__main__":
    main()
