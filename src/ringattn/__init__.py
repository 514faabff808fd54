"""ringattn: merging partial attention results, and ring attention built on the merge."""

from . import ops
from .api import ring_attention_update
from .errors import (
    AliasError,
    BackendError,
    DeviceError,
    DTypeError,
    HardwareLimitError,
    LayoutError,
    RingAttnError,
    SeqLenError,
    ShapeError,
)

__version__ = "0.1.0"

__all__ = [
    "ring_attention_update",
    "ops",
    "RingAttnError",
    "LayoutError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "SeqLenError",
    "HardwareLimitError",
    "BackendError",
    "AliasError",
]
