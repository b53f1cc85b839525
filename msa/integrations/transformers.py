"""Hugging Face transformers integration: ``attn_implementation="msa"``.

Training-free *self-indexing*: the index query of KV group ``h`` is the mean of the group's
queries and the index key is the layer's own key of head ``h``, so any pretrained
Llama-family model runs MSA without new weights::

    from msa.integrations.transformers import enable_msa
    enable_msa(model, block_size=64, topk=16)      # registers "msa" and switches to it
    model.generate(...)

Queries attend as the causal suffix of the cached keys, so prefill, chunked prefill and
``generate()`` with a KV cache all work. Padded batches are not supported yet (a padding
mask raises ``NotImplementedError``); run unpadded batches.
"""
from __future__ import annotations

import torch

from ..config import MSAConfig, check_block_size, check_topk
from ..functional import msa_attention

NAME = "msa"


def _is_plain_causal(mask: torch.Tensor, tq: int, tk: int) -> bool:
    """True if a ``[B, 1|H, Tq, Tk]`` bool/additive mask is the bottom-right causal mask."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    t = torch.arange(tk, device=mask.device)
    causal = t.view(1, -1) <= (torch.arange(tq, device=mask.device) + tk - tq).view(-1, 1)
    return bool((allowed == causal).all())


def msa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling=None, is_causal=None, **kwargs):
    """transformers attention function: ``query [B, Hq, Tq, D]``, ``key/value
    [B, Hkv, Tk, D]`` (cache included) -> ``([B, Tq, Hq, D], None)``."""
    if dropout:
        raise NotImplementedError("msa attention does not support attention dropout")
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    if attention_mask is not None and not _is_plain_causal(attention_mask, tq, tk):
        raise NotImplementedError("msa attention supports causal attention without padding; "
                                  "pass unpadded batches (no padding attention_mask)")
    cfg_src = module.config
    config = MSAConfig(num_heads=hq, num_kv_heads=hkv, head_dim=d,
                       block_size=getattr(cfg_src, "msa_block_size", 64),
                       topk=getattr(cfg_src, "msa_topk", 16),
                       softmax_scale=scaling, index_softmax_scale=scaling)
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    qi = q.reshape(b, tq, hkv, hq // hkv, d).mean(3)          # self-indexing
    out = msa_attention(q, k, v, qi, k, config=config, train_indexer=False)
    return out, None


def register() -> None:
    """Register ``"msa"`` with transformers' attention and mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, msa_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)      # causal masks skipped when possible


def enable_msa(model, *, block_size: int = 64, topk: int = 16):
    """Switch a loaded model to MSA self-indexing attention; returns the model."""
    check_block_size(block_size)
    check_topk(topk)
    register()
    model.config.msa_block_size = block_size
    model.config.msa_topk = topk
    model.set_attn_implementation(NAME)
    return model
