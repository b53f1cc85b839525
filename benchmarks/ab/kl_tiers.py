"""Indexer-KL backward launch configurations (tile rows x keys / index keys
on chip or per tile), forced, timed on this card at 128K, MSA shape.

A/B run once on an H200 at commit a8f2801:

    python benchmarks/ab/kl_tiers.py

Writes its JSON to $OUT (or the current directory)."""
import json, os, sys
sys.path.insert(0, "benchmarks")
import torch
from bench_prefill import bench, selection, one_segment, planted_topics, HQ, HKV, D, BS
from msa.ops import launch
from msa.ops.attention.forward import sparse_attn_fwd
import msa.ops.kl.triton as kl_mod
from msa.ops.kl.triton import indexer_kl_bwd
from msa.ops.indexer.triton import selected_lse

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
topk = selection(T, "random", dev)
seg = one_segment(T)
kw = dict(block_size=BS, scale=D ** -0.5)
o, lse = sparse_attn_fwd(q, k, v, topk, seg, **kw)
qi, ki = planted_topics(T, dev, seed=T)
ilse = selected_lse(qi, ki, topk, seg, **kw)
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "T": T, "rows": []}
f = lambda: indexer_kl_bwd(q, k, lse, qi, ki, ilse, topk, seg, **kw, index_scale=D ** -0.5)
ref = f()
variants = [(bt * 16, k1, ki1) for bt, k1, ki1 in
            ((16, True, True), (8, True, True), (16, False, True), (8, False, True),
             (4, False, True), (16, False, False), (8, False, False), (4, False, False))]
for r in range(2):
    for rows, k1, ki1 in (variants if r == 0 else variants[::-1]):
        kl_mod.launch_fitting = pick(lambda c: c["BLOCK_T"] * 16 == rows and c["K_ONCE"] == k1
                                     and c["KI_ONCE"] == ki1)
        got = f()
        diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                   for a, b in zip(got, ref))
        row = dict(rows=rows, keys_once=k1, index_keys_once=ki1, round=r, ms=bench(f, 30),
                   max_rel_diff_vs_default=diff)
        res["rows"].append(row)
        print(row, flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "kl_tiers.json"), "w"), indent=1)
