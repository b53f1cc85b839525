from .naive import attention_backward_reference, attention_forward_reference

__all__ = ["attention_forward_reference", "attention_backward_reference"]
