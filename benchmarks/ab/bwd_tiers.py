"""Attention backward launch configurations (rows, stages, V on chip or per
tile), forced, timed on this card at 128K, MSA shape.

A/B run once on an H200 at commit b45e690 (its V_ONCE tier was reverted in 1158737, so this no longer runs at later commits):

    python benchmarks/ab/bwd_tiers.py

Writes its JSON to $OUT (or the current directory)."""
import json, os, sys
sys.path.insert(0, "benchmarks")
import torch
from bench_prefill import bench, selection, one_segment, HQ, HKV, D, BS
from msa.ops import launch
from msa.ops.attention.forward import sparse_attn_fwd
import msa.ops.attention.backward as bwd_mod
from msa.ops.attention.backward import sparse_attn_bwd

real = launch.launch_fitting


def pick(pred):
    def f(kernel, grid, args, configs, **fixed):
        return real(kernel, grid, args, [c for c in configs if pred(c)][:1], **fixed)
    return f


T = 131072
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
q = torch.randn(T, HQ, D, device=dev, generator=g).bfloat16()
k, v = (torch.randn(T, HKV, D, device=dev, generator=g).bfloat16() for _ in range(2))
do = torch.randn_like(q)
topk = selection(T, "random", dev)
seg = one_segment(T)
kw = dict(block_size=BS, scale=D ** -0.5)
o, lse = sparse_attn_fwd(q, k, v, topk, seg, **kw)
f = lambda: sparse_attn_bwd(q, k, v, topk, seg, o, lse, do, **kw)
ref = f()
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "T": T, "rows": []}
variants = [(64, 3, True), (64, 3, False), (64, 1, True), (64, 1, False), (32, 1, True),
            (32, 1, False)]
for r in range(2):
    for rows, st, vo in (variants if r == 0 else variants[::-1]):
        bwd_mod.launch_fitting = pick(lambda c: c["BLOCK_Q"] * 16 == rows and
                                      c["num_stages"] == st and c["V_ONCE"] == vo)
        got = f()
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref))
        row = dict(rows=rows, stages=st, v_once=vo, round=r, ms=bench(f, 30),
                   max_abs_diff_vs_default=diff)
        res["rows"].append(row)
        print(row, flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "bwd_tiers.json"), "w"), indent=1)
