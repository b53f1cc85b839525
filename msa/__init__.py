"""msa: MiniMax Sparse Attention for PyTorch.

Public API (shapes in each docstring; the contract: docs/semantics.md):

- ``MSAConfig``: block size, top-k, heads, scales (MiniMax-M3 preset by default);
- ``msa_indexer``: block top-k selection (+ selected LSE);
- ``msa_sparse_attention``: exact attention over the selected blocks (autograd);
- ``msa_indexer_kl``: the indexer's KL training loss (sparse or dense warm-up);
- ``msa_attention``: selection + attention + indexer training in one call;
- ``attention_kernel``, ``indexer_kl_kernel``: which attention / indexer-KL kernel runs
  for given inputs.

The names load on first use, so ``import msa`` (and ``python -m msa --help``) imports
neither torch nor triton; importing ``msa`` never initialises CUDA.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "MSAConfig": ".config", "MINIMAX_M3": ".config", "MSAAux": ".functional",
    "msa_attention": ".functional", "msa_indexer": ".functional",
    "msa_indexer_kl": ".functional", "msa_sparse_attention": ".functional",
    "cu_seqlens_from_lengths": ".varlen", "attention_kernel": ".functional",
    "indexer_kl_kernel": ".functional",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'msa' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
