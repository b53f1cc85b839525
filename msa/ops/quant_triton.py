"""Rows quantized into an e4m3 cache in one launch (``quantize_into``).

``msa.ops.quant.quantize_e4m3`` followed by two index copies launches about a dozen small
kernels per tensor; a decode step that appends one token to an FP8 cache then spends
more time writing than the fused decoder spends reading. ``quantize_rows_kernel`` does
the same arithmetic (``scale = max|x| / 448``, 1 for a zero row; ``x / scale`` clamped
and rounded to nearest even) for each row and writes the e4m3 row and its scale at its
slot, the slot offset read on the device (no host synchronisation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import next_pow2, to_e4m3


@triton.jit
def quantize_rows_kernel(X, STORE, SCALES, START, stride_xb, stride_xt,
                         stride_sb, stride_st, stride_cb, D: tl.constexpr,
                         D_PAD: tl.constexpr):
    """Row ``t`` of group ``b`` (``X + b * stride_xb + t * stride_xt``, ``D`` contiguous
    values) -> e4m3 at ``STORE + b * stride_sb + (start + t) * stride_st`` and its scale at
    ``SCALES + b * stride_cb + start + t`` (``start = START[0]``)."""
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    slot = tl.load(START).to(tl.int64) + t
    offs = tl.arange(0, D_PAD)
    x = tl.load(X + b * stride_xb + t * stride_xt + offs, mask=offs < D, other=0.0)
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), 0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    q = to_e4m3(tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0))
    tl.store(STORE + b * stride_sb + slot * stride_st + offs, q, mask=offs < D)
    tl.store(SCALES + b * stride_cb + slot, scale)


def quantize_into(x: torch.Tensor, store: torch.Tensor, scales: torch.Tensor,
                  start: torch.Tensor) -> None:
    """``x [B, H, n, D]`` quantized (``msa.ops.quant.quantize_e4m3``'s rule) into ``store
    [B, H, L, D]`` e4m3 and ``scales [B, H, L]`` fp32 at slots ``start .. start + n``
    (``start``: a one-element integer tensor on the device; ``start + n <= L`` is the
    caller's to keep). ``store``, ``scales`` contiguous; ``x`` with a contiguous last
    dim."""
    b, h, n, d = x.shape
    if n == 0:
        return
    xs = (x if x.stride(-1) == 1 else x.contiguous()).reshape(b * h, n, d)   # a view or a copy
    st = store.view(b * h, store.shape[2], d)
    sc = scales.view(b * h, scales.shape[2])
    if b * h > 65535:
        raise ValueError(f"quantize_into: x has {b * h} rows of groups (B x H); at most 65535")
    quantize_rows_kernel[(n, b * h)](           # rows on the axis without the 65535 bound
        xs, st, sc, start, xs.stride(0), xs.stride(1), st.stride(0), st.stride(1),
        sc.stride(0), D=d, D_PAD=next_pow2(d), num_warps=1)
