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

*Trained indexer*: ``add_index_projections(model)`` gives every attention layer its own
index projections (``msa_index_q``: the mean of each GQA group's query rows,
``msa_index_k``: a copy of the key projection, RoPE applied), so at initialisation it
selects exactly what self-indexing selects; training then updates them through the
indexer KL loss (``model.config.msa_mode = "dense"`` for the dense warm-up, then
``"sparse"``). Exact at init for models without QK-norm (Llama, Mistral, Qwen2, SmolLM).
"""
from __future__ import annotations

import sys

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
    if hasattr(module, "msa_index_q"):                          # trained index projections
        qi, ki = _index_qk(module, tq, tk)
        out, aux = msa_attention(q, k, v, qi, ki, config=config, return_aux=True,
                                 mode=getattr(cfg_src, "msa_mode", "sparse"))
        module.msa_last_kl = aux.kl_loss
        return out, None
    qi = q.reshape(b, tq, hkv, hq // hkv, d).mean(3)          # self-indexing
    out = msa_attention(q, k, v, qi, k, config=config, train_indexer=False)
    return out, None


def _index_qk(module, tq: int, tk: int):
    """Index query ``[B, Tq, Hkv, D]`` and keys ``[B, Tk, Hkv, D]`` (cached across calls)
    from the hidden states the pre-hook stored."""
    h, (cos, sin) = module.msa_inputs
    h = h.detach()                  # stop-gradient: the KL trains the index projections only
    b = h.shape[0]
    qi = module.msa_index_q(h).view(b, tq, -1, module.head_dim).transpose(1, 2)
    ki = module.msa_index_k(h).view(b, tq, -1, module.head_dim).transpose(1, 2)
    rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
    qi, ki = rope(qi, ki, cos, sin)
    qi, ki = qi.transpose(1, 2), ki.transpose(1, 2)
    cached = getattr(module, "msa_index_keys", None)
    if tk > tq and cached is not None and cached.shape[1] == tk - tq:
        ki = torch.cat([cached, ki], 1)
    elif tk != tq:
        raise RuntimeError(f"index-key cache holds {0 if cached is None else cached.shape[1]}"
                           f" tokens, the KV cache {tk - tq}: restart generation")
    module.msa_index_keys = ki.detach()
    return qi, ki


def _store_inputs(module, args, kwargs):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    pos = kwargs.get("position_embeddings")
    if pos is None:
        pos = args[1]
    module.msa_inputs = (hidden, pos)


def attention_modules(model):
    """The attention modules (those with ``q_proj``, ``k_proj`` and ``layer_idx``)."""
    return [m for m in model.modules()
            if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "layer_idx")]


def add_index_projections(model):
    """Add trainable index projections to every attention layer, initialised from its Q/K
    projections so that they select what self-indexing selects; returns the model.

    ``msa_index_q`` ``[hidden -> Hkv * D]`` is the mean of each GQA group's query-projection
    rows (RoPE is linear and shared by the heads, so its output equals the mean of the
    rotated group queries); ``msa_index_k`` copies ``k_proj``. Their parameters are the
    only ones the indexer KL loss trains; freeze the rest for a KL warm-up of a pretrained
    model. ``module.msa_last_kl`` holds the layer's last KL value.
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError("model has no attention modules with q_proj, k_proj and layer_idx "
                         "(Llama-family layout expected)")
    for m in modules:
        if hasattr(m, "msa_index_q"):
            raise ValueError(f"layer {m.layer_idx} already has index projections")
        qp, kp = m.q_proj, m.k_proj
        hkv_d = kp.out_features
        g = qp.out_features // hkv_d
        iq = torch.nn.Linear(qp.in_features, hkv_d, bias=qp.bias is not None,
                             device=qp.weight.device, dtype=qp.weight.dtype)
        ik = torch.nn.Linear(kp.in_features, hkv_d, bias=kp.bias is not None,
                             device=kp.weight.device, dtype=kp.weight.dtype)
        d = m.head_dim
        with torch.no_grad():
            iq.weight.copy_(qp.weight.view(-1, g, d, qp.in_features).mean(1)
                            .reshape(hkv_d, -1))
            ik.weight.copy_(kp.weight)
            if qp.bias is not None:
                iq.bias.copy_(qp.bias.view(-1, g, d).mean(1).reshape(-1))
            if kp.bias is not None:
                ik.bias.copy_(kp.bias)
        m.msa_index_q, m.msa_index_k = iq, ik
        m.register_forward_pre_hook(_store_inputs, with_kwargs=True)
    return model


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
