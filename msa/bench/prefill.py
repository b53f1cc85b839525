"""``msa bench prefill``: indexer + sparse attention forward on one sequence.

Per shape and length (bf16, batch 1, random inputs; ``--selection structured``: index
inputs whose selection is local, shared by neighbouring queries and has a sink,
``msa.bench.selection``): msa end to end through the public
API (``msa_indexer`` then ``msa_sparse_attention``), the indexer alone, the attention
alone on that selection (planning included), the same queued behind other GPU work
(``attention_behind_work_ms``: ``attention_ms`` less it is the time the host paced the
GPU before the call's first host synchronisation) and one profiled call of it
(``attention_timeline``, ``msa.bench.timeline``: kernels by device time, where the GPU
idled), planning alone (what the API plans for the kernel it chooses: the union plan, or
the KV-outer chunks); beside them, in the same
run, the best dense causal kernel (SDPA cuDNN and flash, both tried; beyond
``--dense-max`` measured on one KV group and scaled by Hkv, recorded as such), fla's
``parallel_nsa`` on the same selection, and vLLM's MiniMax-M3 Triton prefill ops (index
score + top-k + sparse attention on a paged copy of the same cache). Outputs are checked
first: msa against the fp32 reference at 4K tokens, fla and vLLM against msa. The
forward kernels (Triton KV-outer, union and, on Hopper, Gluon KV-outer) are timed on one
plan.
"""
from __future__ import annotations

import torch

import msa
from ..ops import plan as P
from ..ops import workspace as W
from ..ops.attention.naive import attention_forward_reference
from ..varlen import Segments
from . import common as C
from .selection import inputs, selection_stats
from .timeline import gpu_timeline


def sparse_elements(T: int, cfg) -> float:
    """Attended (query, key) pairs per head with full selections."""
    pos = torch.arange(T, dtype=torch.float64)
    cap = (cfg.topk - 1) * cfg.block_size + pos % cfg.block_size + 1
    return torch.minimum(pos + 1, cap).sum().item()


def fresh(topk: torch.Tensor) -> None:
    """Forget the plan of ``topk`` (so a timed call plans again) but keep it trusted."""
    P.forget(topk)
    P.mark_trusted(topk)


def fla_call(fla, q, k, v, topk, cfg):
    idx = topk.transpose(0, 1).unsqueeze(0).long()                 # [1, T, Hkv, K]
    counts = (idx >= 0).sum(-1)
    srt = torch.sort(torch.where(idx >= 0, idx, torch.full_like(idx, 1 << 30)), -1).values
    srt = torch.where(srt == 1 << 30, torch.zeros_like(srt), srt)
    qb, kb, vb = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    return lambda: fla(qb, kb, vb, block_indices=srt, block_counts=counts,
                       block_size=cfg.block_size, scale=cfg.scale)[0]


def vllm_prefill(ops, q, k, v, qi, ki, cfg):
    """vLLM's prefill ops on a paged copy (pages in order) of one sequence: returns a
    function computing ``(out, topk_indices)``."""
    sparse_attn, index_topk = ops
    T, bs = q.shape[0], cfg.block_size
    nb = -(-T // bs)
    pad = nb * bs - T
    kv = torch.cat([k, v], -1)                                     # [T, Hkv, 2D]
    kv = torch.nn.functional.pad(kv, (0, 0, 0, 0, 0, pad)).view(nb, bs, cfg.num_kv_heads, -1)
    kv_cache = kv.transpose(1, 2).contiguous()                     # [NB, Hkv, 128, 2D]
    ki_cache = torch.nn.functional.pad(ki[:, 0], (0, 0, 0, pad)).view(nb, bs, -1).contiguous()
    i32 = dict(dtype=torch.int32, device="cuda")
    table = torch.arange(nb, **i32).view(1, -1)
    cu = torch.tensor([0, T], **i32)
    seq_lens, prefix = torch.tensor([T], **i32), torch.zeros(1, **i32)
    out = torch.empty_like(q)

    def run():
        score = index_topk.minimax_m3_index_score(qi, ki_cache, table, cu, seq_lens, prefix,
                                                  T, T, cfg.num_kv_heads)
        topk = index_topk.minimax_m3_index_topk(score, cu, prefix, T, cfg.topk, 0, 1)
        sparse_attn.minimax_m3_sparse_attn(q, kv_cache, topk, table, cu, seq_lens, prefix, T,
                                           cfg.num_kv_heads, cfg.scale, out)
        return out, topk
    return run


def precisions(args) -> list:
    """The ``--index-precision`` list (``input`` is always timed)."""
    return (getattr(args, "index_precision", None) or "input").split(",")


# union kernel variants timed by ``kernels``: name -> ``union_fwd``'s launch options
UNION_VARIANTS = dict(union=dict(tile_rows=64), union_128_rows=dict(tile_rows=128),
                      union_tma=dict(tma=True), union_tma_128_rows=dict(tile_rows=128, tma=True),
                      union_gluon=dict(gluon=True))


def kernels(q, k, v, topk, seg, cfg, chunk: int, reps: int) -> dict:
    """The forward kernel the public API runs (``msa.attention_kernel``) and the kernels
    timed on one plan (planning excluded), with the cosine of each output against the
    Triton KV-outer kernel's: that kernel, on Hopper the Gluon kernel, and the union
    kernel (``msa.ops.attention.union``) in each of ``UNION_VARIANTS`` (TMA and Gluon
    ones on Hopper only; each tile size's plan timed apart, with its union blocks per
    selected block)."""
    from ..ops.attention import forward as F
    from ..ops.attention.union import build_union_plan, union_fwd
    from ..ops.plan import tile_queries
    from ..ops.launch import on_hopper
    d = dict(forward_kernel=msa.attention_kernel(q, k, v, block_size=cfg.block_size,
                                                 topk_indices=topk))
    group = cfg.num_heads // cfg.num_kv_heads
    plan = P.build_plan(topk, seg, block_size=cfg.block_size, heads=cfg.num_kv_heads,
                        chunk=chunk, q_per_item=W.item_queries(group))
    idx = plan.indices(topk)

    def kv_outer(kernel):
        return lambda: F.sparse_attn_fwd(q, k, v, topk, plan, scale=cfg.scale,
                                         query_major=False, kernel=kernel)[0]

    def union(options):
        def run():
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
            union_fwd(q, k, v, idx, plan, out, lse, scale=cfg.scale, **options)
            return out
        return run
    runs = dict(triton=kv_outer("triton"))
    if F.forward_kernel(q, k, v, cfg.block_size) == "gluon":
        runs["gluon"] = kv_outer("gluon")
    for name, options in UNION_VARIANTS.items():
        if on_hopper(q) or not (options.get("tma") or options.get("gluon")):
            runs[name] = union(options)
    base = runs["triton"]()
    for name, run in runs.items():
        if name != "triton":
            d[f"{name}_attention_cosine_vs_triton"] = C.cosine(run(), base)
    del base
    for name, run in runs.items():
        d[f"{name}_kernel_attention_ms"] = C.timed(run, reps)
    for rows in (64, 128):
        qt = tile_queries(group, cfg.topk, rows)
        d[f"union_{rows}_rows_plan_ms"] = C.timed(lambda: build_union_plan(idx, plan, qt, group),
                                                  reps)
        d[f"union_{rows}_rows_blocks_per_selected_block"] = \
            P.blocks_per_selected_block(idx, qt)
    return d


def fp8_index(T: int, q, k, v, qi, ki, cu, cfg, topk, flops: float, reps: int, indexer) -> dict:
    """FP8 index scoring beside the input-precision selection ``topk``: rows equal, the
    whole indexer, its e4m3 scan alone, and end to end (indexer + attention)."""
    from ..ops.indexer.triton import FP8_SCAN, scan_topk
    from ..ops.quant import FP8_CANDIDATES
    try:
        from ..ops.indexer import gluon
    except ImportError:                        # a Triton without Gluon: no Gluon scan
        gluon = None
    seg = Segments([0], [T], [0], [T], T, T)
    fp8 = indexer("fp8")
    d = dict(topk_rows_equal_input_precision=C.rows_equal(fp8, topk))
    del fp8
    bs, K = cfg.block_size, cfg.topk
    d["indexer_ms"] = C.timed(lambda: indexer("fp8"), reps)
    d["indexer_tflops"] = flops / d["indexer_ms"] / 1e9

    def scan(kernel):
        return scan_topk(qi, ki, seg, bs, K + FP8_CANDIDATES, cfg.index_scale, True,
                         kernel=kernel)
    for kernel in ("one_pass", "two_pass"):
        d[f"{kernel}_scan_ms"] = C.timed(lambda: scan(kernel), reps)
        d[f"{kernel}_scan_tflops"] = flops / d[f"{kernel}_scan_ms"] / 1e9
    d["scan_ms"] = d[f"{FP8_SCAN}_scan_ms"]                 # the default scan
    d["scan_tflops"] = d[f"{FP8_SCAN}_scan_tflops"]
    if gluon and gluon.supported(qi.device, qi.shape[1], qi.shape[2], bs):    # Hopper
        # the Gluon scan has the one-pass scan's contract (fp32 sums): the same rows
        d["gluon_scan_rows_equal_one_pass_scan"] = C.rows_equal(scan("gluon"),
                                                                scan("one_pass"))
        d["gluon_scan_ms"] = C.timed(lambda: scan("gluon"), reps)
        d["gluon_scan_tflops"] = flops / d["gluon_scan_ms"] / 1e9
    d["rescoring_ms"] = d["indexer_ms"] - d["scan_ms"]
    d["e2e_ms"] = C.timed(lambda: msa.msa_sparse_attention(q, k, v, indexer("fp8"), cu, cu,
                                                           block_size=bs), reps)
    return d


def check(cfg, T: int = 4096) -> dict:
    q, k, v, qi, ki = inputs(T, cfg, seed=1)
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    topk = msa.msa_indexer(qi, ki, cu, cu, block_size=cfg.block_size, topk=cfg.topk)
    out = msa.msa_sparse_attention(q, k, v, topk, cu, cu, block_size=cfg.block_size)
    seg = Segments([0], [T], [0], [T], T, T)
    ref, _ = attention_forward_reference(q.float(), k.float(), v.float(), topk, seg,
                                         block_size=cfg.block_size, scale=cfg.scale)
    ref_idx = msa.msa_indexer(qi.float(), ki.float(), cu, cu, block_size=cfg.block_size,
                              topk=cfg.topk, backend="reference")
    res = dict(T=T, out_rel_err_vs_fp32_reference=C.rel_diff(out, ref),
               topk_rows_equal_fp32_reference=C.rows_equal(topk, ref_idx))
    from ..ops.attention.forward import sparse_attn_fwd
    plan = P.build_plan(topk, seg, block_size=cfg.block_size, heads=cfg.num_kv_heads, chunk=T)
    union = sparse_attn_fwd(q, k, v, topk, plan, scale=cfg.scale, kernel="union")[0]
    res["union_out_rel_err_vs_fp32_reference"] = C.rel_diff(union, ref)
    fp8 = msa.msa_indexer(qi, ki, cu, cu, block_size=cfg.block_size, topk=cfg.topk,
                          index_precision="fp8")
    ref_fp8 = msa.msa_indexer(qi.float(), ki.float(), cu, cu, block_size=cfg.block_size,
                              topk=cfg.topk, backend="reference", index_precision="fp8")
    res["fp8_topk_rows_equal_fp32_reference"] = C.rows_equal(fp8, ref_fp8)
    res["passed"] = res["out_rel_err_vs_fp32_reference"] < 1e-2 and \
        res["union_out_rel_err_vs_fp32_reference"] < 1e-2 and \
        res["topk_rows_equal_fp32_reference"] > 0.99 and \
        res["fp8_topk_rows_equal_fp32_reference"] > 0.99
    return res


def run_length(T: int, cfg, args, fla, vllm) -> dict:
    q, k, v, qi, ki = inputs(T, cfg, seed=T, selection=args.selection)
    bs, K = cfg.block_size, cfg.topk
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    reps = 10 if T <= 262144 else 3
    r = dict(T=T)

    def indexer(precision="input"):
        return msa.msa_indexer(qi, ki, cu, cu, block_size=bs, topk=K,
                               index_precision=precision)
    topk = indexer()
    r.update(selection_stats(topk, bs))
    flops = 2 * cfg.index_dim * cfg.index_heads * T * (T + 1) / 2
    if "fp8" in precisions(args):
        r["fp8"] = fp8_index(T, q, k, v, qi, ki, cu, cfg, topk, flops, reps, indexer)

    def attention():
        fresh(topk)
        return msa.msa_sparse_attention(q, k, v, topk, cu, cu, block_size=bs)

    def e2e():
        return msa.msa_sparse_attention(q, k, v, indexer(), cu, cu, block_size=bs)

    seg = Segments([0], [T], [0], [T], T, T)
    chunk = W.forward_chunk(cfg.num_heads, cfg.head_dim, 2, K)

    def planning():
        """What the public API plans before its kernel runs: the plan, the kernel's choice
        and that kernel's work list (the union plan, or the KV-outer chunks)."""
        from ..ops.attention import forward as F, union as U
        group = cfg.num_heads // cfg.num_kv_heads
        plan = P.build_plan(topk, seg, block_size=bs, heads=cfg.num_kv_heads, chunk=chunk,
                            q_per_item=W.item_queries(group))
        idx = plan.indices(topk)
        if F.selection_kernel(q, k, v, idx, plan) == "union":       # the Gluon union kernel
            return U.gluon_union_plan(idx, plan, group)
        return plan.chunks
    sparse = sparse_elements(T, cfg)
    r["e2e_ms"] = C.timed(e2e, reps)
    r["e2e_peak_mb"] = C.peak_bytes(e2e) / 2 ** 20
    r["indexer_ms"] = C.timed(indexer, reps)
    r["indexer_tflops"] = flops / r["indexer_ms"] / 1e9
    r["attention_ms"] = C.timed(attention, reps)
    r["attention_behind_work_ms"] = C.timed_behind_work(attention, reps)
    r["attention_tflops"] = 4 * cfg.head_dim * cfg.num_heads * sparse / r["attention_ms"] / 1e9
    r["attention_timeline"] = gpu_timeline(attention)
    r["planning_ms"] = C.timed(planning, reps)
    r.update(kernels(q, k, v, topk, seg, cfg, chunk, reps))
    out = attention()
    if C.wants(args, "dense"):
        scaled = T > args.dense_max
        hq = cfg.num_heads // cfg.num_kv_heads if scaled else cfg.num_heads
        hk = 1 if scaled else cfg.num_kv_heads
        qd = q[:, :hq].transpose(0, 1).unsqueeze(0)
        kd, vd = (x[:, :hk].transpose(0, 1).unsqueeze(0) for x in (k, v))
        d = C.best_dense(lambda b: (lambda: C.dense_causal(qd, kd, vd, b)),
                         reps=3 if T > 131072 else 10)
        if scaled:
            d = {n: (x * cfg.num_kv_heads if isinstance(x, float) else x) for n, x in d.items()}
            d["note"] = f"measured on one KV group ({hq} q heads), x{cfg.num_kv_heads}"
        r["dense"] = d
        if d["best"]:
            r["e2e_speedup_vs_best_dense"] = d["best"] / r["e2e_ms"]
    if fla is not None and T <= args.fla_max:
        call = fla_call(fla, q, k, v, topk, cfg)
        r["fla_attention_ms"] = C.timed(call, reps)
        r["fla_cosine"] = C.cosine(call(), out)
        r["attention_speedup_vs_fla"] = r["fla_attention_ms"] / r["attention_ms"]
    if vllm is not None and T <= args.vllm_max:
        try:
            run = vllm_prefill(vllm, q, k, v, qi, ki, cfg)
            v_out, v_topk = run()
            r["vllm_e2e_ms"] = C.timed(run, reps)
            ours = torch.sort(torch.where(topk >= 0, topk, 1 << 30), -1).values
            theirs = torch.sort(torch.where(v_topk >= 0, v_topk, 1 << 30), -1).values
            r["vllm_topk_rows_equal"] = (ours == theirs).all(-1).float().mean().item()
            r["vllm_cosine"] = C.cosine(v_out, out)
            r["e2e_speedup_vs_vllm"] = r["vllm_e2e_ms"] / r["e2e_ms"]
        except torch.OutOfMemoryError:
            r["vllm_e2e_ms"] = "out of memory"
            torch.cuda.empty_cache()
    return r


def run(args) -> int:
    results = dict(meta=C.metadata("prefill"), shapes={})
    fla = C.load_fla() if C.wants(args, "fla") else None
    vllm = C.load_vllm(args.vllm_ops) if C.wants(args, "vllm") else None
    results["meta"].update(fla=fla is not None, vllm=vllm is not None)
    C.over_shapes(args, results, check,
                  lambda T, cfg, name: run_length(T, cfg, args, fla if name == "m3" else None,
                                                  vllm),
                  "64k,128k,256k,512k,1m", "16k,64k")
    C.write(results, args)
    return 0
