"""Layers: ``MSAttention`` (projections, index branch, RoPE, QK-norm, caches)."""
from .layer import KVCache, MSAttention, RMSNorm
from .rope import apply_rope, rope_cos_sin

__all__ = ["MSAttention", "KVCache", "RMSNorm", "apply_rope", "rope_cos_sin"]
