from .naive import indexer_reference, select_blocks

__all__ = ["indexer_reference", "select_blocks"]
