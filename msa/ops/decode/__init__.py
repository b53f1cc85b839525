"""Paged decode: ``naive.py`` reference, ``triton.py`` fused kernels (imported lazily)."""
from .naive import gather_pages, paged_decode_reference, paged_segments

__all__ = ["gather_pages", "paged_decode_reference", "paged_segments"]
