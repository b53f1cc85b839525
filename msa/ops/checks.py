"""Input validation of the public functions: one clear error naming the argument.

Pure PyTorch (the GPU top-k check, ``topk_check.py``, loads only for CUDA tensors).
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Sequence

import torch

from ..config import MAX_TOPK, MSAConfig, check_block_size, check_head_dim, check_topk
from ..varlen import Segments, host_to_device
from .quant import INT4_GROUP

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton kernels run on CPU tensors only in Triton's interpreter (tests)
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "reference", "triton")


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


def check_heads(q_name: str, hq: int, k_name: str, hk: int) -> None:
    if hk < 1 or hq % hk:
        raise ValueError(f"{q_name} heads ({hq}) must be a multiple of {k_name} heads ({hk})")


def check_scale(name: str, value: Optional[float]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive float, got {value!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_finite(names: Sequence[str], tensors: Sequence[Optional[torch.Tensor]]) -> None:
    """``check_finite=True``: reject NaN / inf in the inputs (one host synchronisation)."""
    present = [(n, t) for n, t in zip(names, tensors) if t is not None]
    flags = torch.stack([torch.isfinite(t).all() for _, t in present]).tolist()
    bad = [n for (n, _), ok in zip(present, flags) if not ok]
    if bad:
        raise ValueError(f"{', '.join(bad)} hold{'s' if len(bad) == 1 else ''} NaN or inf "
                         f"(check_finite=True)")


def check_config(config) -> MSAConfig:
    if not isinstance(config, MSAConfig):
        raise TypeError(f"config must be an msa.MSAConfig, got {type(config).__name__} "
                        f"(write MSAConfig(**{type(config).__name__.lower()}) for a dict)"
                        if isinstance(config, dict) else
                        f"config must be an msa.MSAConfig, got {type(config).__name__}")
    return config


def check_config_matches(cfg: MSAConfig, q, k, qi) -> None:
    """The config's shapes agree with the tensors' (a mismatch would run with the wrong
    scale or selection)."""
    pairs = (("num_heads", cfg.num_heads, "q heads", q.shape[-2]),
             ("num_kv_heads", cfg.num_kv_heads, "k heads", k.shape[-2]),
             ("head_dim", cfg.head_dim, "q head dim", q.shape[-1]),
             ("num_index_heads", cfg.index_heads, "qi heads", qi.shape[-2]),
             ("index_head_dim", cfg.index_dim, "qi head dim", qi.shape[-1]))
    for field, want, what, got in pairs:
        if want != got:
            raise ValueError(f"config.{field}={want} does not match the tensors: {what} = "
                             f"{got}")


def check_fp8_device(name: str, x: torch.Tensor) -> None:
    """FP8 (e4m3) kernels need compute capability 8.9+ (Ada, Hopper, Blackwell); on an
    older GPU say so, naming the argument, instead of failing inside the compiler."""
    if x.is_cuda:
        cap = torch.cuda.get_device_capability(x.device)
        if tuple(cap) < (8, 9):
            raise RuntimeError(f"{name}: FP8 (e4m3) needs a GPU of compute capability 8.9 or "
                               f"newer; {torch.cuda.get_device_name(x.device)} is "
                               f"{cap[0]}.{cap[1]}")


def check_page_scales(names, pages, scales) -> None:
    """e4m3 pages come with their fp32 row scales (contiguous, the pages' shape without
    the last dim, same device), other pages without; ``names`` of the scales (the pages'
    names replace ``scales`` by ``pages``)."""
    fp8 = torch.float8_e4m3fn
    for name, p, s in zip(names, pages, scales):
        if p.dtype == fp8:
            check_fp8_device(name.replace("scales", "pages"), p)
        if (p.dtype == fp8) != (s is not None):
            got = f"{tuple(s.shape)} {s.dtype}" if isinstance(s, torch.Tensor) else \
                type(s).__name__
            raise TypeError(f"{name} goes with float8_e4m3fn pages (and only with them): "
                            f"the pages are {p.dtype}, {name} is {got}")
        if s is not None and (not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or
                              not s.is_contiguous() or tuple(s.shape) != tuple(p.shape[:-1])
                              or s.device != p.device):
            got = f"{tuple(s.shape)} {s.dtype} on {s.device}" \
                if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{name} must be contiguous fp32 {list(p.shape[:-1])} on "
                             f"{p.device}, got {got}")


def check_int4_scales(name: str, pages: torch.Tensor, scales) -> None:
    """Packed int4 pages ``[..., Di / 2]`` uint8 come with their fp16 group scales
    ``[..., Di / 32]``, contiguous, on the pages' device (``msa.ops.quant.quantize_int4``)."""
    want = (*pages.shape[:-1], pages.shape[-1] * 2 // INT4_GROUP)
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float16 or \
            not scales.is_contiguous() or tuple(scales.shape) != want or \
            scales.device != pages.device:
        got = f"{tuple(scales.shape)} {scales.dtype} on {scales.device}" \
            if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"{name} must be contiguous fp16 {list(want)} on {pages.device}, "
                         f"got {got}")


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for ``backend`` and inputs like ``x``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    if backend == "reference":
        return False
    if backend == "auto":                 # fp32 with D > 128 exceeds the kernels' on-chip budget
        return x.is_cuda and x.dtype != torch.float64 and \
            not (x.dtype == torch.float32 and x.shape[-1] > 128) and HAS_TRITON
    if x.dtype == torch.float64:
        raise TypeError("backend='triton' supports fp16/bf16/fp32 inputs, got float64")
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install msa[gpu])")
    if not x.is_cuda and not TRITON_INTERPRET:
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got {x.device} tensors: use "
                           f"backend='reference' (or 'auto') on the CPU")
    return True


def check_topk_tensor(topk, total_q: int, heads: Sequence[int], device) -> None:
    """Static checks of ``topk_indices [Hs, total_q, K]``: type, dtype, shape, device."""
    if not isinstance(topk, torch.Tensor):
        raise TypeError(f"topk_indices must be a torch.Tensor, got {type(topk).__name__}")
    if topk.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_indices must be int32 or int64, got {topk.dtype}")
    if topk.dim() != 3 or topk.shape[0] not in heads or topk.shape[1] != total_q:
        raise ValueError(f"topk_indices must have shape [H, total_q={total_q}, K] with H "
                         f"in {sorted(set(heads))}, got {tuple(topk.shape)}")
    if not 1 <= topk.shape[2] <= MAX_TOPK:
        raise ValueError(f"topk_indices must hold 1..{MAX_TOPK} slots per row (K), got K="
                         f"{topk.shape[2]}")
    if topk.device != device:
        raise ValueError(f"topk_indices is on {topk.device} but q is on {device}")


def check_topk_indices(topk: torch.Tensor, seg: Segments, heads: Sequence[int],
                       block_size: int, device) -> None:
    """``topk_indices [Hs, total_q, K]``: int32/int64, ``Hs`` in ``heads``, entries ``-1``
    or a block id in ``[0, ceil(k_len_b / block_size))``, valid ids unique within a row."""
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
        from .topk_check import topk_flags
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


def check_qkv(q, k, v) -> None:
    check_float_tensor("v", v, k.dim(), q.device)
    check_same_dtype(("q", "k", "v"), (q, k, v))
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    check_heads("q", q.shape[-2], "k", k.shape[-2])
    check_head_dim("q head dim", q.shape[-1])
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head dim {k.shape[-1]} != q head dim {q.shape[-1]}")


def check_index(qi, ki, q=None, k=None) -> None:
    check_same_dtype(("qi", "ki"), (qi, ki))
    check_head_dim("qi head dim", qi.shape[-1])
    if ki.shape[-1] != qi.shape[-1]:
        raise ValueError(f"ki head dim {ki.shape[-1]} != qi head dim {qi.shape[-1]}")
    if ki.shape[-2] not in (1, qi.shape[-2]):
        raise ValueError(f"ki must have 1 or Hi={qi.shape[-2]} heads, got {ki.shape[-2]}")
    if q is not None:
        if qi.shape[:-2] != q.shape[:-2] or ki.shape[:-2] != k.shape[:-2]:
            raise ValueError(f"qi/ki tokens {tuple(qi.shape[:-2])}/{tuple(ki.shape[:-2])} must "
                             f"match q/k tokens {tuple(q.shape[:-2])}/{tuple(k.shape[:-2])}")
        if qi.device != q.device or ki.device != q.device:
            raise ValueError(f"qi/ki must be on {q.device}, got {qi.device}/{ki.device}")
        if qi.shape[-2] not in (1, k.shape[-2]):
            raise ValueError(f"qi must have 1 or Hkv={k.shape[-2]} index heads, got "
                             f"{qi.shape[-2]}")


def check_block_and_topk(block_size: int, topk: Optional[int] = None) -> None:
    check_block_size(block_size)
    if topk is not None:
        check_topk(topk)
