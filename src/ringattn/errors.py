"""Exception classes of ringattn and the one message formatter.

Every class inherits the builtin type MindSpore raises for the condition *and* RuntimeError where the
Ascend kernel (or the MindSpore page) promises RuntimeError, so ``except ValueError`` written against
MindSpore and ``except RuntimeError`` written against torch_npu both keep working. The classes add no attributes
or methods of their own (``help`` on one shows only what it inherits from Exception); ``ringattn``'s module
docstring lists them with a line each.
"""

from __future__ import annotations

from typing import Any

__all__ = [
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
    "expected",
]


class RingAttnError(Exception):
    """Base class of every error ringattn raises for bad input."""


class LayoutError(RingAttnError, ValueError):
    """A layout string is not one of the supported layouts."""


class ShapeError(RingAttnError, ValueError, RuntimeError):
    """Ranks or sizes of the inputs disagree with each other or with the layout."""


class DTypeError(RingAttnError, TypeError, RuntimeError):
    """A dtype is outside the supported table, or two inputs that must agree do not."""


class DeviceError(RingAttnError, ValueError, RuntimeError):
    """Inputs live on different devices, or a backend cannot run on their device."""


class SeqLenError(RingAttnError, ValueError, RuntimeError):
    """``actual_seq_qlen`` is missing or is not a non-decreasing sequence from 0 to T."""


class HardwareLimitError(RingAttnError, ValueError, RuntimeError):
    """An Ascend hardware limit is exceeded (lift it with ``ascend_limits=False``)."""


class BackendError(RingAttnError, ValueError):
    """An unknown backend name, or a backend that is not available here."""


class AliasError(RingAttnError, ValueError):
    """An ``out=`` destination cannot be written as given: it overlaps an input, another output or itself
    (expanded strides) in a way other than being exactly the same view as an input, or it is a read-only or
    negatively strided NumPy array."""


class ConfigError(RingAttnError, ValueError, RuntimeError):
    """Options that must agree (across the ranks of a ring, say) disagree."""


class AutogradError(RingAttnError, RuntimeError):
    """A gradient ringattn does not compute: ``out=`` combined with inputs that require grad (the out= variants are
    not differentiable), or a double backward (``create_graph=True``) through ring attention."""


def refuse_double_backward(what: str) -> None:
    """Raise AutogradError when called from a backward that records a graph (``create_graph=True``).

    Called first in the backward of every differentiable function whose backward is not itself differentiable: a
    graph recorded through it would silently miss its second-order terms (or fail deep inside PyTorch).
    """
    import torch  # errors.py is imported by everything; torch is loaded by then

    if torch.is_grad_enabled():
        raise AutogradError(
            f"create_graph: expected False, got True: {what} has first-order gradients only (a double backward, "
            "e.g. a gradient penalty, would miss its second-order terms); compute the penalty with "
            "ringattn.block_attention or SDPA, or backward without create_graph"
        )


class CommTimeoutError(RingAttnError, RuntimeError):
    """A peer of the ring stopped taking part: a wait ran past ``timeout=`` (else ``RINGATTN_COMM_TIMEOUT``, else
    600 s) or its transport failed; the process group cannot be used again (Note [bounded waits] in ``ring/comm.py``).
    The virtual ring raises it at once for a schedule in which every rank waits."""


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {value.dtype}"
    return repr(value)


def expected(argument: str, want: str, got: Any) -> str:
    """The one message format: ``"<argument>: expected <want>, got <got>"``.

    ``got`` may be any value; arrays and tensors are described by shape and dtype, never printed.
    """
    text = got if isinstance(got, str) else _describe(got)
    return f"{argument}: expected {want}, got {text}"
