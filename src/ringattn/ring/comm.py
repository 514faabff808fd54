"""RingComm: the only place ring attention talks to torch.distributed. Posting and waiting, no math.

Tests replace it with a double of the same interface (``rank``, ``world_size``, ``all_gather_ints``,
``exchange``) to count messages without processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .schedule import next_rank, prev_rank


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
    """Handles of one posted exchange; :meth:`wait` returns once both transfers have completed."""

    def __init__(self, works: list, tensors: tuple[torch.Tensor, ...]) -> None:
        self._works = works
        self._tensors = tensors  # kept alive until the transfers are done

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._tensors = [], ()


class RingComm:
    """Ring neighbours in ``group`` (the default group when None).

    Without an initialised process group (or with a group of one rank) this is a ring of one: rank 0 of
    world size 1, and nothing is ever sent.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        else:
            self.rank, self.world_size = 0, 1
        if self.world_size > 1:
            # P2POp takes global ranks; map the ring neighbours once.
            self._send_to = dist.get_global_rank(self._group(), next_rank(self.rank, self.world_size))
            self._recv_from = dist.get_global_rank(self._group(), prev_rank(self.rank, self.world_size))

    def _group(self) -> dist.ProcessGroup:
        return self.group if self.group is not None else dist.group.WORLD

    def _collective_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (same length on every rank), in rank order; one small collective."""
        if self.world_size == 1:
            return [list(values)]
        local = torch.tensor(values, dtype=torch.int64, device=self._collective_device())
        table = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(table, local, group=self.group)
        return [row.tolist() for row in table]

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

        ``send`` must not be written and ``recv`` not read until :meth:`Pending.wait` returns. ``tag``
        separates concurrent streams (key/value vs dk/dv) on transports that honour tags (gloo).
        """
        ops = []
        TRAFFIC.record(send)
        if send is not None:
            peer = self._send_to if send_to is None else self._global(send_to)
            ops.append(dist.P2POp(dist.isend, send, peer, self.group, tag))
        if recv is not None:
            peer = self._recv_from if recv_from is None else self._global(recv_from)
            ops.append(dist.P2POp(dist.irecv, recv, peer, self.group, tag))
        return Pending(dist.batch_isend_irecv(ops) if ops else [], (send, recv))

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self._group(), group_rank)
