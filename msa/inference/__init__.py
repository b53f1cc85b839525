"""Inference: paged KV cache, reference paged prefill / decode, fused paged decoder."""
from .decode import PagedDecoder
from .paged import PagedKVCache, paged_attention, paged_indexer

__all__ = ["PagedKVCache", "PagedDecoder", "paged_indexer", "paged_attention"]
