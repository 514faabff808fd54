"""RingComm's bounded waits and its process-group checks (Note [bounded waits], Note [launched without a process
group] in ``ring/comm.py``).

Spawned gloo ranks (W = 2 and 3) with ``RINGATTN_COMM_TIMEOUT=3``: after one healthy ring call (checked against
float64 attention), one rank stops taking part (it catches an exception and skips the next call, or skips the
backward, or its process ends) and every other rank must raise CommTimeoutError naming the setting, the operation,
itself and the peer within a few seconds, not the group's 30 s (``ring_spawn.PG_TIMEOUT_S``) or 30 minutes.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ring_spawn import PG_TIMEOUT_S, reference, run_ranks

import ringattn
from ringattn.errors import CommTimeoutError, ConfigError
from ringattn.ring import ring_attention, shard_sequence, simulate_ring_attention
from ringattn.ring.comm import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    Pending,
    RingComm,
    _Waiter,
    group_rank_world,
    resolve_timeout,
)
from ringattn.ring.virtual import run_virtual_ranks

TIMEOUT_S = 3.0
SRC = str(Path(__file__).resolve().parents[2] / "src")


# --- the setting ---------------------------------------------------------------------------------------------------


def test_timeout_resolution_argument_then_environment_then_default(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert resolve_timeout() == DEFAULT_TIMEOUT_S == 600.0
    monkeypatch.setenv(TIMEOUT_ENV, " ")
    assert resolve_timeout() == DEFAULT_TIMEOUT_S  # set but empty: the default
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert resolve_timeout() == 2.5
    assert resolve_timeout(7) == 7.0  # the argument wins
    assert resolve_timeout(datetime.timedelta(minutes=2)) == 120.0
    assert RingComm(timeout=4).timeout_s == 4.0  # no process group: a ring of one, the timeout still resolved
    assert RingComm().timeout_s == 2.5


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "3", True, datetime.timedelta(0)])
def test_bad_timeout_argument_raises_naming_it(bad):
    with pytest.raises(ConfigError, match=r"^timeout: expected a number of seconds > 0"):
        resolve_timeout(bad)
    with pytest.raises(ConfigError, match=r"^timeout: expected"):
        RingComm(timeout=bad)


@pytest.mark.parametrize("bad", ["abc", "0", "-2", "inf", "nan"])
def test_bad_timeout_environment_variable_raises_naming_it(monkeypatch, bad):
    monkeypatch.setenv(TIMEOUT_ENV, bad)
    with pytest.raises(ConfigError, match=rf"^{TIMEOUT_ENV}: expected a number of seconds > 0 .*{bad!r}"):
        RingComm()


class _Work:
    """A torch Work double: records how it was waited for, then raises ``error`` (or returns)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error, self.timeouts = error, []

    def wait(self, timeout=None):
        self.timeouts.append(timeout)
        if self.error is not None:
            raise self.error
        return True


def test_pending_wait_raises_comm_timeout_error_naming_setting_operation_rank_and_peer(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    waiter = _Waiter(1, 3, 3.0, "set by the timeout= argument")
    ok, stuck = _Work(), _Work(RuntimeError("Timed out waiting 3000ms for recv operation to complete"))
    pending = Pending(
        [ok, stuck], (), waiter=waiter, what="ring attention's key/value step 2 of 2 (forward)",
        peers=("rank 2 (sending to it)", "rank 0 (receiving from it)"),
    )  # fmt: skip
    with pytest.raises(CommTimeoutError) as info:
        pending.wait()
    message = str(info.value)
    for part in ("key/value step 2 of 2 (forward)", "rank 1 of 3", "rank 0 (receiving from it)", "3 s", "timeout="):
        assert part in message, message
    assert "Timed out waiting 3000ms" in message and isinstance(info.value.__cause__, RuntimeError)
    assert isinstance(info.value, RuntimeError)  # code catching torch's RuntimeError keeps working
    # one deadline for the exchange: each wait gets what is left of it, never less than a millisecond (gloo reads
    # timedelta(0) as no timeout at all)
    assert all(isinstance(t, datetime.timedelta) for t in ok.timeouts + stuck.timeouts)
    assert datetime.timedelta(milliseconds=1) <= stuck.timeouts[0] <= ok.timeouts[0] <= datetime.timedelta(seconds=3)
    late = _Work()
    waiter.wait(late, "x", "y", deadline=time.monotonic() - 10)
    assert late.timeouts == [datetime.timedelta(milliseconds=1)]
    untimed = _Work()
    Pending([untimed], (), waiter=waiter, what="w", peers=("p",), timed=False).wait()  # NCCL transfers
    assert untimed.timeouts == [None]


@pytest.mark.timeout(60)  # before the fix, the last waiting rank hung: it passed the baton to itself and slept
def test_virtual_ring_reports_a_rank_that_stops_taking_part_as_comm_timeout_error():
    """The virtual ring detects at once what real ranks detect after the timeout: rank 1 ends without sending."""

    def rank_fn(comm):
        if comm.rank == 0:
            comm.exchange(torch.zeros(2), torch.empty(2)).wait()

    with pytest.raises(CommTimeoutError, match=r"virtual ring: rank 0 of 2 waits .* ranks \[0\] all wait, ranks \[1\]"):
        run_virtual_ranks(2, rank_fn)


# --- a peer that stops taking part, on spawned gloo ranks ----------------------------------------------------------


def _ring(q, k, v):
    """The ring call of the spawned tests: the torch merge backend, no kernel to compile first."""
    return ring_attention(q, k, v, causal=True, layout="BSND", backend="torch")


def _until_all_raised(world: int, flags: str) -> None:
    """Stay alive (a closed connection is the "exit" scenario) until every rank but the quitter has raised."""
    end = time.monotonic() + 60
    while len(list(Path(flags).iterdir())) < world - 1 and time.monotonic() < end:
        time.sleep(0.05)


def _stalled_peer(rank: int, world: int, scenario: str, flags: str) -> None:
    os.environ[TIMEOUT_ENV] = str(TIMEOUT_S)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(5)
    full = [torch.randn(1, 4 * world, 2, 8, generator=gen, dtype=torch.float64) for _ in range(4)]
    q, k, v, g = (shard_sequence(x, rank, world) for x in full)
    want = shard_sequence(reference(*full[:3], full[3], causal=True, scale=8**-0.5)[0], rank, world)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = _ring(*leaves)  # a healthy call first: the group works
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    out.backward(g)
    quitter = world - 1
    if rank == quitter:
        try:
            raise ValueError("a bad batch on this rank only")
        except ValueError:
            pass  # ... caught, and the rank moves on without the ring call
        if scenario == "exit":
            os._exit(0)
        if scenario == "skip_backward":
            _ring(*leaves)  # the forward, then no backward
        _until_all_raised(world, flags)
        os._exit(0)
    start = time.monotonic()
    try:
        with pytest.raises(CommTimeoutError) as info:
            out = _ring(*leaves)
            if scenario == "skip_backward":
                out.backward(g)
        elapsed = time.monotonic() - start
    finally:
        (Path(flags) / str(rank)).touch()
    message = str(info.value)
    assert f"rank {rank} of {world}" in message and f"{TIMEOUT_S:g} s, set by the environment variable" in message
    assert TIMEOUT_ENV in message and "destroy_process_group" in message, message
    assert elapsed < TIMEOUT_S + 4 < PG_TIMEOUT_S, f"{scenario}: raised after {elapsed:.1f} s"
    if scenario == "skip":
        assert "validation gather" in message and "every other rank" in message, message
        assert elapsed > TIMEOUT_S * 0.9, elapsed  # the configured bound, not an earlier failure
    if scenario == "skip_backward":
        assert "(backward)" in message, message
        peers = {f"rank {(rank + 1) % world} (sending", f"rank {(rank - 1) % world} (receiving"}
        assert any(p in message for p in peers), message
        assert elapsed > TIMEOUT_S * 0.9, elapsed
    _until_all_raised(world, flags)  # no rank closes its connections before every other rank's own timeout
    os._exit(0)  # the group cannot be used again (Note [bounded waits]): no destroy_process_group


@pytest.mark.distributed
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("world_size", "scenario"),
    [(2, "skip"), (3, "skip"), (2, "skip_backward"), (2, "exit")]
    + [pytest.param(3, scenario, marks=pytest.mark.slow) for scenario in ("skip_backward", "exit")],
)
def test_every_other_rank_raises_within_the_timeout_when_a_peer_stops(world_size, scenario, tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    start = time.monotonic()
    run_ranks(_stalled_peer, world_size, tmp_path, deadline_s=60, scenario=scenario, flags=str(flags))
    assert len(list(flags.iterdir())) == world_size - 1  # every other rank got as far as raising
    assert time.monotonic() - start < 60


# --- launched as one of several ranks, without a process group -----------------------------------------------------


def test_torchrun_environment_without_process_group_raises(tmp_path):
    """A process with torchrun's WORLD_SIZE=2 RANK=0 that never called init_process_group: ConfigError (it would
    otherwise attend over its own shard only), naming the fix and the ring of one on purpose."""
    script = textwrap.dedent(
        """
        import torch, ringattn
        q = torch.randn(1, 8, 2, 4)
        try:
            ringattn.ring_attention(q, q, q, layout="BSND")
        except ringattn.ConfigError as e:
            print("RAISED", e)
        else:
            print("NO ERROR")
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("RAISED group: expected an initialised process group"), out
    for part in ("rank 0 of WORLD_SIZE=2", "torch.distributed.init_process_group", "world_size=1", "WORLD_SIZE"):
        assert part in out, out


def test_group_checks_read_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match=r"^group: expected .*rank 3 of WORLD_SIZE=4"):
        group_rank_world(None)
    with pytest.raises(ConfigError, match="init_process_group"):
        RingComm()
    for value in ("1", "0", "not a number"):
        monkeypatch.setenv("WORLD_SIZE", value)
        assert group_rank_world(None) == (0, 1)
    monkeypatch.delenv("WORLD_SIZE")
    assert group_rank_world(None) == (0, 1)


@pytest.mark.parametrize("world_size_env", [None, "1", "2"])
def test_a_ring_of_one_where_asked_for(monkeypatch, world_size_env):
    """WORLD_SIZE unset or 1: ring_attention is a ring of one; under WORLD_SIZE=2 simulate_ring_attention(...,
    world_size=1) still is (the escape the error names). Both against float64 attention."""
    if world_size_env is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size_env)
    gen = torch.Generator().manual_seed(9)
    q, k, v, g = (torch.randn(1, 8, 2, 4, generator=gen) for _ in range(4))
    want = reference(q, k, v, g, causal=True, scale=0.5)[0]
    got = [simulate_ring_attention(q, k, v, world_size=1, causal=True, layout="BSND")]
    if world_size_env != "2":
        got.append(ringattn.ring_attention(q, k, v, causal=True, layout="BSND"))
    else:
        with pytest.raises(ConfigError, match="init_process_group"):
            ringattn.ring_attention(q, k, v, causal=True, layout="BSND")
    for out in got:
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_bounded_wait_of_a_collective_raises_naming_it():
    """The integration's collectives (gradient sum, batch check) wait through bounded_wait: the same error."""
    from ringattn.ring.comm import bounded_wait

    with pytest.raises(CommTimeoutError, match=r"^the batch check: rank 0 of 1 waited .*2 s, set by the timeout="):
        bounded_wait(_Work(RuntimeError("Operation timed out!")), "the batch check", timeout=2)
    done = _Work()
    bounded_wait(done, "x", timeout=2)
    assert 1.9 < done.timeouts[0].total_seconds() <= 2
