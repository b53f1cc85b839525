"""The ``"msa"`` attention function and mask function transformers calls.

``msa_attention_forward(module, query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] (cache
included), attention_mask, ...)`` returns ``([B, Tq, Hq, D], None)``. It serves three
kinds of layers, told apart by what the model hands it:

* a MiniMax-M3 sparse layer (``block_indices`` is an ``IndexInputs``): the model's own
  index branch, msa's indexer and sparse attention (``minimax_m3.py``);
* a MiniMax-M3 full-attention layer (the module has an ``indexer`` attribute that is
  ``None``): dense causal attention;
* any other (Llama-family) layer: self-indexing or trained index projections
  (``llama.py``).

``attention_mask`` is what ``msa_mask`` made: ``None`` (no padding) or a ``Padding``
(packed varlen; ``padding.py``). A 4D mask tensor (transformers versions without the
mask interface) is accepted when it is the plain causal mask.
"""
from __future__ import annotations

import torch

from .llama import self_indexed_attention
from .minimax_m3 import IndexInputs, dense_causal, sparse_attention, written
from .padding import Padding, msa_mask, pack, unpack

NAME = "msa"


def _check_mask_tensor(mask: torch.Tensor, tq: int, tk: int) -> None:
    """A 4D mask from an older transformers: only the bottom-right causal one is
    supported (checked on the device, one synchronisation)."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    t = torch.arange(tk, device=mask.device)
    causal = t.view(1, -1) <= (torch.arange(tq, device=mask.device) + tk - tq).view(-1, 1)
    if not bool((allowed == causal).all()):
        raise NotImplementedError("msa attention with this transformers version supports "
                                  "causal attention without padding; pass unpadded batches "
                                  "or upgrade transformers (>= 4.53 packs padded batches)")


def msa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling=None, block_indices=None, **kwargs):
    """transformers attention function (see module docstring)."""
    if dropout:
        raise NotImplementedError("msa attention does not support attention dropout")
    b, hq, tq, d = query.shape
    tk = key.shape[2]
    scaling = d ** -0.5 if scaling is None else scaling
    if isinstance(attention_mask, torch.Tensor):
        _check_mask_tensor(attention_mask, tq, tk)
        attention_mask = None
    position_ids = kwargs.get("position_ids")
    if isinstance(block_indices, IndexInputs):
        return sparse_attention(module, query, key, value, block_indices, attention_mask,
                                scaling, position_ids), None
    if hasattr(module, "indexer"):                  # MiniMax-M3 full-attention layer
        return dense_causal(query, key, value, attention_mask, scaling, position_ids), None
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if isinstance(attention_mask, Padding):
        p = attention_mask.packing(tq, tk)
        out = self_indexed_attention(module, pack(q, p.q_index)[None], pack(k, p.k_index)[None],
                                     pack(v, p.k_index)[None], scaling, p)
        return unpack(out[0], p.q_index, b, tq), None
    k, v = written(tk, position_ids, tq, k, v)
    return self_indexed_attention(module, q, k, v, scaling), None


def register() -> None:
    """Register ``"msa"`` with transformers' attention interface (and, where transformers
    has one, its mask interface: ``msa_mask``)."""
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, msa_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:                   # older transformers: 4D masks reach the layers
        return
    AttentionMaskInterface.register(NAME, msa_mask)
