"""msa: MiniMax Sparse Attention for PyTorch.

Public API (shapes in each docstring):

- ``MSAConfig``: block size, top-k, heads, scales (MiniMax-M3 preset by default);
- ``msa_indexer``: block top-k selection (+ selected LSE);
- ``msa_sparse_attention``: exact attention over the selected blocks (autograd);
- ``msa_indexer_kl``: the indexer's KL training loss (sparse or dense warm-up);
- ``msa_attention``: selection + attention + indexer training in one call.

Importing ``msa`` never initialises CUDA.
"""
from .config import MINIMAX_M3, MSAConfig
from .functional import (MSAAux, msa_attention, msa_indexer, msa_indexer_kl,
                         msa_sparse_attention)
from .varlen import cu_seqlens_from_lengths

__version__ = "0.1.0"

__all__ = ["MSAConfig", "MINIMAX_M3", "MSAAux", "msa_attention", "msa_indexer",
           "msa_indexer_kl", "msa_sparse_attention", "cu_seqlens_from_lengths"]
