"""MiniMax-M3 (``transformers.models.minimax_m3_vl``) on msa.

What changes when ``enable_msa(model)`` switches a MiniMax-M3 model to ``"msa"``:

* each ``MiniMaxM3VLIndexer`` keeps its own projections, Gemma RMSNorm, partial RoPE and
  the index keys of the model's cache (``idx_keys``), but instead of the dense
  ``[B, Hi, Tq, Tk]`` score tensor it hands ``IndexInputs(qi, ki)`` to the attention;
* a ``minimax_m3_sparse`` layer's attention runs ``msa.msa_attention`` on them: the
  streamed indexer (no ``Tq x Tk`` tensor) and the sparse attention, plus the indexer KL
  when the index branch trains; a ``full_attention`` layer runs dense causal attention
  (SDPA: cuDNN / flash on the GPU);
* decoding on CUDA (up to 16 new tokens) reads the cached keys in place with the fused
  paged decoder (``msa.inference.PagedDecoder``), the cache rows seen as pages of one
  block: batch 1 with any cache, larger batches with a static cache whose length is a
  multiple of the block.

Conventions (docs/semantics.md, "Other implementations"): transformers returns the
local block first and ranks unscaled scores; msa returns it last and scales the scores
by ``index_head_dim ** -0.5`` (the MSA training contract's indexer temperature, used by
the KL). The selected *sets* are the same: attention does not depend on slot order, and a
positive scale does not change the ranking. ``index_local_blocks`` other than 1 is not
supported.
"""
from __future__ import annotations

import sys
import weakref
from typing import NamedTuple, Optional

import torch

from ...config import MSAConfig
from ...functional import msa_attention
from ...ops.dense import dense_attention
from ...varlen import Segments
from .padding import Padding, pack, unpack

FAMILY = ("minimax_m3_vl", "minimax_m3_vl_text")


class IndexInputs(NamedTuple):
    """What the index branch hands to a sparse layer's attention: ``qi [B, Tq, Hi, Di]``
    and the cached index keys ``ki [B, Tk, 1, Di]`` (``Tk`` may exceed the real length in
    a static cache); with an FP8 cache (``fp8_cache.py``) the layer's ``scales``
    ``(k_scales, v_scales [B, Hkv, Tk], ki_scales [B, 1, Tk] or None)``."""

    qi: torch.Tensor
    ki: torch.Tensor
    scales: Optional[tuple] = None


def is_minimax_m3(model) -> bool:
    cfg = getattr(model, "config", None)
    types = {getattr(cfg, "model_type", None)}
    text = getattr(cfg, "text_config", None)
    types.add(getattr(text, "model_type", None))
    return bool(types & set(FAMILY)) or any(type(m).__name__ == "MiniMaxM3VLIndexer"
                                            for m in model.modules())


def text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def msa_config(cfg, scaling: float) -> MSAConfig:
    """The MSAConfig of a MiniMax-M3 text config."""
    return MSAConfig(num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                     head_dim=cfg.head_dim, num_index_heads=cfg.index_n_heads,
                     index_head_dim=cfg.index_head_dim, block_size=cfg.index_block_size,
                     topk=cfg.index_topk_blocks, softmax_scale=scaling,
                     kl_loss_coeff=float(getattr(cfg, "msa_kl_coeff", 1.0)),
                     index_precision=getattr(cfg, "msa_index_precision", "input"))


def check_supported(cfg) -> None:
    """Reject configurations msa does not implement, naming the field."""
    if cfg.index_local_blocks != 1:
        raise NotImplementedError(f"msa forces exactly one local block; this model has "
                                  f"index_local_blocks={cfg.index_local_blocks}")
    if cfg.index_n_heads not in (1, cfg.num_key_value_heads):
        raise NotImplementedError(f"msa needs index_n_heads = num_key_value_heads "
                                  f"({cfg.num_key_value_heads}) or 1, got "
                                  f"{cfg.index_n_heads}")
    msa_config(cfg, 1.0)                      # head dims, block size, top-k supported


def indexer_forward(self, hidden_states, position_embeddings, cache, position_ids):
    """``MiniMaxM3VLIndexer.forward`` for msa: the model's projections, norms, RoPE and
    cache, no score tensor; returns ``IndexInputs``. With ``model.config.msa_train_indexer``
    the index projections see the hidden states through a stop-gradient (the KL trains
    them alone)."""
    if getattr(self.config, "msa_train_indexer", False):
        hidden_states = hidden_states.detach()
    b, t, _ = hidden_states.shape
    d = self.head_dim
    qi = self.q_norm(self.q_proj(hidden_states).view(b, t, -1, d)).transpose(1, 2)
    ki = self.k_norm(self.k_proj(hidden_states).view(b, t, 1, d)).transpose(1, 2)
    cos, sin = position_embeddings
    rope = sys.modules[type(self).__module__].apply_rotary_pos_emb
    qi, ki = rope(qi, ki, cos[..., :d], sin[..., :d])
    scales = None
    if cache is not None:
        layer = cache.layers[self.layer_idx]
        ki = layer.update_index(ki)
        if hasattr(layer, "fp8_index_keys"):          # an FP8 cache layer (fp8_cache.py)
            scales = layer.scales()
    return IndexInputs(qi.transpose(1, 2), ki.transpose(1, 2), scales)


def sparse_attention(module, query, key, value, inputs: IndexInputs, mask, scaling,
                     position_ids: Optional[torch.Tensor]):
    """A ``minimax_m3_sparse`` layer: ``query [B, Hq, Tq, D]``, ``key, value
    [B, Hkv, Tk, D]`` -> ``[B, Tq, Hq, D]``."""
    cfg = module.config
    config = msa_config(cfg, scaling)
    b, tq = query.shape[0], query.shape[2]
    tk = key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    qi, ki, fp8 = inputs
    mode = getattr(cfg, "msa_mode", "sparse")
    train = bool(getattr(cfg, "msa_train_indexer", False))
    backend = getattr(cfg, "msa_backend", "auto")
    if not isinstance(mask, Padding):
        from .decode import fused_decode, use_fused_decode
        if use_fused_decode(q, key, config, train and torch.is_grad_enabled(), mode, backend):
            return fused_decode(module, q, qi, key, value, inputs.ki, config, position_ids,
                                scales=fp8)
        k, v, ki = written(tk, position_ids, tq, k, v, ki)
    if fp8 is not None:
        k, v, ki, qi = dequantized(k, v, ki, qi, fp8, q.dtype)
    if isinstance(mask, Padding):
        p = mask.packing(tq, tk)
        out, aux = msa_attention(pack(q, p.q_index), pack(k, p.k_index), pack(v, p.k_index),
                                 pack(qi, p.q_index), pack(ki, p.k_index), p.cu_seqlens_q,
                                 p.cu_seqlens_k, p.max_q, p.max_k, config=config, mode=mode,
                                 train_indexer=train, return_aux=True, backend=backend)
        module.msa_last_kl = aux.kl
        return unpack(out, p.q_index, b, tq)
    out, aux = msa_attention(q, k, v, qi, ki, config=config, mode=mode, train_indexer=train,
                             return_aux=True, backend=backend)
    module.msa_last_kl = aux.kl
    return out


def dequantized(k, v, ki, qi, scales, dtype):
    """The rows an FP8 cache holds, read back: ``k, v [B, n, Hkv, D]`` and ``ki [B, n, 1,
    Di]`` (the first ``n`` slots; e4m3 index keys only with a ``ki_scales``) times their
    scales ``[B, H, >= n]``, as ``dtype``; ``qi`` quantized to e4m3 and back when the index
    keys are e4m3 (they are scored against e4m3 queries, docs/semantics.md)."""
    from ...ops.quant import dequantize, fake_quantize
    n = k.shape[1]

    def read(x, s):
        return dequantize(x, s.transpose(1, 2)[:, :n]).to(dtype)
    k, v = read(k, scales[0]), read(v, scales[1])
    if scales[2] is not None:
        ki, qi = read(ki, scales[2]), fake_quantize(qi).to(qi.dtype)
    return k, v, ki, qi


def dense_causal(query, key, value, mask, scaling, position_ids):
    """A ``full_attention`` layer: causal attention over the real keys (SDPA)."""
    b, tq, tk = query.shape[0], query.shape[2], key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if isinstance(mask, Padding):
        p = mask.packing(tq, tk)
        qp, kp, vp = pack(q, p.q_index), pack(k, p.k_index), pack(v, p.k_index)
        out = dense_attention(qp, kp, vp, p.segments, scale=scaling)
        return unpack(out, p.q_index, b, tq)
    if position_ids is not None and tq <= DEVICE_MASK_QUERIES and tk > tq:
        return _decode_causal(q, k, v, position_ids, scaling)
    length = real_length(tk, position_ids, tq)
    seg = Segments([r * tq for r in range(b)], [tq] * b, [r * tk for r in range(b)],
                   [length] * b, b * tq, b * tk)
    out = dense_attention(q.reshape(b * tq, *q.shape[2:]), k.reshape(b * tk, *k.shape[2:]),
                          v.reshape(b * tk, *v.shape[2:]), seg, scale=scaling)
    return out.view(b, tq, *out.shape[1:])


DEVICE_MASK_QUERIES = 16   # decode steps: the causal mask is built on the device


def _decode_causal(q, k, v, position_ids, scaling):
    """A few new tokens over a cache (``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]``):
    query ``i`` sees the slots ``j <= position_ids[:, i]`` (mask built on the device: no
    host read, so a decode step can be captured in a CUDA graph)."""
    b, tq, hq = q.shape[:3]
    tk, hkv = k.shape[1], k.shape[2]
    pos = position_ids.reshape(-1, tq).expand(b, tq)
    mask = torch.arange(tk, device=q.device).view(1, 1, 1, tk) <= pos.view(b, 1, tq, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        scale=scaling, enable_gqa=hq != hkv)
    return out.transpose(1, 2)


def written(tk: int, position_ids, tq: int, *xs):
    """``xs [B, Tk, ...]`` cut to the written slots (a static cache holds more)."""
    n = real_length(tk, position_ids, tq)
    return tuple(x[:, :n] for x in xs) if n < tk else xs


_LENGTHS: dict = {}        # position_ids of the running forward -> real key count


def real_length(tk: int, position_ids, tq: int) -> int:
    """Real keys of an unpadded batch: all ``tk`` slots of a dynamic cache; for a static
    cache (``tk`` slots, fewer written) the last query's position + 1, read once per
    forward (the same ``position_ids`` tensor reaches every layer)."""
    if position_ids is None or tk == tq:          # no cache (training): all keys are new
        return tk
    key = (id(position_ids), position_ids._version)      # written in place: read again
    hit = _LENGTHS.get(key)
    if hit is None or hit[0]() is not position_ids:
        n = int(position_ids.reshape(-1, position_ids.shape[-1])[0, -1]) + 1
        hit = (weakref.ref(position_ids), n)
        _LENGTHS.clear()
        _LENGTHS[key] = hit
    n = hit[1]
    if not tq <= n <= tk:
        raise ValueError(f"msa: position_ids say {n} tokens, the cache holds {tk} slots and "
                         f"{tq} new tokens")
    return n

