from .naive import (SparseAttentionFn, attention_backward_reference,
                    attention_forward_reference)

__all__ = ["SparseAttentionFn", "attention_forward_reference", "attention_backward_reference"]
