"""Ring attention over torch.distributed (gloo on CPU, NCCL on GPU, torchrun across machines).

Public: :func:`ring_attention`, :func:`ring_attention_varlen` (packed documents), :func:`simulate_ring_attention`
(every rank in one process), the sequence
sharding helpers, and :class:`RingConfig` for tests. Design: Note [ring schedule] in ``schedule.py``, Note
[block kernels] in ``blocks.py``, Note [virtual ring] in ``virtual.py``.
"""

from .attention import RingConfig, ring_attention
from .sharding import (
    PackedShard,
    gather_packed,
    gather_sequence,
    packed_shard_info,
    shard_packed,
    shard_sequence,
    unshard_packed,
    unshard_sequence,
)
from .varlen import ring_attention_varlen
from .virtual import simulate_ring_attention

__all__ = [
    "ring_attention",
    "ring_attention_varlen",
    "simulate_ring_attention",
    "shard_sequence",
    "unshard_sequence",
    "gather_sequence",
    "shard_packed",
    "unshard_packed",
    "gather_packed",
    "packed_shard_info",
    "PackedShard",
    "RingConfig",
]
