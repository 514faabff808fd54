"""Ring attention over torch.distributed (gloo on CPU, NCCL on GPU, torchrun across machines).

Public: :func:`ring_attention`, the sequence sharding helpers, and :class:`RingConfig` for tests.
Design: Note [ring schedule] in ``schedule.py``.
"""

from .attention import RingConfig, ring_attention
from .sharding import gather_sequence, shard_sequence, unshard_sequence

__all__ = ["ring_attention", "shard_sequence", "unshard_sequence", "gather_sequence", "RingConfig"]
