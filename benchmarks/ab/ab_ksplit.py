"""KV-outer forward with the whole block on chip vs walked in key
sub-blocks (KSPLIT), MSA shape at 128K, D=128 and D=256.

A/B run once on an H200 at commit 9fdf767, after copying c0943ee's forward beside the new one:

    git show c0943ee:msa/ops/attention/forward.py > msa/ops/attention/_forward_old.py
    python benchmarks/ab/ab_ksplit.py

Writes its JSON to $OUT (or the current directory)."""
import json, os, sys
sys.path.insert(0, "benchmarks")
import torch
import triton
from bench_prefill import bench, selection, one_segment, HQ, HKV, BS
import msa.ops.attention.forward as F
import msa.ops.attention._forward_old as F0      # the forward of c0943ee, copied on the device

res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "triton": triton.__version__, "runs": []}
orig = F.fwd_configs


def run(T, D, variants):
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(T, HQ, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(T, HKV, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(T, HKV, D, device="cuda", generator=g).bfloat16()
    topk = selection(T, "random", "cuda")
    seg = one_segment(T)
    f = lambda: F.sparse_attn_fwd(q, k, v, topk, seg, block_size=BS, scale=D ** -0.5)
    F.fwd_configs = orig
    o_ref, l_ref = f()
    outs = {}
    for name, cfg in variants:
        F.fwd_configs = orig if cfg is None else (lambda *a, cfg=cfg: [cfg])
        o, l = f()
        outs[name] = dict(T=T, D=D, variant=name, config=cfg,
                          out_maxdiff=float((o.float() - o_ref.float()).abs().max()),
                          lse_maxdiff=float((l - l_ref).abs().max()),
                          nan=bool(torch.isnan(o).any() or torch.isnan(l).any()))
        print(outs[name], flush=True)
    o0, l0 = F0.sparse_attn_fwd(q, k, v, topk, seg, block_size=BS, scale=D ** -0.5)
    outs["old_c0943ee"] = dict(T=T, D=D, variant="old_c0943ee",
                               bitwise=bool(torch.equal(o0, o_ref) and torch.equal(l0, l_ref)))
    print(outs["old_c0943ee"], flush=True)
    variants = variants + [("old_c0943ee", "old")]
    for r in range(2):
        for name, cfg in (variants if r == 0 else variants[::-1]):
            F.fwd_configs = orig if cfg in (None, "old") else (lambda *a, cfg=cfg: [cfg])
            fn = f if cfg != "old" else (lambda: F0.sparse_attn_fwd(
                q, k, v, topk, seg, block_size=BS, scale=D ** -0.5))
            outs[name][f"ms_round{r}"] = bench(fn, 30)
            print(name, r, outs[name][f"ms_round{r}"], flush=True)
    res["runs"] += list(outs.values())
    F.fwd_configs = orig


run(131072, 128, [("default", None),
                  ("ksplit64_64rows", dict(BLOCK_Q=4, num_stages=1, KSPLIT=64)),
                  ("ksplit32_64rows", dict(BLOCK_Q=4, num_stages=1, KSPLIT=32)),
                  ("ksplit64_128rows", dict(BLOCK_Q=8, num_stages=1, KSPLIT=64))])
run(131072, 256, [("default", None),
                  ("ksplit64_64rows", dict(BLOCK_Q=4, num_stages=1, KSPLIT=64)),
                  ("ksplit32_64rows", dict(BLOCK_Q=4, num_stages=1, KSPLIT=32))])
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "ab_ksplit.json"), "w"), indent=1)
