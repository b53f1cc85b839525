"""Inference: the paged KV cache, paged prefill over it, the fused paged decoder.

Importing this package does not need triton; the fused decoder loads its kernels when
it is first made.
"""
from .decoder import PagedDecoder
from .paged import PagedKVCache
from .paged_ops import paged_attention, paged_attention_in_place, paged_indexer, token_major

__all__ = ["PagedKVCache", "PagedDecoder", "paged_indexer", "paged_attention",
           "paged_attention_in_place", "token_major"]
