"""An FP8 (e4m3) static cache for MiniMax-M3 on msa: ``fp8_static_cache(model, L)``.

A transformers ``StaticCache`` whose ``minimax_m3_sparse`` layers are ``FP8SparseLayer``:
keys and values ``[B, Hkv, L, D]`` in e4m3 with one fp32 scale per token and head
(``k_scales, v_scales [B, Hkv, L]``, ``msa.ops.quant``), quantized when tokens are
written; index keys ``[B, 1, L, Di]`` in the model's dtype, or e4m3 with ``ki_scales
[B, 1, L]`` when asked (faster decode, a different selection: docs/inference.md).
Full-attention layers keep transformers' bf16 ``StaticLayer``.

The sparse layers' attention (``minimax_m3.sparse_attention``) decodes by reading the
e4m3 rows in place with the fused decoder, and dequantizes the written rows for prefill.
A row holding NaN or inf reads back as NaN (no host check on the decode path), which
poisons the attention output as it would with a bf16 cache.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from transformers import StaticCache
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import \
    MiniMaxM3VLSparseStaticCacheLayer

from ...ops.checks import HAS_TRITON
from ...ops.quant import E4M3, quantize_e4m3

SPARSE = "minimax_m3_sparse"


def _rows(b: int, h: int, slots: int, d: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Empty e4m3 rows ``[b, h, slots, d]`` and their scales ``[b, h, slots]`` (1)."""
    return (torch.zeros(b, h, slots, d, dtype=E4M3, device=device),
            torch.ones(b, h, slots, dtype=torch.float32, device=device))


def _write(store: torch.Tensor, scales: torch.Tensor, start: torch.Tensor,
           x: torch.Tensor) -> None:
    """Rows ``x [B, H, n, D]`` quantized into ``store [B, H, L, D]`` (e4m3) and ``scales
    [B, H, L]`` at slots ``start .. start + n`` (``start`` on the device): one kernel on
    CUDA (``msa.ops.quant_triton``), torch ops elsewhere (the same values)."""
    if x.is_cuda and HAS_TRITON:
        from ...ops.quant_triton import quantize_into
        quantize_into(x, store, scales, start.view(1))
        return
    pos = torch.arange(x.shape[2], device=x.device) + start
    x8, s = quantize_e4m3(x)
    store.view(torch.uint8).index_copy_(2, pos, x8.view(torch.uint8))
    scales.index_copy_(2, pos, s)


class FP8SparseLayer(MiniMaxM3VLSparseStaticCacheLayer):
    """A sparse layer's static cache in e4m3 (see the module docstring): ``update``
    returns the e4m3 ``keys, values``, ``update_index`` the index keys; ``scales()``
    gives ``(k_scales, v_scales, ki_scales or None)``."""

    _layer_type = None      # not registered: transformers' own caches keep their layers

    def __init__(self, max_cache_len: int, fp8_index_keys: bool = False, **kwargs):
        super().__init__(max_cache_len)
        self.fp8_index_keys = fp8_index_keys
        self.k_scales = self.v_scales = self.ki_scales = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.keys, self.k_scales = _rows(*shape, self.k_head_dim, self.device)
        self.values, self.v_scales = _rows(*shape, self.v_head_dim, self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        _write(self.keys, self.k_scales, self.cumulative_length, key_states)
        _write(self.values, self.v_scales, self.cumulative_length, value_states)
        self.cumulative_length.add_(key_states.shape[-2])
        return self.keys, self.values

    def update_index(self, idx_k: torch.Tensor) -> torch.Tensor:
        if not self.fp8_index_keys:
            return super().update_index(idx_k)
        if self.idx_keys is None:
            b, h, _, d = idx_k.shape
            self.idx_keys, self.ki_scales = _rows(b, h, self.max_cache_len, d, idx_k.device)
            self.idx_cumulative_length = self.idx_cumulative_length.to(idx_k.device)
        _write(self.idx_keys, self.ki_scales, self.idx_cumulative_length, idx_k)
        self.idx_cumulative_length.add_(idx_k.shape[-2])
        return self.idx_keys

    def scales(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        return self.k_scales, self.v_scales, self.ki_scales

    def reset(self) -> None:
        for x in (self.keys, self.values, self.idx_keys):
            if x is not None:
                x.view(torch.uint8).zero_()
        for s in (self.k_scales, self.v_scales, self.ki_scales):
            if s is not None:
                s.fill_(1.0)
        self.cumulative_length.zero_()
        self.idx_cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        def pick(x):
            if x is None:
                return None
            i = beam_idx.to(x.device)
            if x.dtype == E4M3:
                return x.view(torch.uint8).index_select(0, i).view(E4M3)
            return x.index_select(0, i)
        self.keys, self.values, self.idx_keys = map(pick, (self.keys, self.values,
                                                            self.idx_keys))
        self.k_scales, self.v_scales, self.ki_scales = map(pick, self.scales())


def fp8_static_cache(model, max_cache_len: int,
                     index_dtype: Optional[torch.dtype] = None) -> StaticCache:
    """A ``StaticCache`` of ``max_cache_len`` slots for a MiniMax-M3 model switched to msa
    (``enable_msa``) whose sparse layers hold K/V in e4m3 (``index_dtype=torch.
    float8_e4m3fn``: the index keys too): ``model.generate(..., cache=cache)`` or
    ``model(..., cache=cache)`` (``past_key_values=cache`` before transformers 5.24,
    ``compat.cache_kwarg``). For batches above 1 ``max_cache_len`` must be a multiple of
    the block size (as for any static cache the fused decoder reads)."""
    from .minimax_m3 import is_minimax_m3, text_config
    if not is_minimax_m3(model):
        raise TypeError("fp8_static_cache is for MiniMax-M3 models (transformers' "
                        "minimax_m3_vl)")
    if getattr(model.config.get_text_config(decoder=True), "_attn_implementation",
               None) != "msa":
        raise ValueError("fp8_static_cache needs the model switched to msa first "
                         "(enable_msa(model)): transformers' own attention cannot read "
                         "e4m3 keys")
    if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or \
            max_cache_len < 1:
        raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
    if index_dtype not in (None, E4M3):
        raise ValueError(f"index_dtype must be None (the model's dtype) or "
                         f"torch.float8_e4m3fn, got {index_dtype}")
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for i, kind in enumerate(text_config(model).layer_types):
        if kind == SPARSE:
            cache.layers[i] = FP8SparseLayer(max_cache_len, fp8_index_keys=index_dtype == E4M3)
    return cache
