"""Deterministic reductions of per-work-item slots (attention backward ``dK``/``dV``,
indexer-KL ``dKi``): each item of a plan writes its block's gradient to its own slot and
the slots of one physical key row are summed in a fixed order, so gradients are bitwise
repeatable (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..varlen import Segments


@triton.jit
def item_sum_kernel(SRC, ORDER, RUN0, RUN1, KROW, H, NK, DST_K, DST_V, SRC_V,
                    stride_kt, stride_kh, BS: tl.constexpr, D: tl.constexpr,
                    PAIR: tl.constexpr = True):
    """Deterministic mode: program ``r`` adds, in order, the per-item slots of run ``r``
    (items of one (physical key row, head)) into ``dk``/``dv`` (``dk`` alone without
    ``PAIR``)."""
    r = tl.program_id(0)
    i0 = tl.load(RUN0 + r)
    i1 = tl.load(RUN1 + r)
    first = tl.load(ORDER + i0).to(tl.int64)
    krow = tl.load(KROW + first).to(tl.int64)
    h = tl.load(H + first)
    offs = tl.arange(0, BS)[:, None] * D + tl.arange(0, D)[None, :]
    acc_k = tl.zeros((BS, D), dtype=tl.float32)
    acc_v = tl.zeros((BS, D), dtype=tl.float32)
    nk = 0                  # fragments may see different lengths of the shared rows
    for i in range(i0, i1):
        it = tl.load(ORDER + i).to(tl.int64)
        nk = tl.maximum(nk, tl.load(NK + it))
        acc_k += tl.load(SRC + it * BS * D + offs)
        if PAIR:
            acc_v += tl.load(SRC_V + it * BS * D + offs)
    dst = (krow + tl.arange(0, BS))[:, None] * stride_kt + h * stride_kh + \
        tl.arange(0, D)[None, :]
    # runs of one physical row are summed by one program, and launches are ordered
    rmask = (tl.arange(0, BS) < nk)[:, None]
    tl.store(DST_K + dst, tl.load(DST_K + dst, mask=rmask) + acc_k, mask=rmask)
    if PAIR:
        tl.store(DST_V + dst, tl.load(DST_V + dst, mask=rmask) + acc_v, mask=rmask)


def base_layers(seg: Segments, device):
    """KV bases of the segments, sorted, and a layer per base such that the KV ranges of
    one layer are disjoint (fragments may overlap at unaligned offsets). Without
    fragments every base is in layer 0."""
    ends = {}
    for base, n in zip(seg.k_base, seg.k_len):
        ends[base] = max(ends.get(base, base), base + n)
    bases, layers, last_end = sorted(ends), [], []
    for base in bases:                       # greedy interval colouring, in start order
        layer = next((i for i, e in enumerate(last_end) if e <= base), len(last_end))
        if layer == len(last_end):
            last_end.append(0)
        last_end[layer] = ends[base]
        layers.append(layer)
    return (torch.tensor(bases, dtype=torch.int64, device=device),
            torch.tensor(layers, dtype=torch.int64, device=device), len(last_end))


def sum_items(plan, pk, pv, dk, dv, block_size, layers):
    """Deterministic sum of per-item dK/dV slots into ``dk``/``dv`` (fp32): one launch
    per layer of disjoint KV ranges, runs of items by (physical key row, head), items of
    a run in (query, head) order. ``pv``/``dv`` None: one tensor summed over the items'
    heads (the indexer KL's ``dki``, ``dk [total_k, 1, D]``)."""
    bases, base_layer, n_layers = layers
    n = plan.num_items
    pair = pv is not None
    heads = int(plan.num_heads)
    dst_h = plan.item_h if pair else torch.zeros_like(plan.item_h)
    layer = base_layer[torch.searchsorted(bases, plan.item_krow - plan.item_t0)]
    target = (layer * (int(plan.item_krow.max()) + 1) + plan.item_krow) * \
        (heads if pair else 1) + dst_h
    within = plan.item_e0.long() * heads + plan.item_h          # unique within a run
    order = torch.argsort(target * (int(within.max()) + 1) + within)
    st = target[order]
    new = torch.ones(n, dtype=torch.bool, device=st.device)
    new[1:] = st[1:] != st[:-1]
    run0 = torch.nonzero(new).flatten()
    run1 = torch.cat([run0[1:], torch.tensor([n], device=st.device)])
    run_layer = layer[order[run0]]
    counts = torch.bincount(run_layer, minlength=n_layers).tolist()
    r0 = 0
    for c in counts:                         # ordered launches: layers never race
        if c:
            item_sum_kernel[(c,)](
                pk, order, run0[r0:r0 + c], run1[r0:r0 + c], plan.item_krow, dst_h,
                plan.item_nk, dk, dv if pair else dk, pv if pair else pk, dk.stride(0),
                dk.stride(1), BS=block_size, D=dk.shape[-1], PAIR=pair, num_warps=4)
        r0 += c
