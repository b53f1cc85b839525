"""An FP8 (e4m3) dynamic cache for Llama-family models: ``fp8_dynamic_cache(model)``.

Each layer (``FP8DynamicLayer``) stores its keys and values ``[B, Hkv, L, D]`` in e4m3
with one fp32 scale per token and head (``scale = max|x| / 448``, ``msa.ops.quant``: the
format of ``msa.inference.PagedKVCache`` and of MiniMax-M3's ``fp8_static_cache``),
quantized when the tokens are written, and hands the attention the whole cache
dequantized to the model's dtype: prefill and every decode step attend over what an FP8
cache holds. With MSA self-indexing the keys are the index keys too, so the selection is
made over the e4m3 keys as well. A row holding NaN or inf is rejected by name.
"""
from __future__ import annotations

from typing import Tuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ...ops.quant import E4M3, dequantize, quantize_e4m3


def _quantize(x: torch.Tensor, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} to cache hold NaN or inf; an e4m3 cache cannot store them")
    return quantize_e4m3(x)


class FP8DynamicLayer(DynamicLayer):
    """A growing cache layer of e4m3 rows and fp32 per-row scales: ``keys8, values8
    [B, Hkv, L, D]``, ``key_scales, value_scales [B, Hkv, L]``."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        b, h, _, d = key_states.shape
        self.keys8 = key_states.new_zeros(b, h, 0, d, dtype=E4M3)
        self.values8 = value_states.new_zeros(b, h, 0, value_states.shape[-1], dtype=E4M3)
        self.key_scales = key_states.new_zeros(b, h, 0, dtype=torch.float32)
        self.value_scales = key_states.new_zeros(b, h, 0, dtype=torch.float32)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Quantize the new rows ``[B, Hkv, n, D]``, append them; return every cached row
        dequantized ``[B, Hkv, L, D]``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k8, ks = _quantize(key_states, "keys")
        v8, vs = _quantize(value_states, "values")
        self.keys8 = torch.cat([self.keys8, k8], -2)
        self.values8 = torch.cat([self.values8, v8], -2)
        self.key_scales = torch.cat([self.key_scales, ks], -1)
        self.value_scales = torch.cat([self.value_scales, vs], -1)
        # DynamicLayer's length and cropping read ``keys``: they are the dequantized rows
        self.keys = dequantize(self.keys8, self.key_scales).to(self.dtype)
        self.values = dequantize(self.values8, self.value_scales).to(self.dtype)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and tokens_to_remove < 0:
            n = self.keys.shape[-2]
            self.keys8, self.values8 = self.keys8[..., :n, :], self.values8[..., :n, :]
            self.key_scales, self.value_scales = self.key_scales[..., :n], \
                self.value_scales[..., :n]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("FP8DynamicLayer: beam search and batch expansion are not "
                                  "supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("FP8DynamicLayer: batch selection is not supported")


def fp8_dynamic_cache(model) -> Cache:
    """A transformers ``Cache`` of ``FP8DynamicLayer`` for every decoder layer of
    ``model`` (pass it as ``past_key_values`` to ``generate`` or a forward)."""
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[FP8DynamicLayer() for _ in range(n)])
