from .layer import KVCache, MSAttention, RMSNorm
from .paged_cache import PagedCache
from .rope import apply_rope, rope_cos_sin

__all__ = ["MSAttention", "KVCache", "PagedCache", "RMSNorm", "apply_rope", "rope_cos_sin"]
