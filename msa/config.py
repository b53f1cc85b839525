"""MSAConfig: the hyper-parameters of MiniMax Sparse Attention.

The default is the MiniMax-M3 preset (Hq=64, Hkv=4, D=128, 4 index heads of dim 128,
blocks of 128 keys, top-16 = 15 ranked blocks + the query's own local block).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_BLOCK_SIZES = (64, 128)
MAX_TOPK = 64


@dataclass(frozen=True)
class MSAConfig:
    """Shapes and constants of one MSA layer.

    Attributes:
        num_heads: query heads ``Hq``.
        num_kv_heads: key/value heads ``Hkv``; must divide ``Hq`` (GQA group ``G = Hq/Hkv``).
        head_dim: ``D`` of q/k/v, one of 64, 128, 256.
        num_index_heads: ``Hi``; ``None`` means ``Hkv``. Must be ``Hkv`` or 1. Index head
            ``h`` owns the top-k used by KV head ``h`` (or all KV heads when ``Hi == 1``).
        index_head_dim: ``Di``; ``None`` means ``head_dim``.
        block_size: keys per block (= page size in inference), 64 or 128.
        topk: selected blocks per (index head, query), 1..64, the local block included.
        softmax_scale: attention logit scale, ``None`` means ``head_dim ** -0.5``.
        index_softmax_scale: indexer logit scale, ``None`` means ``index_head_dim ** -0.5``.
        kl_loss_coeff: weight of the indexer KL loss.
        index_precision: ``"input"`` (default) or ``"fp8"``: rank blocks by e4m3 index
            scores (opt-in; the selected LSE and the KL keep the inputs' precision).
    """

    num_heads: int = 64
    num_kv_heads: int = 4
    head_dim: int = 128
    num_index_heads: Optional[int] = None
    index_head_dim: Optional[int] = None
    block_size: int = 128
    topk: int = 16
    softmax_scale: Optional[float] = None
    index_softmax_scale: Optional[float] = None
    kl_loss_coeff: float = 1.0
    index_precision: str = "input"

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "head_dim", "block_size", "topk"):
            _check_int(name, getattr(self, name))
        for name in ("num_index_heads", "index_head_dim"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        for name in ("softmax_scale", "index_softmax_scale", "kl_loss_coeff"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, (int, float))):
                raise TypeError(f"{name} must be a float, got {value!r}")
        if self.num_heads < 1 or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a positive multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        check_head_dim("head_dim", self.head_dim)
        check_head_dim("index_head_dim", self.index_dim)
        if self.index_heads not in (1, self.num_kv_heads):
            raise ValueError(
                f"num_index_heads must be num_kv_heads ({self.num_kv_heads}) or 1, "
                f"got {self.num_index_heads}")
        check_block_size(self.block_size)
        check_topk(self.topk)
        for name in ("softmax_scale", "index_softmax_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive float, got {value}")
        if not math.isfinite(self.kl_loss_coeff):
            raise ValueError(f"kl_loss_coeff must be finite, got {self.kl_loss_coeff}")
        check_index_precision(self.index_precision)

    @property
    def index_heads(self) -> int:
        return self.num_kv_heads if self.num_index_heads is None else self.num_index_heads

    @property
    def index_dim(self) -> int:
        return self.head_dim if self.index_head_dim is None else self.index_head_dim

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim ** -0.5

    @property
    def index_scale(self) -> float:
        if self.index_softmax_scale is not None:
            return self.index_softmax_scale
        return self.index_dim ** -0.5



INDEX_PRECISIONS = ("input", "fp8")
# "int4": the decode scan of an int4 copy of the index keys (docs/semantics.md, "INT4 scan
# copy"); msa_indexer applies it on its reference backend, as a model of that scan
INDEX_RULES = INDEX_PRECISIONS + ("int4",)


def check_index_precision(value, allowed=INDEX_PRECISIONS) -> None:
    """``"input"``: index scores in the inputs' precision; ``"fp8"``: blocks ranked by
    e4m3 scores (docs/semantics.md, "FP8 index scoring"); where ``allowed``, ``"int4"``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"index_precision must be one of {allowed}, got {value!r}")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def check_head_dim(name: str, d: int) -> None:
    if isinstance(d, bool) or d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name} must be one of {SUPPORTED_HEAD_DIMS}, got {d}")


def check_block_size(block_size: int, name: str = "block_size") -> None:
    if isinstance(block_size, bool) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")


def check_topk(topk: int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be an int in [1, {MAX_TOPK}], got {topk!r}")


MINIMAX_M3 = MSAConfig()
