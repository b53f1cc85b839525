"""``msa bench decode``: one layer's decode step over a paged cache, CUDA graphs.

Cases (``context x batch x new tokens``): 1M x 1 x 1 and 128K x 64 x 8 by default.
Pages are scattered at random. Timed, each as a replayed CUDA graph: msa's
``PagedDecoder.run``; vLLM's MiniMax-M3 Triton decode (index decode + sparse attention
decode) on the same cache in its layout; the best dense decode (SDPA cuDNN and flash on
contiguous K/V, both tried). The HBM floor is the bytes a decode must read (every index
key of the context, the distinct selected K/V pages) over the copy bandwidth measured in
the same run. msa's selection and output are checked against the reference first.
Each step is timed twice: one graph per step (its launch included), and per layer in a
graph of ``LAYERS`` steps (as a model's decode graph replays its layers; launch shared).
Called eagerly, msa's step is also timed with its own graphs (``PagedDecoder``'s
default) and with plain launches (``graphs=False``), beside vLLM's eager decode.

FP8 pages (e4m3 rows with fp32 row scales, ``msa.ops.quant``) are timed beside bf16 in
the same run: K/V in FP8 with bf16 index keys (the ``PagedKVCache`` default for FP8, and
vLLM's FP8 layout), K/V plus index keys in FP8, bf16 pages whose index keys have an e4m3
or an int4 copy for the scan (the bf16 keys re-score its candidates, ``ki_scan``), and FP8
K/V with an int4 copy; each with its own floor (the copy's bytes and the re-scored
candidate pages included), its selection and output compared with bf16's. The index scan
(with the top-k merge) and the attention are also timed alone (bf16, FP8 and int4).

Chunked prefill over the cache (8K new tokens over 128K): the chunk's attention over
pages gathered first or read in place, bf16 and FP8 K/V (plain launches, peak memory).
"""
from __future__ import annotations

import time

import torch

from ..inference import PagedDecoder
from ..ops.decode.naive import paged_decode_reference
from ..ops.quant import dequantize, fake_quantize, quantize_e4m3, quantize_int4
from . import common as C

LAYERS = 8      # decode steps per graph for the per-layer times (``graph_ms``)


def graph_ms(fn, reps: int = 50, layers: int = 1) -> float:
    """Median ms of replaying a CUDA graph of ``fn`` (captured after two warm-up calls).
    ``layers > 1``: the graph holds ``fn`` that many times in a row, as a model's decode
    graph holds its layers, and the time is per call (the graph's launch, paid once per
    model step, is then shared)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            fn()
    return C.timed(graph.replay, reps=reps, warmup=3) / layers


def eager_us(fn, calls: int = 200) -> float:
    """Microseconds per call of ``fn`` called eagerly ``calls`` times in a row (after ten
    warm-up calls), synchronised once at the end: the host's launch cost where it
    exceeds the GPU's time."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes/s (read + write of 2 GiB)."""
    x = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    y = torch.empty_like(x)
    ms = C.timed(lambda: y.copy_(x), reps=10)
    return 2 * x.numel() * 2 / (ms / 1e3)


def make_cache(cfg, B: int, T: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bs = cfg.block_size
    per = -(-T // bs)
    pages = B * per + 8
    bf = dict(device="cuda", dtype=torch.bfloat16)
    k = torch.randn(pages, cfg.num_kv_heads, bs, cfg.head_dim, generator=g, **bf)
    v = torch.randn(pages, cfg.num_kv_heads, bs, cfg.head_dim, generator=g, **bf)
    ki = torch.randn(pages, bs, cfg.index_dim, generator=g, **bf)
    table = torch.randperm(pages, generator=g, device="cuda")[:B * per].view(B, per)
    return k, v, ki, table.to(torch.int32).contiguous()


def queries(cfg, rows: int, seed: int):
    """``q [rows, Hq, D]``, ``qi [rows, Hi, Di]`` bf16 on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", generator=g, dtype=torch.bfloat16)
    return (torch.randn(rows, cfg.num_heads, cfg.head_dim, **bf),
            torch.randn(rows, cfg.index_heads, cfg.index_dim, **bf))


def check(cfg) -> dict:
    B, T, Q = 3, 3000, 2
    k, v, ki, table = make_cache(cfg, B, T, seed=1)
    lens = torch.tensor([T, T - 500, T - 1200], dtype=torch.int32, device="cuda")
    q, qi = queries(cfg, B * Q, seed=2)
    dec = PagedDecoder(cfg, max_batch=B, num_q=Q, max_pages=table.shape[1], device="cuda")
    dec.plan(table, lens)
    out, topk = dec.run(q, qi, k, v, ki)
    r_out, _, r_topk = paged_decode_reference(
        q.float(), qi.float(), k.float(), v.float(), ki.float(), table, lens, num_q=Q,
        topk=cfg.topk, scale=cfg.scale, index_scale=cfg.index_scale)
    res = dict(topk_rows_equal_fp32_reference=C.rows_equal(topk, r_topk.int()),
               out_rel_err_vs_fp32_reference=C.rel_diff(out, r_out))
    # FP8 pages against the reference on their dequantized values (e4m3 index keys are
    # scored against e4m3 index queries, docs/semantics.md)
    (k8, ks), (v8, vs), (ki8, kis) = quantize_e4m3(k), quantize_e4m3(v), quantize_e4m3(ki)
    out, topk = dec.run(q, qi, k8, v8, ki8, k_scales=ks, v_scales=vs, ki_scales=kis)
    r_out, _, r_topk = paged_decode_reference(
        q.float(), fake_quantize(qi), dequantize(k8, ks), dequantize(v8, vs), dequantize(ki8, kis),
        table, lens, num_q=Q, topk=cfg.topk, scale=cfg.scale, index_scale=cfg.index_scale)
    res.update(fp8_topk_rows_equal_fp32_reference=C.rows_equal(topk, r_topk.int()),
               fp8_out_rel_err_vs_fp32_reference=C.rel_diff(out, r_out))
    res["passed"] = all(res[f"{p}topk_rows_equal_fp32_reference"] > 0.99 and
                        res[f"{p}out_rel_err_vs_fp32_reference"] < 1e-2 for p in ("", "fp8_"))
    return res


def vllm_decode(ops, q, qi, k, v, ki, table, lens, cfg, Q, scales=(None, None)):
    """vLLM's decode ops on the same pages in its layout (``scales``: its FP8 K/V scales,
    ``vllm_fp8``)."""
    sparse_attn, index_topk = ops
    kv_cache = torch.cat([k, v], -1)                       # [P, Hkv, 128, 2D]
    out = torch.empty_like(q)
    topk_buf = torch.empty(cfg.num_kv_heads, q.shape[0], cfg.topk, dtype=torch.int32,
                           device="cuda")
    max_len = table.shape[1] * cfg.block_size

    def run():
        topk = index_topk.minimax_m3_index_decode(qi, ki, table, lens, max_len, cfg.topk, 0, 1,
                                                  cfg.num_kv_heads, Q, Q, out=topk_buf)
        sparse_attn.minimax_m3_sparse_attn_decode(q, kv_cache, topk, table, lens,
                                                  cfg.num_kv_heads, cfg.scale, out, Q,
                                                  k_scale=scales[0], v_scale=scales[1])
        return out, topk
    return run


def token_scales(s: torch.Tensor) -> torch.Tensor:
    """Row scales ``[P, Hkv, page]`` in vLLM's per-token/head layout ``[Hkv, P * page]``
    (token ``page_id * page + offset``)."""
    return s.transpose(0, 1).reshape(s.shape[1], -1).contiguous()


def row_bytes(dim: int, fmt: str) -> float:
    """Bytes of one token row of ``dim`` values with its scales: ``"bf16"``, ``"e4m3"``
    (an fp32 scale) or ``"int4"`` (an fp16 scale per 32 values)."""
    return {"bf16": 2 * dim, "e4m3": dim + 4, "int4": dim / 2 + dim / 16}[fmt]


def floor_us(cfg, B: int, T: int, distinct: int, kv: str, ki: str, bw: float) -> float:
    """Bytes a step must read (every index key row of the context with its scales, in
    format ``ki``; the distinct selected K/V pages with theirs, in ``kv``) over the copy
    bandwidth."""
    index = B * T * row_bytes(cfg.index_dim, ki)
    pages = distinct * cfg.block_size * row_bytes(cfg.head_dim, kv)
    return (index + 2 * pages) / bw * 1e6


def run_case(cfg, T: int, B: int, Q: int, args, vllm, bw: float) -> dict:
    from ..ops.decode.rescore import num_candidates
    from ..ops.decode.select import paged_select
    from ..ops.decode.triton import paged_attend
    k, v, ki, table = make_cache(cfg, B, T)
    lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
    q, qi = queries(cfg, B * Q, seed=3)
    dec = PagedDecoder(cfg, max_batch=B, num_q=Q, max_pages=table.shape[1], device="cuda")
    dec.plan(table, lens)
    r = dict(context=T, batch=B, num_q=Q)
    r["msa_us"] = 1e3 * graph_ms(lambda: dec.run(q, qi, k, v, ki))
    r["msa_us_per_layer"] = 1e3 * graph_ms(lambda: dec.run(q, qi, k, v, ki), layers=LAYERS)
    # called eagerly: the decoder's own graphs (the default) and plain launches
    r["msa_eager_us"] = eager_us(lambda: dec.run(q, qi, k, v, ki))
    launches = PagedDecoder(cfg, max_batch=B, num_q=Q, max_pages=table.shape[1],
                            device="cuda", graphs=False)
    launches.plan(table, lens)
    r["msa_eager_launches_us"] = eager_us(lambda: launches.run(q, qi, k, v, ki))
    out, topk = (x.clone() for x in dec.run(q, qi, k, v, ki))
    # distinct (request, KV head, page) a step reads; one index head per KV head
    per = topk.view(cfg.index_heads, B, Q * cfg.topk).long()
    distinct = sum(int(torch.unique(x[x >= 0]).numel()) for row in per for x in row) * \
        cfg.num_kv_heads // cfg.index_heads
    r["floor_us"] = floor_us(cfg, B, T, distinct, "bf16", "bf16", bw)
    r["msa_vs_floor"] = r["msa_us"] / r["floor_us"]
    r["msa_per_layer_vs_floor"] = r["msa_us_per_layer"] / r["floor_us"]
    rows = B * Q
    common = dict(batch=B, num_q=Q, max_pages=dec.max_pages, block_size=cfg.block_size)

    def select(ki_pages, ki_scales=None):
        return lambda: paged_select(
            qi, ki_pages, dec.page_table, dec.seq_lens, candidates=dec.candidates[:rows],
            topk_indices=dec.topk_indices[:, :rows], index_scale=cfg.index_scale,
            ki_scales=ki_scales, **common)

    def attend(k_pages, v_pages, k_scales=None, v_scales=None):
        return lambda: paged_attend(
            q, k_pages, v_pages, topk, dec.page_table, dec.seq_lens, batch=B, num_q=Q,
            num_kv_heads=cfg.num_kv_heads, out=dec.out[:rows], lse=dec.lse[:rows],
            partials=dec.partials, block_size=cfg.block_size,
            scale=cfg.scale, k_scales=k_scales, v_scales=v_scales)
    r["select_us"] = 1e3 * graph_ms(select(ki))
    r["attend_us"] = 1e3 * graph_ms(attend(k, v))

    (k8, ks), (v8, vs), (ki8, kis) = quantize_e4m3(k), quantize_e4m3(v), quantize_e4m3(ki)
    ki4 = quantize_int4(ki)
    fp8, outs = {}, {}

    def rescore_us(copy):
        """The re-scored cases scan a copy of the bf16 index keys, which then re-score its
        candidates: their pages join the floor."""
        return rows * cfg.index_heads * num_candidates(cfg.topk, copy.dtype) * \
            cfg.block_size * row_bytes(cfg.index_dim, "bf16") / bw * 1e6
    for name, pages, kw, floor in (
            ("kv", (k8, v8, ki), dict(k_scales=ks, v_scales=vs),
             floor_us(cfg, B, T, distinct, "e4m3", "bf16", bw)),
            ("kv_ki", (k8, v8, ki8), dict(k_scales=ks, v_scales=vs, ki_scales=kis),
             floor_us(cfg, B, T, distinct, "e4m3", "e4m3", bw)),
            ("ki_rescored", (k, v, ki), dict(ki_scan=(ki8, kis)),
             floor_us(cfg, B, T, distinct, "bf16", "e4m3", bw) + rescore_us(ki8)),
            ("ki_int4_rescored", (k, v, ki), dict(ki_scan=ki4),
             floor_us(cfg, B, T, distinct, "bf16", "int4", bw) + rescore_us(ki4[0])),
            ("kv_int4_rescored", (k8, v8, ki), dict(k_scales=ks, v_scales=vs, ki_scan=ki4),
             floor_us(cfg, B, T, distinct, "e4m3", "int4", bw) + rescore_us(ki4[0]))):
        def step(pages=pages, kw=kw):
            return dec.run(q, qi, *pages, **kw)
        d = dict(msa_us=1e3 * graph_ms(step),
                 msa_us_per_layer=1e3 * graph_ms(step, layers=LAYERS))
        o8, t8 = step()
        outs[name] = o8.clone()
        d["topk_rows_equal_bf16"] = C.rows_equal(t8, topk)
        d["cosine_vs_bf16"] = C.cosine(o8, out)
        d["floor_us"] = floor
        d["msa_vs_floor"] = d["msa_us"] / d["floor_us"]
        d["msa_per_layer_vs_floor"] = d["msa_us_per_layer"] / d["floor_us"]
        if name == "kv":
            d["attend_us"] = 1e3 * graph_ms(attend(k8, v8, ks, vs))
        elif name == "kv_ki":
            d["select_us"] = 1e3 * graph_ms(select(ki8, kis))
        elif name == "ki_int4_rescored":        # the int4 scan and its merge alone
            d["select_us"] = 1e3 * graph_ms(select(*ki4))
        fp8[name] = d
    r["fp8"] = fp8
    del k8, v8, ki8, ki4
    if vllm is not None:
        run = vllm_decode(vllm, q, qi, k, v, ki, table, lens, cfg, Q)
        v_out, v_topk = run()
        r["vllm_us"] = 1e3 * graph_ms(run)
        r["vllm_us_per_layer"] = 1e3 * graph_ms(run, layers=LAYERS)
        r["vllm_eager_us"] = eager_us(run)
        r["vllm_topk_rows_equal"] = C.rows_equal(v_topk, topk)
        r["vllm_cosine"] = C.cosine(v_out, out)
        del run
        torch.cuda.empty_cache()
        (k8, ks), (v8, vs) = quantize_e4m3(k), quantize_e4m3(v)
        run = vllm_decode(vllm, q, qi, k8, v8, ki, table, lens, cfg, Q,
                          scales=(token_scales(ks), token_scales(vs)))
        v_out, v_topk = run()
        r["vllm_fp8_kv_us"] = 1e3 * graph_ms(run)
        r["vllm_fp8_kv_us_per_layer"] = 1e3 * graph_ms(run, layers=LAYERS)
        r["vllm_fp8_kv_topk_rows_equal"] = C.rows_equal(v_topk, topk)
        r["vllm_fp8_kv_cosine_vs_msa_fp8_kv"] = C.cosine(v_out, outs["kv"])
        del run, k8, v8
        torch.cuda.empty_cache()
    if C.wants(args, "dense"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right
        kd = torch.randn(B, cfg.num_kv_heads, T, cfg.head_dim, device="cuda",
                         dtype=torch.bfloat16)
        vd = torch.randn_like(kd)
        qd = q.view(B, Q, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        mask = causal_lower_right(Q, T) if Q > 1 else None
        kinds = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
        d = {}
        for name in kinds:
            try:
                def fn(name=name):
                    with sdpa_kernel(kinds[name]):
                        return torch.nn.functional.scaled_dot_product_attention(
                            qd, kd, vd, attn_mask=mask, enable_gqa=True)
                d[name] = 1e3 * graph_ms(fn, reps=20)
            except RuntimeError as e:
                d[name] = None
                print(f"  dense {name}: {str(e).splitlines()[0][:100]}")
        ok = {n: x for n, x in d.items() if x is not None}
        d["best_backend"] = min(ok, key=ok.get) if ok else None
        d["best_us"] = ok[d["best_backend"]] if ok else None
        d["floor_us"] = B * T * cfg.num_kv_heads * cfg.head_dim * 2 * 2 / bw * 1e6
        r["dense"] = d
        if d["best_us"]:
            r["speedup_vs_best_dense"] = d["best_us"] / r["msa_us"]
        del kd, vd
    return r


def chunked_prefill(cfg, T: int, new: int) -> dict:
    """``new`` query tokens over a ``T``-token paged cache (one request, the chunk's keys
    included): the chunk's attention over pages gathered first (``paged_attention``) or
    read in place (``paged_attention_in_place``), bf16 and FP8 (e4m3 K/V) pages, on one
    selection (``paged_indexer``, outside the timing)."""
    from ..inference import paged_attention, paged_attention_in_place, paged_indexer
    k, v, ki, table = make_cache(cfg, 1, T, seed=4)
    lens = torch.tensor([T], dtype=torch.int32, device="cuda")
    q, qi = queries(cfg, new, seed=5)
    topk = paged_indexer(qi, ki, table, lens, [new], block_size=cfg.block_size,
                         topk=cfg.topk, softmax_scale=cfg.index_scale)
    (k8, ks), (v8, vs) = quantize_e4m3(k), quantize_e4m3(v)
    res = dict(context=T, new_tokens=new)
    for name, pages, kw in (("bf16", (k, v), {}),
                            ("fp8_kv", (k8, v8), dict(k_scales=ks, v_scales=vs))):
        def gather():
            return paged_attention(q, *pages, topk, table, lens, [new],
                                   softmax_scale=cfg.scale, **kw)

        def in_place():
            return paged_attention_in_place(q, *pages, topk, table, lens, [new],
                                            softmax_scale=cfg.scale, **kw)
        a, b = gather(), in_place()
        res[name] = dict(gather_ms=C.timed(gather), in_place_ms=C.timed(in_place),
                         gather_peak_mb=C.peak_bytes(gather) / 2 ** 20,
                         in_place_peak_mb=C.peak_bytes(in_place) / 2 ** 20,
                         cosine_in_place_vs_gather=C.cosine(b, a))
    return res


def run(args) -> int:
    results = dict(meta=C.metadata("decode"), cases=[])
    vllm = C.load_vllm(args.vllm_ops) if C.wants(args, "vllm") else None
    bw = copy_bandwidth()
    results["meta"].update(vllm=vllm is not None, copy_bandwidth_gbs=bw / 1e9)
    cfg = C.shape_config(args.shape.split(",")[0])
    ok = check(cfg)
    results["check"] = ok
    print("check:", ok)
    cases = [(64 * 1024, 1, 1), (128 * 1024, 4, 1)] if args.quick else \
        [(1 << 20, 1, 1), (128 * 1024, 64, 8)]
    if ok["passed"]:
        for T, B, Q in cases:
            r = run_case(cfg, T, B, Q, args, vllm, bw)
            print(r, flush=True)
            results["cases"].append(r)
            torch.cuda.empty_cache()
        T, new = (32 * 1024, 2048) if args.quick else (128 * 1024, 8192)
        results["chunked_prefill"] = chunked_prefill(cfg, T, new)
        print("chunked prefill:", results["chunked_prefill"], flush=True)
    C.write(results, args)
    return 0

