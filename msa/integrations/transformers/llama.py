"""Llama-family models (Llama, Mistral, Qwen2, SmolLM, ...): MSA with the model's own
queries and keys as the index branch.

*Self-indexing* (training-free): the index query of KV group ``h`` is the mean of the
group's queries and the index key is the layer's own key of head ``h``.

*Trained indexer*: ``add_index_projections(model)`` gives every attention layer its own
index projections (``msa_index_q``: the mean of each GQA group's query rows,
``msa_index_k``: a copy of the key projection, RoPE applied), so at initialisation it
selects exactly what self-indexing selects (for models without QK-norm); the indexer
KL loss then trains them (``model.config.msa_mode = "dense"`` for the dense warm-up, then
``"sparse"``). The projections read the hidden states through a stop-gradient.
"""
from __future__ import annotations

import sys

import torch

from ...config import MSAConfig
from ...functional import msa_attention
from .padding import Packing


def attention_modules(model):
    """The attention modules (those with ``q_proj``, ``k_proj`` and ``layer_idx``)."""
    return [m for m in model.modules()
            if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "layer_idx")]


def self_indexed_attention(module, q, k, v, scaling, packing: Packing = None):
    """``q [B|1, Tq|total_q, Hq, D]``, ``k, v [.., Tk|total_k, Hkv, D]`` (batched, or packed
    with a leading 1 and ``packing``) -> output like ``q``."""
    cfg_src = module.config
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    config = MSAConfig(num_heads=hq, num_kv_heads=hkv, head_dim=d,
                       block_size=getattr(cfg_src, "msa_block_size", 64),
                       topk=getattr(cfg_src, "msa_topk", 16),
                       softmax_scale=scaling, index_softmax_scale=scaling,
                       index_precision=getattr(cfg_src, "msa_index_precision", "input"))
    varlen = {}
    if packing is not None:
        q, k, v = q[0], k[0], v[0]
        varlen = dict(cu_seqlens_q=packing.cu_seqlens_q, cu_seqlens_k=packing.cu_seqlens_k,
                      max_seqlen_q=packing.max_q, max_seqlen_k=packing.max_k)
    if hasattr(module, "msa_index_q"):                          # trained index projections
        qi, ki = _index_qk(module, q.shape[-3], k.shape[-3], packing)
        out, aux = msa_attention(q, k, v, qi, ki, **varlen, config=config, return_aux=True,
                                 mode=getattr(cfg_src, "msa_mode", "sparse"),
                                 backend=getattr(cfg_src, "msa_backend", "auto"))
        module.msa_last_kl = aux.kl
    else:
        qi = q.reshape(*q.shape[:-2], hkv, hq // hkv, d).mean(-2)        # self-indexing
        out = msa_attention(q, k, v, qi, k, **varlen, config=config, train_indexer=False,
                            backend=getattr(cfg_src, "msa_backend", "auto"))
    return out if packing is None else out.unsqueeze(0)


def _index_qk(module, tq: int, tk: int, packing: Packing = None):
    """Index query ``[.., Tq, Hkv, D]`` and keys ``[.., Tk, Hkv, D]`` from the hidden
    states the pre-hook handed over for this call. Under ``no_grad`` (generation) the
    index keys are kept for the next call; a training forward keeps nothing."""
    h, (cos, sin) = module.msa_inputs
    module.msa_inputs = None                    # handed over once, not kept
    h = h.detach()                  # stop-gradient: the KL trains the index projections only
    b, t = h.shape[:2]
    qi = module.msa_index_q(h).view(b, t, -1, module.head_dim).transpose(1, 2)
    ki = module.msa_index_k(h).view(b, t, -1, module.head_dim).transpose(1, 2)
    rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
    qi, ki = rope(qi, ki, cos, sin)
    qi, ki = qi.transpose(1, 2), ki.transpose(1, 2)                  # [B, t, Hkv, D]
    cached = getattr(module, "msa_index_keys", None)
    if packing is not None:
        if cached is not None or tk != tq:
            raise NotImplementedError("trained index projections with a padded batch and a "
                                      "KV cache: run the padded rows one by one")
        from .padding import pack
        return pack(qi, packing.q_index), pack(ki, packing.k_index)
    if tk > tq and cached is not None and cached.shape[1] == tk - tq:
        ki = torch.cat([cached, ki], 1)
    elif tk != tq:
        raise RuntimeError(f"index-key cache holds {0 if cached is None else cached.shape[1]}"
                           f" tokens, the KV cache {tk - tq}: restart generation")
    module.msa_index_keys = None if torch.is_grad_enabled() else ki.detach()
    return qi, ki


def _store_inputs(module, args, kwargs):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    pos = kwargs.get("position_embeddings")
    if pos is None:
        pos = args[1]
    module.msa_inputs = (hidden, pos)


def add_index_projections(model):
    """Add trainable index projections to every attention layer, initialised from its Q/K
    projections so that they select what self-indexing selects; returns the model.

    ``msa_index_q`` ``[hidden -> Hkv * D]`` is the mean of each GQA group's query-projection
    rows (RoPE is linear and shared by the heads, so its output equals the mean of the
    rotated group queries); ``msa_index_k`` copies ``k_proj``. Their parameters are the
    only ones the indexer KL loss trains; freeze the rest for a KL warm-up of a pretrained
    model. ``module.msa_last_kl`` holds the layer's last KL (read it with ``indexer_kl_loss``).
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
