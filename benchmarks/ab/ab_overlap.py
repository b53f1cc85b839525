"""Backward query-chunk size and a dQ-sum / combine overlapped on a
high-priority side stream with the next chunk's KV-outer kernel. 128K, MSA shape.

A/B run once on an H200 at commit c0943ee (the results JSON's source):

    python benchmarks/ab/ab_overlap.py

Writes its JSON to $OUT (or the current directory)."""
import json, os, sys
sys.path.insert(0, "benchmarks")
import torch
import triton
from bench_prefill import bench, selection, one_segment, HQ, HKV, D, BS
import msa.ops.attention.backward as B
import msa.ops.attention.forward as F
from msa.ops.launch import launch_fitting, smaller_tiles
from msa.ops.prepare import block_rows, plan_chunks

SCALE = D ** -0.5
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "triton": triton.__version__, "runs": []}


def bwd_variant(q, k, v, topk, seg, out, lse, dout, chunk, overlap, prio):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    hs, _, ksel = topk.shape
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    lse = lse.float().contiguous()
    delta = B._rowdot(dout, out)
    rows = block_rows(seg, BS, q.device)
    topk = topk.to(torch.int32).contiguous()
    g = hq // hkv
    g_pad = F._next_pow2(g)
    configs = smaller_tiles("BLOCK_Q", 64 // g_pad, g_pad, 3)
    per_query = hkv * ksel * g * d * q.dtype.itemsize
    nbuf = 2 if overlap else 1
    bufs = [torch.empty(chunk * per_query // 2, dtype=q.dtype, device=q.device)
            for _ in range(nbuf)]
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream(priority=prio) if overlap else None
    free = [None] * nbuf
    for i, (q0, q1, plan) in enumerate(plan_chunks(topk, rows, 0, total_q, chunk, hkv, 256)):
        slots = bufs[i % nbuf]
        if free[i % nbuf] is not None:
            main.wait_event(free[i % nbuf])
        launch_fitting(
            B.sparse_attn_bwd_kernel, (plan.num_items, 1),
            (q, k, v, dout, lse, delta, slots, dk, dv,
             rows.q_pos, plan.edge_q, plan.edge_slot, plan.item_h, plan.item_krow,
             plan.item_t0, plan.item_nk, plan.item_e0, plan.item_e1, q0, SCALE,
             SCALE * F.LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
             lse.stride(0)),
            configs, HKV=hkv, G=g, G_PAD=g_pad, D=d, BS=BS, BLOCK_N=128, KSEL=ksel, NSUB=1,
            DET=False, PRECISION="tf32", UPCAST=False, num_warps=8)
        s = main
        if overlap:
            ev = torch.cuda.Event()
            ev.record(main)
            side.wait_event(ev)
            s = side
        with torch.cuda.stream(s):
            B.dq_sum_kernel[((q1 - q0) * hkv,)](
                slots, topk, rows.q_nblocks, dq, q0, topk.stride(0), topk.stride(1),
                dq.stride(0), dq.stride(1), HKV=hkv, HS=hs, G=g, G_PAD=g_pad, D=d,
                KSEL=ksel, NSUB=1, num_warps=4)
        if overlap:
            free[i % nbuf] = torch.cuda.Event()
            free[i % nbuf].record(side)
    if overlap:
        main.wait_stream(side)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def fwd_variant(q, k, v, topk, seg, chunk, overlap, prio):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    hs, _, ksel = topk.shape
    out = torch.empty_like(q)
    lse = torch.empty((total_q, hq), dtype=torch.float32, device=q.device)
    topk = topk.to(torch.int32).contiguous()
    rows = block_rows(seg, BS, q.device)
    nbuf = 2 if overlap else 1
    bufs = [(torch.empty(chunk * hkv * ksel * g * d, dtype=q.dtype, device=q.device),
             torch.empty(chunk * hkv * ksel * g, dtype=torch.float32, device=q.device))
            for _ in range(nbuf)]
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream(priority=prio) if overlap else None
    free = [None] * nbuf
    for i, (q0, q1, plan) in enumerate(plan_chunks(topk, rows, 0, total_q, chunk, hkv, 256)):
        po, pl = bufs[i % nbuf]
        if free[i % nbuf] is not None:
            main.wait_event(free[i % nbuf])
        F.launch_partials(q, k, v, rows, plan, q0, po, pl, scale=SCALE, ksel=ksel,
                          block_size=BS)
        s = main
        if overlap:
            ev = torch.cuda.Event()
            ev.record(main)
            side.wait_event(ev)
            s = side
        with torch.cuda.stream(s):
            F.launch_combine(po, pl, topk, rows, out, lse, q0, q1, hkv)
        if overlap:
            free[i % nbuf] = torch.cuda.Event()
            free[i % nbuf].record(side)
    if overlap:
        main.wait_stream(side)
    return out, lse


def main():
    T = 131072
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(T, HQ, D, device=dev, generator=g).bfloat16()
    k = torch.randn(T, HKV, D, device=dev, generator=g).bfloat16()
    v = torch.randn(T, HKV, D, device=dev, generator=g).bfloat16()
    do = torch.randn(T, HQ, D, device=dev, generator=g).bfloat16()
    topk = selection(T, "random", dev)
    seg = one_segment(T)
    o_ref, l_ref = F.sparse_attn_fwd(q, k, v, topk, seg, block_size=BS, scale=SCALE)
    g_ref = B.sparse_attn_bwd(q, k, v, topk, seg, o_ref, l_ref, do, block_size=BS,
                              scale=SCALE)
    default_chunk = B.SLOT_BUDGET_BYTES // (HKV * 16 * (HQ // HKV) * D * 2)
    fchunk = F.PARTIAL_BUDGET_BYTES // (HKV * 16 * (HQ // HKV) * (D * 2 + 4))
    bvars = [(default_chunk, False, 0), (2 * default_chunk, False, 0),
             (4 * default_chunk, False, 0), (T, False, 0),
             (default_chunk, True, -1), (default_chunk // 2, True, -1),
             (default_chunk, True, 0), (2 * default_chunk, True, -1)]
    fvars = [(fchunk, False, 0), (fchunk // 2, True, -1), (fchunk // 4, True, -1),
             (fchunk // 2, True, 0)]
    res["default_bwd_chunk"], res["default_fwd_chunk"] = default_chunk, fchunk
    for c, ov, pr in bvars:
        dq, dk, dv = bwd_variant(q, k, v, topk, seg, o_ref, l_ref, do, c, ov, pr)
        row = dict(kind="bwd", chunk=c, overlap=ov, prio=pr, dq_bitwise=bool(torch.equal(dq, g_ref[0])),
                   dk_maxdiff=float((dk.float() - g_ref[1].float()).abs().max()),
                   dv_maxdiff=float((dv.float() - g_ref[2].float()).abs().max()))
        print(row, flush=True)
        res["runs"].append(row)
    for c, ov, pr in fvars:
        o, l = fwd_variant(q, k, v, topk, seg, c, ov, pr)
        row = dict(kind="fwd", chunk=c, overlap=ov, prio=pr,
                   bitwise=bool(torch.equal(o, o_ref) and torch.equal(l, l_ref)))
        print(row, flush=True)
        res["runs"].append(row)
    res["library_bwd_ms"] = bench(lambda: B.sparse_attn_bwd(
        q, k, v, topk, seg, o_ref, l_ref, do, block_size=BS, scale=SCALE), 30)
    res["library_fwd_ms"] = bench(lambda: F.sparse_attn_fwd(
        q, k, v, topk, seg, block_size=BS, scale=SCALE), 30)
    print("library", res["library_bwd_ms"], res["library_fwd_ms"], flush=True)
    for r in range(2):
        for c, ov, pr in (bvars if r == 0 else bvars[::-1]):
            ms = bench(lambda: bwd_variant(q, k, v, topk, seg, o_ref, l_ref, do, c, ov, pr), 30)
            row = dict(kind="bwd", chunk=c, overlap=ov, prio=pr, round=r, ms=ms)
            print(row, flush=True)
            res["runs"].append(row)
        for c, ov, pr in (fvars if r == 0 else fvars[::-1]):
            ms = bench(lambda: fwd_variant(q, k, v, topk, seg, c, ov, pr), 30)
            row = dict(kind="fwd", chunk=c, overlap=ov, prio=pr, round=r, ms=ms)
            print(row, flush=True)
            res["runs"].append(row)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "ab_overlap.json"), "w"),
              indent=1)


main()
