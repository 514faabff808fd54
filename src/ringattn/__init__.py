"""ringattn: merging partial attention results, and ring attention built on the merge.

What to call for what (``help(ringattn.<name>)`` gives each one's full contract; the README has examples):

Merging partial results
  ring_attention_update    MindSpore's ops.ring_attention_update: merge two Ascend-style partials (out, max, sum)
  ops                      the MindSpore-compatible namespace: ``from ringattn import ops``
  merge_states             merge K partial outputs by their log-sum-exps (flash-attn, FlashInfer, SDPA, vLLM, ...)
  stats_to_lse             Ascend (softmax_max, softmax_sum) statistics -> log-sum-exp
  lse_to_stats             log-sum-exp -> Ascend statistics

Producing partial results
  block_attention          attention of a query block over one key/value block, with its LSE or Ascend statistics

Ring attention (context parallelism over torch.distributed)
  ring_attention           exact attention of this rank's sequence shard over every rank's keys/values
  ring_attention_varlen    the same for packed documents (T, N, D) described by cu_seqlens
  simulate_ring_attention  every rank of a ring in this process, on full-sequence tensors (debugging, tests)
  shard_sequence           the part of a full sequence a rank holds (zigzag by default)
  unshard_sequence         every rank's shard, in one process -> the full sequence
  gather_sequence          all_gather of the shards -> the full sequence, on every rank (not differentiable)
  shard_packed             a rank's shard of a packed batch (every document cut in 2W chunks)
  unshard_packed           every rank's packed shard, in one process -> the packed batch
  gather_packed            all_gather of the packed shards -> the packed batch, on every rank
  packed_shard_info        a packed shard's cu_seqlens and global position ids, as a PackedShard
  PackedShard              what packed_shard_info returns

Hugging Face transformers: ``ringattn.integrations.transformers`` (apply_ring_attention, shard_inputs).
Commands: ``ringattn demo`` (checked examples) and ``ringattn bench`` / ``ringattn bench ring`` (also
``python -m ringattn``).

Errors (``ringattn.errors``): each is a RingAttnError and the builtin type MindSpore raises (ValueError, TypeError,
and RuntimeError where Ascend raises that); messages read ``"<argument>: expected <want>, got <got>"``.
  RingAttnError            base class of every error ringattn raises for bad input
  LayoutError              a layout string that is not supported
  ShapeError               shapes that disagree with each other or with the layout
  DTypeError               a dtype outside the supported table, or dtypes that must agree and do not
  DeviceError              inputs on different devices, or a backend that cannot run on theirs
  SeqLenError              actual_seq_qlen missing, or not rising from 0 to T
  HardwareLimitError       an Ascend hardware limit exceeded (ascend_limits=False lifts it)
  BackendError             an unknown backend, or one not available here
  AliasError               an out= destination that overlaps an input or output, or cannot be written
  ConfigError              options that must agree (across the ranks of a ring, say) and do not
  AutogradError            out= with inputs that require grad, or a double backward through the ring
  CommTimeoutError         another rank of a ring stopped taking part (every wait is bounded: timeout=)
"""

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
