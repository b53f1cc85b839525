"""``MSAttention``: a self-attention layer with MiniMax Sparse Attention.

Projections: ``q/k/v/o`` (GQA, ``Hq`` query and ``Hkv`` KV heads of dim ``D``) and the index
branch ``index_q`` (``Hi`` heads of dim ``Di``) / ``index_k`` (one shared head). Optional
per-head RMSNorm on q/k (and index q/k) and RoPE on the first ``rotary_dim`` dims, applied
to both branches. ``mode="sparse"`` runs MSA; ``mode="dense"`` is the warm-up (dense causal
attention while the indexer learns from it). In training, the indexer's KL loss is
attached to the output, so ``loss.backward()`` trains both branches (teacher detached; the
index projections read the hidden states through a stop-gradient, so the KL never reaches
the backbone).

Decoding: pass a ``KVCache`` (contiguous, appends by concatenation) or a
``msa.inference.PagedKVCache`` (pages shared by all layers; the fused decoder on CUDA);
the new tokens' keys are appended and the new queries attend as the causal suffix of the
cached sequence (chunked prefill, decode, multi-token decode).
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import nn

from ..config import MSAConfig
from ..functional import msa_attention
from ..inference.paged import PagedKVCache
from ..ops.checks import check_config
from .rope import apply_rope, rope_cos_sin


class KVCache:
    """Contiguous per-layer cache of ``k, v [B, T, Hkv, D]`` and ``ki [B, T, 1, Di]``.

    A simple reference cache (appends by concatenation); the paged cache of the inference
    path serves long contexts.
    """

    def __init__(self):
        self.layers: List[Optional[tuple]] = []

    def length(self, layer_idx: int) -> int:
        if layer_idx >= len(self.layers) or self.layers[layer_idx] is None:
            return 0
        return self.layers[layer_idx][0].shape[1]

    def update(self, layer_idx: int, k, v, ki):
        """Append ``[B, t, ...]`` tensors and return the full cached ``(k, v, ki)``."""
        while len(self.layers) <= layer_idx:
            self.layers.append(None)
        old = self.layers[layer_idx]
        if old is not None:
            for name, a, b in zip(("k", "v", "ki"), old, (k, v, ki)):
                if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
                    raise ValueError(
                        f"KVCache layer {layer_idx} holds {name} of batch {a.shape[0]} and "
                        f"heads x dim {tuple(a.shape[2:])}; the new tokens' {name} has "
                        f"batch {b.shape[0]} and {tuple(b.shape[2:])} (one cache per "
                        f"batch of sequences)")
        new = (k, v, ki) if old is None else tuple(torch.cat([a, b], 1)
                                                   for a, b in zip(old, (k, v, ki)))
        self.layers[layer_idx] = new
        return new


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class MSAttention(nn.Module):
    """Self-attention with MSA. ``hidden_states [B, T, hidden]`` -> ``[B, T, hidden]``.

    Args:
        hidden_size: model width.
        config: ``MSAConfig`` (heads, head dims, block size, top-k, KL weight).
        rotary_dim: RoPE dims (default ``head_dim``; smaller = partial RoPE; 0 = none).
            The index branch rotates ``min(rotary_dim, index_head_dim)`` dims.
        rope_theta: RoPE base.
        qk_norm: per-head RMSNorm on q, k, index q, index k.
        bias: bias in the q/k/v projections.
        layer_idx: index of this layer in a ``KVCache``.
    """

    def __init__(self, hidden_size: int, config: MSAConfig, *, rotary_dim: Optional[int] = None,
                 rope_theta: float = 10000.0, qk_norm: bool = False, bias: bool = False,
                 layer_idx: int = 0):
        super().__init__()
        c = check_config(config)
        self.config, self.layer_idx, self.rope_theta = c, layer_idx, rope_theta
        self.rotary_dim = c.head_dim if rotary_dim is None else rotary_dim
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= c.head_dim:
            raise ValueError(f"rotary_dim must be even and in [0, {c.head_dim}], "
                             f"got {self.rotary_dim}")
        self.q_proj = nn.Linear(hidden_size, c.num_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, hidden_size, bias=False)
        self.index_q_proj = nn.Linear(hidden_size, c.index_heads * c.index_dim, bias=False)
        self.index_k_proj = nn.Linear(hidden_size, c.index_dim, bias=False)
        norm = (lambda d: RMSNorm(d)) if qk_norm else (lambda d: nn.Identity())
        self.q_norm, self.k_norm = norm(c.head_dim), norm(c.head_dim)
        self.index_q_norm, self.index_k_norm = norm(c.index_dim), norm(c.index_dim)

    def _rope(self, x, cos, sin):
        r = min(cos.shape[-1], x.shape[-1])
        return apply_rope(x, cos[..., :r], sin[..., :r]) if r else x

    def forward(self, hidden_states: torch.Tensor, *,
                cache: Optional[Union[KVCache, PagedKVCache]] = None,
                mode: str = "sparse", return_aux: bool = False):
        hidden = self.q_proj.in_features
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden:
            raise ValueError(f"hidden_states must be [B, T, hidden={hidden}], got "
                             f"{tuple(hidden_states.shape)}")
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be floating point, got {hidden_states.dtype}")
        if cache is not None and not isinstance(cache, (KVCache, PagedKVCache)):
            raise TypeError(f"cache must be a KVCache or a msa.inference.PagedKVCache, got "
                            f"{type(cache).__name__}")
        c = self.config
        b, t, _ = hidden_states.shape
        past = cache.length(self.layer_idx) if cache is not None else 0
        q = self.q_norm(self.q_proj(hidden_states).view(b, t, c.num_heads, c.head_dim))
        k = self.k_norm(self.k_proj(hidden_states).view(b, t, c.num_kv_heads, c.head_dim))
        v = self.v_proj(hidden_states).view(b, t, c.num_kv_heads, c.head_dim)
        # stop-gradient on the index branch's input: the KL trains the index projections
        # only, never the backbone (the main branch's gradients are unchanged by the KL)
        hi = hidden_states.detach()
        qi = self.index_q_norm(self.index_q_proj(hi).view(b, t, c.index_heads, c.index_dim))
        ki = self.index_k_norm(self.index_k_proj(hi).view(b, t, 1, c.index_dim))
        if self.rotary_dim:
            pos = torch.arange(past, past + t, device=hidden_states.device)
            cos, sin = rope_cos_sin(pos, self.rotary_dim, self.rope_theta)
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            qi, ki = self._rope(qi, cos, sin), self._rope(ki, cos, sin)
        if isinstance(cache, PagedKVCache):
            if cache.config is not None and cache.config is not c and \
                    {**vars(cache.config), "kl_loss_coeff": c.kl_loss_coeff} != vars(c):
                raise ValueError(f"the PagedKVCache was made for {cache.config}, this layer "
                                 f"has {c}: the cache would attend with its own config")
            out, aux = cache.attend(self.layer_idx, q, k, v, qi, ki), None
        else:
            if cache is not None:
                k, v, ki = cache.update(self.layer_idx, k, v, ki)
            out = msa_attention(q, k, v, qi, ki, config=c, mode=mode,
                                train_indexer=self.training, return_aux=return_aux)
            out, aux = out if return_aux else (out, None)
        y = self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim))
        return (y, aux) if return_aux else y
