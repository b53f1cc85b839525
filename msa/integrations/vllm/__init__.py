"""msa inside vLLM: MiniMax-M3 ops with vLLM's own signatures (``ops``) and a vLLM
general plugin that swaps them in when ``MSA_VLLM=1`` (``plugin``). Docs: docs/vllm.md."""
from .ops import (minimax_m3_index_decode, minimax_m3_index_score, minimax_m3_index_topk,
                  minimax_m3_sparse_attn, minimax_m3_sparse_attn_decode)
from .plugin import install, register

__all__ = ["minimax_m3_sparse_attn", "minimax_m3_sparse_attn_decode", "minimax_m3_index_score",
           "minimax_m3_index_topk", "minimax_m3_index_decode", "install", "register"]
