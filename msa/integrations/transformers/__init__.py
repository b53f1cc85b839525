"""Hugging Face transformers integration: ``attn_implementation="msa"``.

MiniMax-M3 (``transformers.models.minimax_m3_vl``) runs its own index branch and
selection rule on msa's kernels; Llama-family models get training-free self-indexing or
trainable index projections::

    from msa.integrations.transformers import enable_msa
    model = enable_msa(model)                  # registers "msa" and switches to it
    model.generate(...)

Queries attend as the causal suffix of the cached keys, so prefill, chunked prefill
(``generate(..., prefill_chunk_size=...)``) and ``generate()`` with a cache work; padded
batches are packed into varlen sequences (``padding.py``). ``GraphedDecoder`` decodes
with the whole step in one CUDA graph (``graphs.py``); ``fp8_static_cache`` holds a
MiniMax-M3 model's sparse layers in e4m3 (``fp8_cache.py``), ``fp8_dynamic_cache`` a
Llama-family model's K/V (``fp8_dynamic.py``). transformers 5.24 renamed the forward's
cache argument ``past_key_values`` to ``cache``; ``compat.cache_kwarg`` reads which one a
model takes. Docs: docs/minimax_m3.md, docs/integration.md.
"""
from __future__ import annotations

import types
from typing import Optional

from ...config import check_block_size, check_index_precision, check_topk
from .attention import NAME, msa_attention_forward, register
from .graphs import GraphedDecoder
from .llama import add_index_projections, attention_modules
from .minimax_m3 import IndexInputs, check_supported, indexer_forward, is_minimax_m3, text_config

__all__ = ["enable_msa", "register", "msa_attention_forward", "add_index_projections",
           "attention_modules", "indexer_kl_loss", "IndexInputs", "NAME", "GraphedDecoder",
           "fp8_static_cache", "fp8_dynamic_cache"]


def fp8_static_cache(model, max_cache_len: int, index_dtype=None):
    """A static cache for a MiniMax-M3 model on msa whose sparse layers store K/V (and,
    with ``index_dtype=torch.float8_e4m3fn``, the index keys) in e4m3 with per-row scales;
    see ``msa.integrations.transformers.fp8_cache``."""
    from .fp8_cache import fp8_static_cache as build
    return build(model, max_cache_len, index_dtype)


def fp8_dynamic_cache(model):
    """A dynamic cache for a Llama-family model that stores K/V in e4m3 with per-row
    scales and attends over them dequantized; see
    ``msa.integrations.transformers.fp8_dynamic``."""
    from .fp8_dynamic import fp8_dynamic_cache as build
    return build(model)


def enable_msa(model, *, block_size: Optional[int] = None, topk: Optional[int] = None,
               train_indexer: bool = False, mode: str = "sparse", backend: str = "auto",
               index_precision: str = "input"):
    """Switch a loaded model to MSA attention; returns the model.

    MiniMax-M3 models keep their own indexer weights, block size and top-k (so
    ``block_size`` / ``topk`` must be left out); ``train_indexer=True`` makes the index
    branch learn from the main attention through the KL loss (teacher detached, index
    projections behind a stop-gradient; read the value with ``indexer_kl_loss``), and
    ``mode="dense"`` is its dense warm-up. Llama-family models use self-indexing (or
    ``add_index_projections``) with ``block_size`` (default 64) and ``topk`` (default 16).
    ``backend`` as in ``msa.msa_attention`` (``"auto"``: Triton kernels on CUDA).
    ``index_precision="fp8"``: prefill, chunked prefill and training score blocks in FP8
    with exact re-scoring of the candidates (docs/fp8_index.md); the fused decode step
    scores in the inputs' precision.
    """
    if not hasattr(getattr(model, "config", None), "to_dict"):
        raise TypeError(f"model must be a transformers PreTrainedModel (with a config), got "
                        f"{type(model).__name__}")
    if mode not in ("sparse", "dense"):
        raise ValueError(f"mode must be 'sparse' or 'dense', got {mode!r}")
    if not isinstance(train_indexer, bool):
        raise TypeError(f"train_indexer must be a bool, got {train_indexer!r}")
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    check_index_precision(index_precision)
    register()
    model.config.msa_backend = backend
    model.config.msa_index_precision = index_precision
    if is_minimax_m3(model):
        cfg = text_config(model)
        if block_size is not None or topk is not None:
            raise ValueError(f"MiniMax-M3 brings its own block size and top-k "
                             f"(index_block_size={cfg.index_block_size}, index_topk_blocks="
                             f"{cfg.index_topk_blocks}); leave block_size and topk out")
        check_supported(cfg)
        for m in model.modules():
            if type(m).__name__ == "MiniMaxM3VLIndexer":
                m.forward = types.MethodType(indexer_forward, m)
        cfg.msa_train_indexer, cfg.msa_mode, cfg.msa_backend = train_indexer, mode, backend
        cfg.msa_index_precision = index_precision
        if getattr(model.config, "vision_config", None) is not None:
            model.set_attn_implementation({"text_config": NAME})
        else:
            model.set_attn_implementation(NAME)
        return model
    block_size = 64 if block_size is None else block_size
    topk = 16 if topk is None else topk
    check_block_size(block_size)
    check_topk(topk)
    if train_indexer:
        raise ValueError("train_indexer is for MiniMax-M3 models; give a Llama-family model "
                         "trainable index projections with add_index_projections(model)")
    model.config.msa_block_size = block_size
    model.config.msa_topk = topk
    model.config.msa_mode = mode
    model.set_attn_implementation(NAME)
    return model


def indexer_kl_loss(model):
    """Sum over the layers of the indexer KL of the last forward (detached; ``None`` if
    no layer computed one). Its gradient already reached the index projections with the
    output's backward: add it to a logged loss, not to the one you back-propagate."""
    from ...ops.kl.deferred import kl_value
    values = [kl_value(m.msa_last_kl) for m in model.modules()
              if getattr(m, "msa_last_kl", None) is not None]
    return sum(values) if values else None
