"""Ring attention over torch.distributed (gloo on CPU, NCCL on GPU, torchrun across machines).

Public: :func:`ring_attention`, :func:`simulate_ring_attention` (every rank in one process), the sequence
sharding helpers, and :class:`RingConfig` for tests. Design: Note [ring schedule] in ``schedule.py``, Note
[block kernels] in ``blocks.py``, Note [virtual ring] in ``virtual.py``.
"""

from .attention import RingConfig, ring_attention
from .sharding import gather_sequence, shard_sequence, unshard_sequence
from .virtual import simulate_ring_attention

__all__ = [
    "ring_attention",
    "simulate_ring_attention",
    "shard_sequence",
    "unshard_sequence",
    "gather_sequence",
    "RingConfig",
]
