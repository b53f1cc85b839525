from .naive import IndexerKLFn, indexer_kl_reference

__all__ = ["IndexerKLFn", "indexer_kl_reference"]
