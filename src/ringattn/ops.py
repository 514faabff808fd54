"""MindSpore-compatible namespace: ``from mindspore import ops`` ports to ``from ringattn import ops``."""

from .api import ring_attention_update

__all__ = ["ring_attention_update"]
