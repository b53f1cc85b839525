"""Inference: paged KV cache and paged prefill / decode (reference implementation)."""
from .paged import PagedKVCache, paged_attention, paged_indexer

__all__ = ["PagedKVCache", "paged_indexer", "paged_attention"]
