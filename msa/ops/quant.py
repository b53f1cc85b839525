"""Quantization of index queries and keys for the low-precision index scans
(docs/semantics.md, "FP8 index scoring" and "INT4 scan copy").

* e4m3, one scale per row (a token's vector of one head): ``scale = max|x| / 448``,
  ``x8 = round_e4m3(x / scale)``, so ``x ~= x8 * scale``. A row of zeros gets scale 1.
  Non-finite inputs give non-finite scales (``check_finite=True`` rejects them first).
* int4 keys (``quantize_int4``), one fp16 scale per group of ``INT4_GROUP`` dims, two
  values a byte, and int8 queries (``quantize_int8``), one scale per row: the decode
  scan's 4-bit copy of the index keys, whose candidates the exact keys re-score.
"""
from __future__ import annotations

from typing import Tuple

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
FP8_CANDIDATES = 16     # extra blocks an FP8 index scan keeps for the exact re-scoring
INT4_CANDIDATES = 64    # the same for a scan of the int4 copy (docs/semantics.md)
QUANT_CHUNK = 1 << 26   # elements quantize_e4m3 takes through fp32 at a time
INT4_GROUP = 32         # key dims per int4 scale
INT4_MAX = 7            # int4 values are -7..7 (two's-complement nibbles)
FP16_MAX = 65504.0


def quantize_e4m3(x: torch.Tensor, bound: float = E4M3_MAX) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> ``x8 [..., D]`` e4m3 and ``scale [...]`` fp32; ``bound`` (at most
    448) is what a row's largest magnitude maps to (``scale = max|x| / bound``). Rows
    go through fp32 ``QUANT_CHUNK`` elements at a time (a cache of many GB needs no fp32
    copy of itself)."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    step = max(1, QUANT_CHUNK // max(d, 1))
    x8 = torch.empty(rows.shape, dtype=E4M3, device=x.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    for i in range(0, rows.shape[0], step):     # written in place: no second copy to join
        x8[i:i + step], scale[i:i + step] = _quantize_rows(rows[i:i + step], bound)
    return x8.view(x.shape), scale.view(x.shape[:-1])


def _quantize_rows(x: torch.Tensor, bound: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``quantize_e4m3`` of rows ``x [N, D]``."""
    xf = x.float()
    scale = _row_scales(xf, bound)
    return (xf / scale.unsqueeze(-1)).clamp(-bound, bound).to(E4M3), scale


def _row_scales(xf: torch.Tensor, bound: float) -> torch.Tensor:
    """``max|x| / bound`` over the last dim of fp32 ``xf`` (1 for a row of zeros). The
    divisor is a tensor: IEEE division on every device, as the kernels' div_rn (CUDA torch
    multiplies by the reciprocal of a Python number instead)."""
    amax = xf.abs().amax(-1)
    return torch.where(amax > 0, amax / torch.full_like(amax, bound), torch.ones_like(amax))


def dequantize(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x8 [..., D]``, ``scale [...]`` -> fp32 ``[..., D]``."""
    return x8.float() * scale.unsqueeze(-1)


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """What FP8 scoring sees of ``x``: quantized then dequantized, fp32 (fp64 stays
    fp64)."""
    out = dequantize(*quantize_e4m3(x))
    return out.double() if x.dtype == torch.float64 else out


def quantize_int4(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` (``D`` a multiple of ``2 * INT4_GROUP``) -> ``packed [..., D / 2]``
    uint8 and ``scales [..., D / INT4_GROUP]`` fp16.

    Group ``g`` (dims ``32 g .. 32 g + 31``) has the scale ``min(max|x_g| / 7, 65504)``
    rounded to fp16 (1 for a group of zeros) and the values ``clamp(round(x / scale), -7,
    7)`` (values past 7 scales saturate), as two's-complement nibbles; byte ``j`` holds
    dim ``j`` in its low nibble and dim ``j + D / 2`` in its high one. Non-finite inputs
    are the caller's to reject (the caches do, by name)."""
    d = x.shape[-1]
    if d % (2 * INT4_GROUP):
        raise ValueError(f"int4 keys need a last dim that is a multiple of {2 * INT4_GROUP}, "
                         f"got {d}")
    xg = x.float().reshape(*x.shape[:-1], d // INT4_GROUP, INT4_GROUP)
    scale = _row_scales(xg, INT4_MAX).clamp(max=FP16_MAX).half()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))     # underflow in fp16
    v = torch.round(xg / scale.float().unsqueeze(-1)).clamp(-INT4_MAX, INT4_MAX)
    u = (v.reshape(x.shape).to(torch.int8) & 15).to(torch.uint8)
    return u[..., :d // 2] | (u[..., d // 2:] << 4), scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``packed [..., D / 2]`` uint8 -> the int4 values ``[..., D]`` int8 (-7..7)."""
    u = torch.cat([packed & 15, packed >> 4], -1).to(torch.int8)
    return torch.where(u >= 8, u - 16, u)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``quantize_int4``'s output -> fp32 ``[..., D]``."""
    v = unpack_int4(packed).float()
    v = v.reshape(*v.shape[:-1], scales.shape[-1], INT4_GROUP) * scales.float().unsqueeze(-1)
    return v.reshape(*v.shape[:-2], -1)


def quantize_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> ``x8 [..., D]`` int8 (``round(x / scale)``, -127..127) and
    ``scale [...]`` fp32 ``= max|x| / 127`` (1 for a row of zeros; NaN for a row with a
    NaN or inf, whose values are then 0, so that it dequantizes to NaN as e4m3 rows do):
    the index queries of an int4 scan."""
    xf = x.float()
    finite = xf.isfinite().all(-1)
    scale = torch.where(finite, _row_scales(xf, 127.0), float("nan"))
    x8 = torch.round(xf / scale.unsqueeze(-1)).clamp(-127, 127).nan_to_num(0.0)
    return x8.to(torch.int8), scale


def fake_quantize_int4(x: torch.Tensor) -> torch.Tensor:
    """What an int4 scan sees of index keys ``x``: ``quantize_int4`` then dequantized,
    fp32 (exact; fp64 stays fp64)."""
    out = dequantize_int4(*quantize_int4(x))
    return out.double() if x.dtype == torch.float64 else out


def fake_quantize_int8(x: torch.Tensor) -> torch.Tensor:
    """What an int4 scan sees of index queries ``x``: ``quantize_int8`` then dequantized,
    fp32 (fp64 stays fp64)."""
    x8, scale = quantize_int8(x)
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x8.to(wide) * scale.to(wide).unsqueeze(-1)
