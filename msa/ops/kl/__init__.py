from .autograd import LossWithGrads
from .naive import indexer_kl_loss, indexer_kl_reference

__all__ = ["LossWithGrads", "indexer_kl_loss", "indexer_kl_reference"]
