"""One-pass check of top-k block ids on the GPU (range and uniqueness per row).

``check_topk_indices`` needs to know whether any entry is out of range or any row repeats
a block id. In torch that is a sort of the whole ``[Hs, total_q, K]`` tensor and a few
elementwise passes; ``topk_flags`` reads the ids once: one program per tile of rows
compares each row's ``K`` entries pairwise in registers.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_rows", "total_q"])
def topk_check_kernel(TOPK, LIMIT, FLAGS, n_rows, total_q, stride_h, stride_q, stride_k,
                      K: tl.constexpr, K_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Row ``r = h * total_q + q``: ``FLAGS[0, r]`` = some entry outside ``[-1, LIMIT[q])``,
    ``FLAGS[1, r]`` = a block id >= 0 appears twice."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < n_rows
    h, q = r // total_q, r % total_q
    cols = tl.arange(0, K_PAD)
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    t = tl.load(TOPK + (h * stride_h + q * stride_q)[:, None] + cols[None, :] * stride_k,
                mask=mask, other=-1).to(tl.int64)
    lim = tl.load(LIMIT + q, mask=rmask, other=0)
    bad = tl.max(((t < -1) | (t >= lim[:, None])).to(tl.int32), 1)
    same = (t[:, :, None] == t[:, None, :]) & (t[:, :, None] >= 0) & \
        (cols[None, :, None] < cols[None, None, :])
    dup = tl.max(tl.max(same.to(tl.int32), 2), 1)
    tl.store(FLAGS + r, bad.to(tl.int8), mask=rmask)
    tl.store(FLAGS + n_rows + r, dup.to(tl.int8), mask=rmask)


def topk_flags(topk: torch.Tensor, limit: torch.Tensor) -> Tuple[bool, bool]:
    """``(any entry out of range, any row repeating an id)`` for ``topk_indices [Hs, total_q, K]``
    (int32/int64) and ``limit [total_q]`` (blocks of each query's segment); one host
    sync."""
    hs, total_q, k = topk.shape
    n_rows = hs * total_q
    flags = torch.empty((2, n_rows), dtype=torch.int8, device=topk.device)
    k_pad = triton.next_power_of_2(k)
    rows = max(1, min(64, 4096 // (k_pad * k_pad)))
    topk_check_kernel[(triton.cdiv(n_rows, rows),)](
        topk, limit, flags, n_rows, total_q, topk.stride(0), topk.stride(1), topk.stride(2),
        K=k, K_PAD=k_pad, ROWS=rows, num_warps=4)
    any_bad, any_dup = flags.amax(1).tolist()
    return bool(any_bad), bool(any_dup)
