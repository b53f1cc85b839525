"""Input validation shared by the public functions: clear errors naming the argument."""
from __future__ import annotations

import importlib.util
import math
from typing import Optional, Sequence

import torch

from .config import SUPPORTED_HEAD_DIMS, check_block_size, check_topk
from .varlen import Segments, host_to_device

HAS_TRITON = importlib.util.find_spec("triton") is not None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, t, ndim: int, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the first input is on {device}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        desc = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"dtypes must match: {desc}")


def check_head_dim(name: str, d: int) -> None:
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: head dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")


def check_heads(q_name: str, hq: int, k_name: str, hk: int) -> None:
    if hk < 1 or hq % hk:
        raise ValueError(f"{q_name} heads ({hq}) must be a multiple of {k_name} heads ({hk})")


def check_scale(name: str, value: Optional[float]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive float, got {value!r}")


def check_block_and_topk(block_size: int, topk: Optional[int] = None) -> None:
    check_block_size(block_size)
    if topk is not None:
        check_topk(topk)


def check_topk_tensor(topk, total_q: int, heads: Sequence[int], device) -> None:
    """Static checks of ``topk [Hs, total_q, K]``: type, dtype, shape, device."""
    if not isinstance(topk, torch.Tensor):
        raise TypeError(f"topk_indices must be a torch.Tensor, got {type(topk).__name__}")
    if topk.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_indices must be int32 or int64, got {topk.dtype}")
    if topk.dim() != 3 or topk.shape[0] not in heads or topk.shape[1] != total_q:
        raise ValueError(f"topk_indices must have shape [H, total_q={total_q}, K] with H "
                         f"in {sorted(set(heads))}, got {tuple(topk.shape)}")
    check_topk(topk.shape[2])
    if topk.device != device:
        raise ValueError(f"topk_indices is on {topk.device} but q is on {device}")


def check_topk_indices(topk: torch.Tensor, seg: Segments, heads: Sequence[int],
                       block_size: int, device) -> None:
    """``topk [Hs, total_q, K]``: int32/int64, ``Hs`` in ``heads``, entries ``-1`` or a
    block id in ``[0, ceil(k_len_b / block_size))``, valid ids unique within a row."""
    check_topk_tensor(topk, seg.total_q, heads, device)
    if topk.numel() == 0:
        return
    if seg.num_segments:
        per = host_to_device([[seg.num_blocks(b, block_size) for b in
                               range(seg.num_segments)], seg.q_len], device)
        limit = torch.repeat_interleave(per[0], per[1], output_size=seg.total_q)
    else:
        limit = torch.zeros(0, dtype=torch.int64, device=device)
    if topk.is_cuda and HAS_TRITON:
        from .ops.validate import topk_flags
        any_bad, any_dup = topk_flags(topk, limit)                  # one pass, one sync
        if not (any_bad or any_dup):
            return
    t = topk
    bad = (t < -1) | (t >= limit.view(1, -1, 1))
    srt = torch.sort(t, dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    any_bad, any_dup = torch.stack((bad.any(), dup.any())).tolist()     # one host sync
    if any_bad:
        h, qi, j = (int(x) for x in bad.nonzero()[0])
        raise IndexError(f"topk_indices[{h}, {qi}, {j}] = {int(t[h, qi, j])} is out of range "
                         f"[-1, {int(limit[qi])}) for that query's segment")
    if any_dup:
        h, qi, _ = (int(x) for x in dup.nonzero()[0])
        raise ValueError(f"topk_indices[{h}, {qi}] repeats a block id: {t[h, qi].tolist()}")
