"""RingComm: the only place ring attention talks to torch.distributed. Posting and waiting, no math.

Tests replace it with a double of the same interface (``rank``, ``world_size``, ``all_gather_ints``,
``exchange``) to count messages without processes.

Note [bounded waits]
--------------------
A rank that stops taking part in a ring (it caught an exception and moved on, or its process ended) must not
leave the others blocked for the process group's timeout (30 minutes by default on gloo, 10 on NCCL). Every wait
of a :class:`RingComm` is bounded by ``timeout`` seconds, resolved once in its constructor
(:func:`resolve_timeout`): the ``timeout=`` argument, else the environment variable ``RINGATTN_COMM_TIMEOUT``, else
600 s (well under the group's own timeout, and far above a slow first step: kernels compiling, a cold cuDNN
plan, a rank that loads its data late). A wait that runs past it, or that the transport ends with an error (a
peer's process ended: gloo reports "Connection closed by peer" at once), raises :class:`CommTimeoutError` naming
the setting, the operation (the validation gather, or which key/value or dk/dv step), this rank and the peer.

What the backends allow (torch 2.13; gloo measured here on CPU, NCCL read in ``ProcessGroupNCCL.cpp``):

* gloo: ``Work.wait(timeout)`` honours the timeout for collectives and for point-to-point transfers alike
  (measured: an ``all_gather`` one rank never joins raises ``RuntimeError('Operation timed out!')`` after 2.0 s
  with ``timeout=2 s``; an ``isend`` to that rank raises "Timed out waiting 2000ms for send operation" after
  2.0 s). The abandoned operation stays queued in the group: a later collective of the late peer pairs with it
  (measured: the peer's next ``all_reduce`` failed with "Connection closed by peer"), and a timed-out send closes
  the pair ("Application timeout caused pair closure", then every later operation on it fails at once).
  ``timedelta(0)`` means NO timeout to ``Work.wait``: waits here never pass less than a millisecond.
* NCCL: ``WorkNCCL::wait(timeout)`` with a timeout blocks the host thread, polling the work's completion event
  (sleeping ``kSynchronizeBusyWaitMillis`` between polls), and on timeout ABORTS the communicator and throws a
  ``DistBackendError``; without one it only makes the current stream wait for the NCCL stream (no host wait),
  and the group's watchdog thread enforces the group's own timeout (aborting the communicator and, with the
  default ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``, taking the process down). So on NCCL the validation gather (its
  result is read on the host anyway) waits with the timeout, while the ring's transfers keep their stream-ordered
  waits: a host-blocking, polling wait per ring step would cost up to a poll interval per step and stop the host
  from running ahead of the device. A rank that skips a ring call is caught at that call's gather within the
  timeout; a rank that stops in the middle of a ring on NCCL is caught by the watchdog, after
  ``init_process_group(timeout=...)``.

After a :class:`CommTimeoutError` the process group cannot be used again on either backend (gloo: the abandoned
operation is still queued and its pair may be closed; NCCL: the communicator is aborted): destroy it
(``torch.distributed.destroy_process_group()``) and create a new one, or end the process.

Note [launched without a process group]
---------------------------------------
Without an initialised process group a ring is a ring of one (plain attention over the local tensors). A process
that ``torchrun`` (or any launcher following torch's ``env://`` convention) started as one of several ranks has
``WORLD_SIZE`` > 1 in its environment: there a ring of one would silently attend over this rank's shard only, so
:func:`group_rank_world` raises ConfigError instead, saying to call ``torch.distributed.init_process_group``
first. A ring of one stays available where it is asked for: ``simulate_ring_attention(..., world_size=1)`` runs
one in any process (it never reads the environment), and ``WORLD_SIZE`` unset or 1 gives it as before.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CommTimeoutError, ConfigError, expected
from .schedule import next_rank, prev_rank

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "RINGATTN_COMM_TIMEOUT"
_MIN_WAIT_S = 1e-3  # Work.wait(timedelta(0)) would wait forever
_TAG_NAMES = {0: "key/value", 1: "dk/dv"}  # attention.py's _KV_TAG, _DKV_TAG


def _positive_seconds(value: float) -> bool:
    return math.isfinite(value) and value > 0


def resolve_timeout(timeout: Any = None) -> float:
    """Seconds every wait of a :class:`RingComm` may last (Note [bounded waits]).

    ``timeout`` (seconds > 0, or a ``datetime.timedelta``) when given; else the environment variable
    ``RINGATTN_COMM_TIMEOUT`` (seconds) when set and not empty; else ``DEFAULT_TIMEOUT_S`` (600). Raises
    ConfigError naming ``timeout`` or ``RINGATTN_COMM_TIMEOUT`` for anything else.
    """
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_S
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not _positive_seconds(value):
            raise ConfigError(expected(TIMEOUT_ENV, "a number of seconds > 0 (environment variable)", repr(raw)))
        return value
    if isinstance(timeout, datetime.timedelta):
        value = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        value = float(timeout)
    else:
        value = math.nan
    if not _positive_seconds(value):
        raise ConfigError(expected("timeout", "a number of seconds > 0 or a datetime.timedelta", repr(timeout)))
    return value


def timeout_source(timeout: Any = None) -> str:
    """Where :func:`resolve_timeout` took its value from, for error messages."""
    if timeout is not None:
        return "set by the timeout= argument"
    if os.environ.get(TIMEOUT_ENV, "").strip():
        return f"set by the environment variable {TIMEOUT_ENV}"
    return f"the default (set the environment variable {TIMEOUT_ENV} or timeout= to change it)"


def launched_world_size() -> int:
    """``WORLD_SIZE`` from the environment as torchrun sets it (1 when unset or not an integer)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def group_rank_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group``; ``(0, 1)`` without an initialised process group.

    Raises ConfigError when there is no process group but the environment says this process is one of several
    ranks (Note [launched without a process group]).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    launched = launched_world_size()
    if launched > 1:
        rank = os.environ.get("RANK", "?")
        raise ConfigError(
            expected(
                "group",
                "an initialised process group: this process was launched as rank "
                f"{rank} of WORLD_SIZE={launched} (torchrun), and a ring of one would attend over this rank's "
                "shard only; call torch.distributed.init_process_group(...) first (for a ring of one on purpose: "
                "ringattn.simulate_ring_attention(..., world_size=1), or unset WORLD_SIZE)",
                "no process group (torch.distributed is not initialised)",
            )
        )
    return 0, 1


class _Waiter:
    """Timed waits on torch ``Work`` handles, raising :class:`CommTimeoutError` (Note [bounded waits])."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, source: str) -> None:
        self.rank, self.world_size, self.timeout_s, self.source = rank, world_size, timeout_s, source

    def setting(self) -> str:
        return f"{self.timeout_s:g} s, {self.source}"

    def error(self, what: str, peer: str, cause: BaseException) -> CommTimeoutError:
        return CommTimeoutError(
            f"{what}: rank {self.rank} of {self.world_size} waited for {peer}, which did not take part within the "
            f"timeout ({self.setting()}) or whose transport failed ({type(cause).__name__}: {cause}). The "
            "process group cannot be used again: destroy it (torch.distributed.destroy_process_group()) and "
            "create a new one, or end the process"
        )

    def wait(self, work: Any, what: str, peer: str, *, deadline: float | None = None, timed: bool = True) -> None:
        """``work.wait`` until ``deadline`` (monotonic seconds; default: ``timeout_s`` from now)."""
        try:
            if not timed:
                work.wait()
                return
            left = (deadline if deadline is not None else time.monotonic() + self.timeout_s) - time.monotonic()
            work.wait(timeout=datetime.timedelta(seconds=max(left, _MIN_WAIT_S)))
        except RuntimeError as exc:  # gloo's RuntimeError, NCCL's DistBackendError (a RuntimeError)
            raise self.error(what, peer, exc) from exc


def bounded_wait(work: Any, what: str, *, group: Any = None, timeout: Any = None, host_reads: bool = True) -> None:
    """Wait for a collective's ``work`` (``async_op=True``) of ``group`` as :class:`RingComm` waits: bounded by
    :func:`resolve_timeout` ``(timeout)``, raising :class:`CommTimeoutError` naming ``what`` (Note [bounded
    waits]). On NCCL a result the host does not read keeps its stream-ordered wait (``host_reads=False``)."""
    rank, world = group_rank_world(group)
    seconds = resolve_timeout(timeout)
    timed = host_reads or dist.get_backend(group) != "nccl"
    peers = f"every other rank of the group (world size {world})"
    _Waiter(rank, world, seconds, timeout_source(timeout)).wait(work, what, peers, timed=timed)


class Traffic:
    """Messages and bytes this process posted for sending, by every ring comm (real and virtual): what a bench
    reports as sent, counted where it is sent (``ringattn bench ring``). :meth:`reset` before a measured call."""

    def __init__(self) -> None:
        self.messages = self.bytes = 0

    def record(self, send: torch.Tensor | None) -> None:
        if send is not None:
            self.messages += 1
            self.bytes += send.numel() * send.element_size()

    def reset(self) -> None:
        self.messages = self.bytes = 0


TRAFFIC = Traffic()


class Pending:
    """Handles of one posted exchange; :meth:`wait` returns once both transfers have completed.

    ``peers`` names the peer of each handle for :class:`CommTimeoutError` (Note [bounded waits]).
    """

    def __init__(
        self,
        works: list,
        tensors: tuple[torch.Tensor, ...],
        *,
        waiter: _Waiter | None = None,
        what: str = "",
        peers: tuple[str, ...] = (),
        timed: bool = True,
    ) -> None:
        self._works = works
        self._tensors = tensors  # kept alive until the transfers are done
        self._waiter, self._what, self._peers, self._timed = waiter, what, peers, timed

    def wait(self) -> None:
        works, self._works = self._works, []
        if self._waiter is None:
            for work in works:
                work.wait()
        else:
            deadline = time.monotonic() + self._waiter.timeout_s  # one bound for the whole exchange
            for i, work in enumerate(works):
                peer = self._peers[i] if i < len(self._peers) else " and ".join(self._peers)
                self._waiter.wait(work, self._what, peer, deadline=deadline, timed=self._timed)
        self._tensors = ()


class RingComm:
    """Ring neighbours in ``group`` (the default group when None), every wait bounded by ``timeout``.

    Without an initialised process group (or with a group of one rank) this is a ring of one: rank 0 of
    world size 1, and nothing is ever sent; but a process launched as one of several ranks (``WORLD_SIZE`` > 1)
    with no process group raises ConfigError (Note [launched without a process group]).

    ``timeout``: seconds (or a ``datetime.timedelta``) any wait for a peer may last before
    :class:`~ringattn.errors.CommTimeoutError`; None: ``RINGATTN_COMM_TIMEOUT``, else 600 s (Note [bounded waits]).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout: Any = None) -> None:
        self.group = group
        self.timeout_s = resolve_timeout(timeout)
        self.rank, self.world_size = group_rank_world(group)
        self._waiter = _Waiter(self.rank, self.world_size, self.timeout_s, timeout_source(timeout))
        self._sent: dict[int, int] = {}  # exchanges posted per tag, to name the step in errors
        self._globals: dict[int, int] = {}  # group rank -> global rank, for P2POp
        if self.world_size > 1:
            self._next, self._prev = next_rank(self.rank, self.world_size), prev_rank(self.rank, self.world_size)
            # Note [bounded waits]: NCCL transfers keep stream-ordered waits (the watchdog bounds them).
            self._timed_transfers = dist.get_backend(self.group) != "nccl"

    def _group(self) -> dist.ProcessGroup:
        return self.group if self.group is not None else dist.group.WORLD

    def _collective_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (same length on every rank), in rank order; one small collective, its wait
        bounded by the timeout."""
        if self.world_size == 1:
            return [list(values)]
        local = torch.tensor(values, dtype=torch.int64, device=self._collective_device())
        table = [torch.empty_like(local) for _ in range(self.world_size)]
        what = "ring attention's validation gather (one all_gather of every rank's inputs, before any transfer)"
        peers = f"every other rank of the group (world size {self.world_size})"
        try:
            work = dist.all_gather(table, local, group=self.group, async_op=True)
        except RuntimeError as exc:
            raise self._waiter.error(what, peers, exc) from exc
        self._waiter.wait(work, what, peers)
        return [row.tolist() for row in table]

    def _step_name(self, tag: int, direct: bool) -> str:
        """The ring step of the ``n``-th exchange of ``tag`` (forward's key/value steps, then the backward's)."""
        n = self._sent[tag] = self._sent.get(tag, 0) + 1
        name = _TAG_NAMES.get(tag, f"tag {tag}")
        if direct:  # a windowed ring's direct transfers (Note [windows] in schedule.py): steps are skipped
            return f"ring attention's {name} exchange {n} (direct transfers of a windowed ring)"
        hops = self.world_size - 1
        if tag == 0:
            phase, step = ("forward", n) if n <= hops else ("backward", n - hops)
            return f"ring attention's key/value step {step} of {hops} ({phase})"
        return f"ring attention's {name} step {n} of {self.world_size} (backward)"

    def exchange(
        self,
        send: torch.Tensor | None,
        recv: torch.Tensor | None,
        *,
        tag: int = 0,
        send_to: int | None = None,
        recv_from: int | None = None,
    ) -> Pending:
        """Post ``send`` to rank ``send_to`` and a receive into ``recv`` from rank ``recv_from`` (ranks of the
        group; default: the ring neighbours, next and previous); no waiting. ``send`` or ``recv`` None: that half is
        not posted (a step of a windowed ring that one side does not need, Note [windows] in ``schedule.py``).

        ``send`` must not be written and ``recv`` not read until :meth:`Pending.wait` returns (every wait bounded,
        Note [bounded waits]). ``tag`` separates concurrent streams (key/value vs dk/dv) on transports that honour
        tags (gloo).
        """
        what = self._step_name(tag, send_to is not None or recv_from is not None)
        TRAFFIC.record(send)
        ops, peers = [], []
        if send is not None:
            to = self._next if send_to is None else send_to
            ops.append(dist.P2POp(dist.isend, send, self._global(to), self.group, tag))
            peers.append(f"rank {to} (sending to it)")
        if recv is not None:
            source = self._prev if recv_from is None else recv_from
            ops.append(dist.P2POp(dist.irecv, recv, self._global(source), self.group, tag))
            peers.append(f"rank {source} (receiving from it)")
        if not ops:
            return Pending([], ())
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as exc:
            raise self._waiter.error(what, " and ".join(peers), exc) from exc
        if len(works) == 2:
            works, peers = works[::-1], peers[::-1]  # wait for the receive first: its peer is the one this rank needs
        return Pending(works, (send, recv), waiter=self._waiter, what=what, peers=tuple(peers),
                       timed=self._timed_transfers)  # fmt: skip

    def _global(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` (P2POp takes global ranks), looked up once per peer."""
        if group_rank not in self._globals:
            self._globals[group_rank] = dist.get_global_rank(self._group(), group_rank)
        return self._globals[group_rank]
