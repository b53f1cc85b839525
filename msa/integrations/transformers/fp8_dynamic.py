"""An FP8 (e4m3) dynamic cache for Llama-family models: ``fp8_dynamic_cache(model)``.

Each layer (``FP8DynamicLayer``) stores its keys and values ``[B, Hkv, L, D]`` in e4m3
with one fp32 scale per token and head (``scale = max|x| / 448``, ``msa.ops.quant``: the
format of ``msa.inference.PagedKVCache`` and of MiniMax-M3's ``fp8_static_cache``),
quantized when the tokens are written, and hands the attention the whole cache
dequantized to the model's dtype (built per call, not kept): prefill and every decode
step attend over what an FP8 cache holds, and the layer keeps 1 + 4 / D bytes per
element. With MSA self-indexing the keys are the index keys too, so the selection is made
over the e4m3 keys as well. A row holding NaN or inf is rejected by name.
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
    [B, Hkv, L, D]``, ``key_scales, value_scales [B, Hkv, L]``. Only these are kept; the
    dequantized rows are built for each attention call and not stored (``keys`` and
    ``values`` stay empty ``[B, Hkv, 0, D]`` placeholders of the model's dtype)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.keys8 = self.keys.to(E4M3)
        self.values8 = self.values.to(E4M3)
        self.key_scales = key_states.new_zeros(b, h, 0, dtype=torch.float32)
        self.value_scales = key_states.new_zeros(b, h, 0, dtype=torch.float32)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Quantize the new rows ``[B, Hkv, n, D]``, append them; return every cached row
        dequantized ``[B, Hkv, L, D]`` (in the dtype of the new rows)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k8, ks = _quantize(key_states, "keys")
        v8, vs = _quantize(value_states, "values")
        self.keys8 = torch.cat([self.keys8, k8], -2)
        self.values8 = torch.cat([self.values8, v8], -2)
        self.key_scales = torch.cat([self.key_scales, ks], -1)
        self.value_scales = torch.cat([self.value_scales, vs], -1)
        return (dequantize(self.keys8, self.key_scales).to(key_states.dtype),
                dequantize(self.values8, self.value_scales).to(value_states.dtype))

    def get_seq_length(self) -> int:
        return self.keys8.shape[-2] if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` rows (a negative count, as DynamicLayer)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of rows to remove, got "
                             f"{tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        n = max(0, self.keys8.shape[-2] + tokens_to_remove)
        self.keys8, self.values8 = self.keys8[..., :n, :], self.values8[..., :n, :]
        self.key_scales = self.key_scales[..., :n]
        self.value_scales = self.value_scales[..., :n]

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("FP8DynamicLayer: beam search, batch expansion or "
                                  "selection and offloading are not supported")

    batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported
    offload = prefetch = _unsupported


def fp8_dynamic_cache(model) -> Cache:
    """A transformers ``Cache`` of ``FP8DynamicLayer`` for every decoder layer of
    ``model`` (pass it as ``past_key_values`` to ``generate`` or a forward)."""
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[FP8DynamicLayer() for _ in range(n)])
