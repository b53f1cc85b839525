"""``msa bench vllm --vllm-ops DIR``: msa's vLLM drop-ins (``msa.integrations.vllm``)
against vLLM's own MiniMax-M3 Triton ops, same data, same paged layouts (MiniMax-M3 shape,
bf16, page = block = 128, pages shuffled in a pool).

Checks first (selections as sets, outputs with vLLM's own tolerances: mean abs diff
< 2.5e-4, max < 1.7e-2): prefill of several requests with prefixes (chunked prefill) on
random and needle data, decode of 1, 4 and 16 tokens per request. Then times, each side
calling its own five functions exactly as vLLM's indexer and attention backend do:

* prefill (index score + top-k + attention) of one request at each length;
* a mixed batch: a chunked prefill (8K new tokens over a 120K prefix) and 32 decode
  requests at 128K in one step;
* decode (index + attention, one CUDA graph each side): 1M x 1 request x 1 token and
  128K x 64 requests x 8 tokens.
"""
from __future__ import annotations

import torch

from . import common as C

BS = 128


def paged(cfg, k_lens, seed=0, needle=False):
    """``kv_cache [P, Hkv, 128, 2D]``, ``index_kv_cache [P, 128, Di]`` and a block table
    of the requests ``k_lens`` in a shuffled pool (bf16). ``needle``: one block per
    request holds index keys along a direction the queries share."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    nb = [-(-k // BS) for k in k_lens]
    pool = sum(nb) + 4
    kv = torch.randn(pool, cfg.num_kv_heads, BS, 2 * cfg.head_dim, generator=g, **bf)
    ik = torch.randn(pool, BS, cfg.index_dim, generator=g, **bf)
    perm = torch.randperm(pool, generator=g, device="cuda").to(torch.int32)
    table = torch.zeros(len(k_lens), max(nb), dtype=torch.int32, device="cuda")
    used = 0
    for r, n in enumerate(nb):
        table[r, :n] = perm[used:used + n]
        used += n
        if needle and n > 2:
            ik[int(table[r, n // 3])] += 4.0
    return kv, ik, table


def _i32(x):
    return torch.tensor(x, dtype=torch.int32, device="cuda")


def prefill_call(ns, cfg, kv, ik, table, q_lens, k_lens, seed=1, needle=False):
    """A function running ``ns``'s prefill ops like vLLM's backend -> (out, topk)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    tq = sum(q_lens)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(tq, cfg.num_heads, cfg.head_dim, **bf)
    qi = torch.randn(tq, cfg.index_heads, cfg.index_dim, **bf) + (0.4 if needle else 0.0)
    cu = _i32([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    seq = _i32(k_lens)
    prefix = _i32([k - q for k, q in zip(k_lens, q_lens)])
    out = torch.empty_like(q)
    mq, mk, h = max(q_lens), max(k_lens), cfg.num_kv_heads

    def run(topk=None):
        if topk is None:
            score = ns.minimax_m3_index_score(qi, ik, table, cu, seq, prefix, mq, mk, h)
            topk = ns.minimax_m3_index_topk(score, cu, prefix, mq, cfg.topk, 0, 1)
        ns.minimax_m3_sparse_attn(q, kv, topk, table, cu, seq, prefix, mq, h, cfg.scale, out)
        return out, topk
    return run


def decode_call(ns, cfg, kv, ik, table, k_lens, nq, seed=2):
    """A function running ``ns``'s decode ops into fixed buffers -> (out, topk)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = nq * len(k_lens)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(rows, cfg.num_heads, cfg.head_dim, **bf)
    qi = torch.randn(rows, cfg.index_heads, cfg.index_dim, **bf)
    seq = _i32(k_lens)
    out = torch.empty_like(q)
    buf = torch.empty(rows, cfg.num_kv_heads, cfg.topk, dtype=torch.int32, device="cuda")
    h = cfg.num_kv_heads

    def run(topk=None):
        if topk is None:
            topk = ns.minimax_m3_index_decode(qi, ik, table, seq, max(k_lens), cfg.topk, 0, 1,
                                              h, nq, nq, out=buf.transpose(0, 1))
        ns.minimax_m3_sparse_attn_decode(q, kv, topk, table, seq, h, cfg.scale, out, nq)
        return out, topk
    return run


def _sets(topk):
    return torch.sort(topk.long(), dim=-1).values


def compare(ours_run, theirs_run) -> dict:
    """Selections as sets (rows equal; near-tied blocks may swap: the two rank fp32
    block maxima summed in different orders); outputs of each side's attention on
    vLLM's selection."""
    o_out, o_sel = (x.clone() for x in ours_run())
    t_out, t_sel = (x.clone() for x in theirs_run())
    rows_equal = (_sets(o_sel) == _sets(t_sel)).all(-1).float().mean().item()
    o_out, _ = ours_run(t_sel)
    o_out = o_out.clone()
    diff = (o_out.float() - t_out.float()).abs()
    r = dict(rows_equal=rows_equal, mean_abs=diff.mean().item(), max_abs=diff.max().item(),
             cosine=C.cosine(o_out, t_out))
    r["passed"] = rows_equal >= 0.99 and r["mean_abs"] < 2.5e-4 and r["max_abs"] < 1.7e-2
    return r


def check(cfg, ours, theirs) -> dict:
    res = {}
    for needle in (False, True):
        q_lens, k_lens = [3000, 2048, 700], [9000, 2048, 5000]
        kv, ik, table = paged(cfg, k_lens, seed=3, needle=needle)
        res[f"prefill_{'needle' if needle else 'random'}"] = compare(
            prefill_call(ours, cfg, kv, ik, table, q_lens, k_lens, needle=needle),
            prefill_call(theirs, cfg, kv, ik, table, q_lens, k_lens, needle=needle))
    for nq in (1, 4, 16):
        k_lens = [5000, 777, 12345]
        kv, ik, table = paged(cfg, k_lens, seed=4)
        res[f"decode_q{nq}"] = compare(decode_call(ours, cfg, kv, ik, table, k_lens, nq),
                                       decode_call(theirs, cfg, kv, ik, table, k_lens, nq))
    res["passed"] = all(r["passed"] for r in res.values())
    return res


def _time(fn, reps=10):
    try:
        return C.timed(fn, reps=reps)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"


def run(args) -> int:
    from ..integrations.vllm import ops as ours
    from .decode import graph_ms
    loaded = C.load_vllm(args.vllm_ops)
    if loaded is None:
        print("msa bench vllm needs --vllm-ops DIR (python -m msa.bench.vllm_ops)")
        return 2
    sparse_attn, index_topk = loaded

    class theirs:                                  # vLLM's five names
        minimax_m3_sparse_attn = sparse_attn.minimax_m3_sparse_attn
        minimax_m3_sparse_attn_decode = sparse_attn.minimax_m3_sparse_attn_decode
        minimax_m3_index_score = index_topk.minimax_m3_index_score
        minimax_m3_index_topk = index_topk.minimax_m3_index_topk
        minimax_m3_index_decode = index_topk.minimax_m3_index_decode
    cfg = C.shape_config("m3")
    results = dict(meta=C.metadata("vllm"), check=check(cfg, ours, theirs), prefill=[],
                   mixed=None, decode=[])
    print("check:", results["check"], flush=True)
    if not results["check"]["passed"]:
        C.write(results, args)
        return 1
    for T in C.lengths(args, "16k,64k,128k,256k,512k,1m", "16k"):
        kv, ik, table = paged(cfg, [T], seed=T)
        r = dict(T=T)
        for name, ns in (("msa", ours), ("vllm", theirs)):
            fn = prefill_call(ns, cfg, kv, ik, table, [T], [T])
            r[f"{name}_ms"] = _time(fn, reps=3 if T >= 262144 else 10)
            del fn
            torch.cuda.empty_cache()
        if isinstance(r["vllm_ms"], float):
            r["speedup"] = r["vllm_ms"] / r["msa_ms"]
        print("prefill:", r, flush=True)
        results["prefill"].append(r)
        del kv, ik, table
        torch.cuda.empty_cache()
    if not args.quick:
        k_lens = [128000] + [131072] * 32
        kv, ik, table = paged(cfg, k_lens, seed=7)
        r = dict(case="8K over a 120K prefix + 32 decodes at 128K")
        for name, ns in (("msa", ours), ("vllm", theirs)):
            pre = prefill_call(ns, cfg, kv, ik, table[:1], [8192], [128000])
            dec = decode_call(ns, cfg, kv, ik, table[1:], k_lens[1:], 1)
            r[f"{name}_ms"] = _time(lambda: (pre(), dec()))
        r["speedup"] = r["vllm_ms"] / r["msa_ms"]
        print("mixed:", r, flush=True)
        results["mixed"] = r
        del kv, ik, table
        torch.cuda.empty_cache()
    for T, B, nq in ((1 << 20, 1, 1), (131072, 64, 8)) if not args.quick else ((65536, 4, 2),):
        kv, ik, table = paged(cfg, [T] * B, seed=B)
        r = dict(T=T, batch=B, tokens=nq)
        for name, ns in (("msa", ours), ("vllm", theirs)):
            fn = decode_call(ns, cfg, kv, ik, table, [T] * B, nq)
            r[f"{name}_us"] = 1e3 * graph_ms(fn, reps=50)
        r["speedup"] = r["vllm_us"] / r["msa_us"]
        print("decode:", r, flush=True)
        results["decode"].append(r)
        del kv, ik, table
        torch.cuda.empty_cache()
    C.write(results, args)
    return 0
