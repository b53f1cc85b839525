"""``msa bench m3``: MiniMax-M3 in transformers at long context, on msa.

A MiniMax-M3 text model with the released attention shapes (64 / 4 heads, head dim 128,
index 4 x 128, blocks of 128, top-16, partial RoPE 0.5, QK-norm) and small everything
else (hidden 1024, two layers: one full-attention, one sparse; random weights; bf16):

* a sparse layer's attention step inside transformers (projections, norms, RoPE, index
  branch, selection, attention) at 128K, next to ``msa_attention`` alone on the same
  tensors;
* prefill of the model at each length (time, peak memory), and the longest prefill
  transformers' eager implementation runs before it runs out of memory;
* decoding 1K tokens after a 128K prompt: time per token of the sparse layer's
  attention (transformers' dynamic and static caches, msa's FP8 static cache with and
  without e4m3 index keys), next to ``PagedDecoder.run`` at that context.

Before timing, logits at 4K are compared with eager (bf16) and greedy tokens with it.
"""
from __future__ import annotations

import torch

from ..eval.m3_shapes import model_config
from . import common as C


def build(layer_types, attn: str):
    from transformers.models.minimax_m3_vl import MiniMaxM3VLForCausalLM

    from ..integrations.transformers import enable_msa
    torch.manual_seed(0)
    model = MiniMaxM3VLForCausalLM(model_config(layer_types)).to("cuda", torch.bfloat16)
    model.eval()
    if attn == "msa":
        return enable_msa(model)
    model.set_attn_implementation(attn)
    return model


LAYERS = ("full_attention", "minimax_m3_sparse")


def check() -> dict:
    eager, model = build(LAYERS, "eager"), build(LAYERS, "msa")
    ids = torch.randint(3, 1024, (1, 4096), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits.float(), eager(ids).logits.float()
        g1 = model.generate(ids[:, :3000], max_new_tokens=32, do_sample=False)
        g2 = eager.generate(ids[:, :3000], max_new_tokens=32, do_sample=False)
    res = dict(logits_cosine=C.cosine(a, b), logits_max_abs_diff=(a - b).abs().max().item(),
               greedy_tokens_equal=bool(torch.equal(g1, g2)),
               greedy_tokens_agree=(g1 == g2).float().mean().item())
    res["passed"] = res["logits_cosine"] > 0.999
    del eager, model
    torch.cuda.empty_cache()
    return res


def sparse_step(T: int) -> dict:
    """Attention module of the sparse layer on ``T`` hidden states, and msa_attention
    alone on the q, k, v, qi, ki it computes."""
    import msa
    from ..integrations.transformers import minimax_m3
    model = build(LAYERS, "msa")
    layer = model.model.layers[1]
    hidden = torch.randn(1, T, 1024, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(T, device="cuda").unsqueeze(0)
    emb = model.model.rotary_emb(hidden, position_ids=pos)
    attn = layer.self_attn

    def module():
        return attn(hidden, emb, None, position_ids=pos)[0]
    captured = {}
    inner = minimax_m3.sparse_attention

    def capture(module_, query, key, value, inputs, mask, scaling, position_ids):
        captured.update(q=query.transpose(1, 2), k=key.transpose(1, 2),
                        v=value.transpose(1, 2), qi=inputs.qi, ki=inputs.ki, scaling=scaling)
        return inner(module_, query, key, value, inputs, mask, scaling, position_ids)
    with torch.no_grad():
        r = dict(T=T, layer_attention_ms=C.timed(module, 5))
        from ..integrations.transformers import attention as hf_attention
        hf_attention.sparse_attention = capture
        try:
            module()
        finally:
            hf_attention.sparse_attention = inner
        cfg = minimax_m3.msa_config(model.config, captured["scaling"])
        x = captured
        r["msa_attention_alone_ms"] = C.timed(
            lambda: msa.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], config=cfg), 5)
        r["layer_peak_mb"] = C.peak_bytes(module) / 2 ** 20
    del model
    torch.cuda.empty_cache()
    return r


def prefill(model, T: int) -> dict:
    ids = torch.randint(3, 1024, (1, T), device="cuda")
    with torch.no_grad():
        def fn():
            return model(ids, use_cache=True, logits_to_keep=1)
        ms = C.timed(fn, reps=2, warmup=1)
        peak = C.peak_bytes(fn)
    return dict(T=T, prefill_ms=ms, peak_mb=peak / 2 ** 20)


def eager_limit(lengths) -> dict:
    """Longest prefill eager runs (the sparse layer's dense score and mask tensors)."""
    model = build(LAYERS, "eager")
    best = None
    for T in lengths:
        try:
            best = prefill(model, T)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return dict(largest=best, out_of_memory_at=T)
    return dict(largest=best, out_of_memory_at=None)


CACHES = ("dynamic", "static", "fp8", "fp8_all")


def decode(T: int, steps: int, cache: str) -> dict:
    """Per-token time of the sparse layer's attention module while decoding ``steps``
    tokens after a ``T``-token prompt, with transformers' dynamic or static cache or
    msa's FP8 static cache (``fp8``: K/V in e4m3; ``fp8_all``: the index keys too); the
    sparse layer's cache bytes and the greedy tokens (the prompt is the same for all)."""
    from transformers import DynamicCache, StaticCache

    from ..integrations.transformers import fp8_static_cache
    from ..integrations.transformers.compat import cache_kwarg
    from ..ops.quant import E4M3
    model = build(LAYERS, "msa")
    attn = model.model.layers[1].self_attn
    slots = T + steps + 128
    if cache == "dynamic":
        kv = DynamicCache(config=model.config)
    elif cache == "static":
        kv = StaticCache(config=model.config, max_cache_len=slots)
    else:
        kv = fp8_static_cache(model, slots, E4M3 if cache == "fp8_all" else None)
    ids = torch.randint(3, 1024, (1, T), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    tokens = []
    times = []
    orig = attn.forward

    def timed_forward(*a, **kw):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = orig(*a, **kw)
        end.record()
        times.append((start, end))
        return out
    with torch.no_grad():
        kw = {cache_kwarg(model): kv}
        out = model(ids, use_cache=True, logits_to_keep=1, **kw)
        tok = out.logits[:, -1:].argmax(-1)
        attn.forward = timed_forward
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            pos = torch.tensor([[T + i]], device="cuda")
            out = model(tok, use_cache=True, position_ids=pos, **kw)
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(tok)
        end.record()
        torch.cuda.synchronize()
        attn.forward = orig
    per_layer = sorted(s.elapsed_time(e) for s, e in times)
    layer = kv.layers[1]
    held = [getattr(layer, n, None) for n in ("keys", "values", "idx_keys", "k_scales",
                                              "v_scales", "ki_scales")]
    res = dict(T=T, steps=steps, cache=cache,
               sparse_layer_attention_us=1e3 * per_layer[len(per_layer) // 2],
               model_step_ms=start.elapsed_time(end) / steps,
               sparse_layer_cache_mb=sum(x.numel() * x.element_size() for x in held
                                         if x is not None) / 2 ** 20,
               tokens=torch.cat(tokens, 1)[0].tolist())
    del model, kv
    torch.cuda.empty_cache()
    return res


def graphed_decode(T: int, steps: int, cache: str = "static") -> dict:
    """``GraphedDecoder``: ``steps`` greedy tokens after a ``T``-token prompt, each step
    one CUDA graph (time per token of the whole model), and the sparse layer's attention
    module alone captured in a graph at that context (time per token; its kernels split
    into msa's and the model's own); ``cache`` as in ``decode`` (not dynamic)."""
    from ..integrations.transformers import GraphedDecoder
    from ..ops.quant import E4M3
    model = build(LAYERS, "msa")
    dec = GraphedDecoder(model, max_cache_len=T + steps + 512,
                         kv_dtype=None if cache == "static" else E4M3,
                         index_dtype=E4M3 if cache == "fp8_all" else None)
    ids = torch.randint(3, 1024, (1, T), device="cuda")
    with torch.no_grad():
        logits = dec.prefill(ids, chunk_size=32768)
        tok = logits.argmax(-1)
        dec.step(tok)                                  # capture
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            tok = dec.step(tok).argmax(-1)
        end.record()
        torch.cuda.synchronize()
        layer_us = _layer_graph_us(model, dec, 1)
    res = dict(T=T, steps=steps, cache=cache,
               model_step_ms=start.elapsed_time(end) / steps,
               sparse_layer_attention=layer_us)
    del model, dec
    torch.cuda.empty_cache()
    return res


def _layer_graph_us(model, dec, layer: int, reps: int = 100) -> dict:
    """One layer's attention module (projections, norms, RoPE, cache write, index branch,
    fused decode, output projection) for one token, replayed from a CUDA graph. Each
    replay writes one more cache slot past the real length (the length itself stays)."""
    from ..integrations.transformers.compat import cache_kwarg
    attn = model.model.layers[layer].self_attn
    hidden = torch.randn(1, 1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    pos = dec.position.clone()
    pe = model.model.rotary_emb(hidden, position_ids=pos)
    kw = {cache_kwarg(attn): dec.cache}

    def call():
        return attn(hidden, position_embeddings=pe, attention_mask=None, position_ids=pos,
                    **kw)
    from .decode import graph_ms
    return dict(graph_us=1e3 * graph_ms(call, reps=reps), **_kernel_split_us(call))


MSA_KERNELS = ("paged_", "decode_")


def _kernel_split_us(call, reps: int = 10) -> dict:
    """GPU time per call of ``call``'s kernels (profiler), split into msa's decode kernels
    and the rest (the model's projections, norms, RoPE, cache writes), with kernel counts."""
    from torch.profiler import ProfilerActivity, profile
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    ours = rest = 0.0
    n_ours = n_rest = 0
    for e in prof.key_averages():
        t = e.self_device_time_total
        if t <= 0:
            continue
        if e.key.startswith(MSA_KERNELS):
            ours, n_ours = ours + t, n_ours + e.count
        else:
            rest, n_rest = rest + t, n_rest + e.count
    return dict(msa_kernels_us=ours / reps, msa_kernels=n_ours // reps,
                other_kernels_us=rest / reps, other_kernels=n_rest // reps)


def paged_decoder_us(T: int) -> float:
    from .decode import graph_ms, make_cache
    from ..inference import PagedDecoder
    cfg = C.shape_config("m3")
    k, v, ki, table = make_cache(cfg, 1, T)
    dec = PagedDecoder(cfg, max_batch=1, num_q=1, max_pages=table.shape[1], device="cuda")
    dec.plan(table, torch.tensor([T], dtype=torch.int32, device="cuda"))
    q = torch.randn(1, 64, 128, device="cuda", dtype=torch.bfloat16)
    qi = torch.randn(1, 4, 128, device="cuda", dtype=torch.bfloat16)
    us = 1e3 * graph_ms(lambda: dec.run(q, qi, k, v, ki))
    ms_plain = C.timed(lambda: dec.run(q, qi, k, v, ki), reps=50)
    return dict(graph_us=us, no_graph_us=1e3 * ms_plain)


def run(args) -> int:
    results = dict(meta=C.metadata("m3"))
    ok = check()
    results["check"] = ok
    print("check:", ok, flush=True)
    if not ok["passed"]:
        C.write(results, args)
        return 1
    parts = set(args.parts.split(","))
    unknown = parts - {"step", "prefill", "eager", "decode"}
    if unknown:
        raise SystemExit(f"--parts: unknown part {sorted(unknown)[0]!r}")
    if "step" in parts:
        results["sparse_step"] = sparse_step(32768 if args.quick else 131072)
        print("sparse step:", results["sparse_step"], flush=True)
    if "prefill" in parts:
        model = build(LAYERS, "msa")
        results["prefill"] = []
        for T in C.lengths(args, "128k,512k", "32k"):
            try:
                r = prefill(model, T)
            except torch.OutOfMemoryError:
                r = dict(T=T, prefill_ms="out of memory")
                torch.cuda.empty_cache()
            print("prefill:", r, flush=True)
            results["prefill"].append(r)
        del model
        torch.cuda.empty_cache()
    if "eager" in parts:
        results["eager"] = eager_limit([8192, 16384, 32768, 65536])
        print("eager:", results["eager"], flush=True)
    if "decode" in parts:
        T, steps = (32768, 64) if args.quick else (131072, 1024)
        results["decode"] = [decode(T, steps, c) for c in CACHES]
        ref = results["decode"][1].pop("tokens")              # bf16 static cache
        for r in results["decode"]:
            toks = r.pop("tokens", ref)
            diff = [i for i, (a, b) in enumerate(zip(toks, ref)) if a != b]
            r["first_token_unlike_static"] = diff[0] if diff else None
        results["graphed_decode"] = [graphed_decode(T, steps, c) for c in CACHES[1:]]
        results["paged_decoder"] = paged_decoder_us(T)
        print("decode:", results["decode"], results["graphed_decode"],
              results["paged_decoder"], flush=True)
    C.write(results, args)
    return 0
