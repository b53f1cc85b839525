"""FP8 (e4m3) quantization of index queries and keys for FP8 index scoring
(docs/semantics.md, "FP8 index scoring").

One scale per row (a token's vector of one head): ``scale = max|x| / 448``,
``x8 = round_e4m3(x / scale)``, so ``x ~= x8 * scale``. A row of zeros gets scale 1.
Non-finite inputs give non-finite scales (``check_finite=True`` rejects them first).
"""
from __future__ import annotations

from typing import Tuple

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
FP8_CANDIDATES = 16     # extra blocks an FP8 index scan keeps for the exact re-scoring


def quantize_e4m3(x: torch.Tensor, bound: float = E4M3_MAX) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> ``x8 [..., D]`` e4m3 and ``scale [...]`` fp32; ``bound`` (at most
    448) is what a row's largest magnitude maps to (``scale = max|x| / bound``)."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    # a tensor divisor: IEEE division on every device, as the kernels' div_rn (CUDA torch
    # multiplies by the reciprocal of a Python number instead)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, bound), torch.ones_like(amax))
    return (xf / scale.unsqueeze(-1)).clamp(-bound, bound).to(E4M3), scale


def dequantize(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x8 [..., D]``, ``scale [...]`` -> fp32 ``[..., D]``."""
    return x8.float() * scale.unsqueeze(-1)


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """What FP8 scoring sees of ``x``: quantized then dequantized, fp32 (fp64 stays
    fp64)."""
    out = dequantize(*quantize_e4m3(x))
    return out.double() if x.dtype == torch.float64 else out
