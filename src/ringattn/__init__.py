"""ringattn: merging partial attention results, and ring attention built on the merge."""

from . import ops
from .api import ring_attention_update
from .block import block_attention
from .errors import (
    AliasError,
    AutogradError,
    BackendError,
    CommTimeoutError,
    ConfigError,
    DeviceError,
    DTypeError,
    HardwareLimitError,
    LayoutError,
    RingAttnError,
    SeqLenError,
    ShapeError,
)
from .merge import lse_to_stats, merge_states, stats_to_lse
from .ring import (
    PackedShard,
    gather_packed,
    gather_sequence,
    packed_shard_info,
    ring_attention,
    ring_attention_varlen,
    shard_packed,
    shard_sequence,
    simulate_ring_attention,
    unshard_packed,
    unshard_sequence,
)

__version__ = "0.1.0"

__all__ = [
    "ring_attention_update",
    "ops",
    "merge_states",
    "stats_to_lse",
    "lse_to_stats",
    "block_attention",
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
    "RingAttnError",
    "LayoutError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "SeqLenError",
    "HardwareLimitError",
    "BackendError",
    "AliasError",
    "ConfigError",
    "AutogradError",
    "CommTimeoutError",
]
