"""``ringattn bench ring``: ring attention forward+backward on W local gloo ranks vs one process.

Providers: ``single`` (PyTorch SDPA in one process with W threads, at most one per usable CPU core), ``ringattn``
(zigzag ring, one thread per rank), ``ring-attention-pytorch`` (its ``ring_flash_attn`` with striped sharding;
installed by the ``peers`` extra, see :data:`PEER_INSTALL`: left out of the default providers, with a note, when it
is not installed, and an argument error when asked for by name). Every ring provider's gathered output and
gradients are compared once with ``single`` (max abs difference) before timing; times are medians of ``--repeats``
barrier-aligned runs after a warm-up. ``x single`` is single's time over the provider's (higher = faster, as
``x naive`` in ``ringattn bench``); ratios only mean something within one run on one machine. A provider that fails
is a ``failed`` row and makes the command exit with status 1.

``--virtual``: all W ranks as a virtual ring in this process on one device (``--device cuda`` for a GPU),
timed against one full-sequence SDPA forward+backward with PyTorch's default kernel choice. The virtual
ring's time is the SUM of every rank's work (Note [virtual ring]), so its ``x single`` measures the cost of the
decomposition itself: 1.0 is ideal, 0.5 means the ring's ranks together take twice single's time; communication
excluded.

``--documents K`` (K > 0): a packed batch of K documents of random lengths summing to ``--seq-len`` (one seed),
``(T, N, D)``, causal within each document. Providers: ``single`` (one process, W threads: one SDPA call per
document, the fastest document mask torch offers on CPU), ``single-mask`` (one SDPA call over the whole batch
with a block-diagonal causal boolean mask: every masked tile is still computed, so it is timed once), and
``ringattn`` (``ring_attention_varlen`` on W gloo ranks, per-document zigzag shards). Also reported: each rank's
block FLOPs (``packed_block_flops``) and the slowest rank's over the mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ..backends import settle_compiles
from ..ring import (
    gather_packed,
    gather_sequence,
    ring_attention,
    ring_attention_varlen,
    shard_packed,
    shard_sequence,
    simulate_ring_attention,
)
from ..ring.comm import TRAFFIC
from ..ring.demo import single_process_threads, usable_cpus
from ..ring.schedule import packed_block_flops

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVIDERS = ("single", "ringattn", "ring-attention-pytorch")
DOCUMENT_PROVIDERS = ("single", "single-mask", "ringattn")  # --documents K: the packed batch
PEER = "ring-attention-pytorch"
PEER_INSTALL = "pip install 'ringattn[peers]' (from a checkout: pip install -e '.[peers]')"


@dataclasses.dataclass(frozen=True)
class Case:
    world_size: int = 2
    seq_len: int = 8192
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = True
    repeats: int = 3
    kv_heads: int = 0  # 0: as many as heads; fewer: GQA/MQA (the providers other than --virtual repeat them)
    documents: int = 0  # > 0: a packed batch of this many documents (the varlen ring)
    window: int = -1  # >= 0 (--virtual): a sliding window of this many earlier tokens (and later ones, not causal)
    sharding: str = "zigzag"

    @property
    def window_pair(self) -> tuple[int, int] | None:
        if self.window < 0:
            return None
        return (self.window, 0) if self.causal else (self.window, self.window)


def random_document_lengths(case: Case) -> list[int]:
    """``case.documents`` random lengths summing to ``case.seq_len`` (seed 0; cut points drawn without repeats)."""
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, case.seq_len), case.documents - 1)) if case.documents > 1 else []
    return [b - a for a, b in zip([0, *cuts], [*cuts, case.seq_len], strict=True)]


def _cu_seqlens(case: Case) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(random_document_lengths(case))], dtype=torch.int64)


def _inputs(case: Case, device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    kv_heads = case.kv_heads or case.heads
    lead = (case.seq_len,) if case.documents else (case.batch, case.seq_len)  # packed (T, N, D) or (B, S, N, D)
    shapes = [(*lead, n, case.head_dim) for n in (case.heads, kv_heads, kv_heads, case.heads)]
    return [torch.randn(shape, generator=gen).to(device=device, dtype=_DTYPES[case.dtype]) for shape in shapes]


def _single(case: Case, q, k, v, g) -> list[torch.Tensor]:
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    heads = (x.transpose(1, 2) for x in (q, k, v))
    gqa = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
    out = F.scaled_dot_product_attention(*heads, is_causal=case.causal, **gqa)
    out.transpose(1, 2).backward(g)
    return [out.transpose(1, 2).detach(), q.grad, k.grad, v.grad]


def _single_varlen(case: Case, q, k, v, g, *, mask: bool = False) -> list[torch.Tensor]:
    """Packed attention in one process: one SDPA call per document, or (``mask``) one over the whole batch with a
    block-diagonal causal mask. Returns ``[out, dq, dk, dv]``."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    cu = _cu_seqlens(case).tolist()
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}

    def sdpa(qs, ks, **kw):  # 4-D (1, N, L, D): 3-D inputs send SDPA to its unfused math path on CPU
        heads = [x.transpose(0, 1).unsqueeze(0) for x in (q[qs], k[ks], v[ks])]
        return F.scaled_dot_product_attention(*heads, **gqa, **kw)[0].transpose(0, 1)

    if mask:
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(torch.tensor(cu)))
        visible = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
        out = sdpa(slice(None), slice(None), attn_mask=visible)
    else:
        out = torch.cat([sdpa(slice(a, b), slice(a, b), is_causal=case.causal) for a, b in itertools.pairwise(cu)])
    out.backward(g)
    return [out.detach(), q.grad, k.grad, v.grad]


def _ringattn(case: Case, rank: int, world: int):
    if case.documents:
        cu = _cu_seqlens(case)

        def run_varlen(q, k, v, g):
            ring_attention_varlen(q, k, v, cu, causal=case.causal).backward(g)

        return (lambda x: shard_packed(x, cu, rank, world)), (lambda x: gather_packed(x, cu)), run_varlen

    def shard(x):
        return shard_sequence(x, rank, world)

    def run(q, k, v, g):
        ring_attention(q, k, v, causal=case.causal, layout="BSND").backward(g)

    return shard, gather_sequence, run


def _import_peer() -> Callable:
    """ring-attention-pytorch's ``ring_flash_attn``; an ImportError saying how to install it when missing."""
    try:
        from ring_attention_pytorch import ring_flash_attn
    except ImportError as exc:
        raise ImportError(f"ring-attention-pytorch is not importable ({exc}); install it with {PEER_INSTALL}") from exc
    return ring_flash_attn


def _peer(case: Case, rank: int, world: int):
    ring_flash_attn = _import_peer()  # striped: rank r holds tokens r, r + W, ...

    def gather(x):
        shards = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(shards, x.contiguous())
        return torch.stack(shards, dim=2).flatten(1, 2)

    def run(q, k, v, g):
        ring_flash_attn(q, k, v, causal=case.causal, ring_reduce_col=True, striped_ring_attn=True).backward(g)

    return (lambda x: x[:, rank::world].contiguous()), gather, run


_RING_PROVIDERS: dict[str, Callable] = {"ringattn": _ringattn, "ring-attention-pytorch": _peer}
# Checked in this process before spawning the ranks: a missing package is one clear line, not W tracebacks.
_PREFLIGHT: dict[str, Callable[[], object]] = {"ring-attention-pytorch": _import_peer}


def _rank(rank: int, world: int, rendezvous: str, provider: str, case: Case, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    try:
        shard, gather, run = _RING_PROVIDERS[provider](case, rank, world)
        full = _inputs(case)
        q, k, v, g = (shard(x) for x in full)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        run(q, k, v, g)  # warm-up, and the results checked against `single`
        results = [gather(x) for x in (q.grad, k.grad, v.grad)]
        settle_compiles(lambda: run(q, k, v, g))  # time the fused merges, not torch's while they compile
        times = []
        for _ in range(case.repeats):
            q.grad = k.grad = v.grad = None
            dist.barrier()
            start = time.perf_counter()
            run(q, k, v, g)
            dist.barrier()
            times.append(time.perf_counter() - start)
        if rank == 0:
            torch.save({"grads": results, "times": times}, result_path)
    finally:
        dist.destroy_process_group()


def installed(provider: str) -> bool:
    """Whether ``provider``'s package is importable here (looked up, not imported); ringattn's own always are."""
    if provider != PEER:
        return True
    if "ring_attention_pytorch" in sys.modules:  # imported already, or blocked (None)
        return sys.modules["ring_attention_pytorch"] is not None
    return importlib.util.find_spec("ring_attention_pytorch") is not None


def default_providers(documents: int = 0) -> tuple[str, ...]:
    """``--providers`` when not given: every provider of the mode that is installed here."""
    return DOCUMENT_PROVIDERS if documents else tuple(p for p in PROVIDERS if installed(p))


def speedup(baseline_s: float, seconds: float) -> float:
    """``x single`` (and ``x naive`` in ``ringattn bench``): the baseline's time over this provider's; > 1 = faster."""
    return baseline_s / seconds


def measure(case: Case, providers: tuple[str, ...] = PROVIDERS) -> list[dict]:
    """One row per provider: median seconds of forward+backward, ``speedup_vs_single`` (single's time over the
    provider's), max |diff| vs single, ``threads`` (per process: ``single``'s, or each rank's); a provider that
    cannot run is a row with ``error`` instead."""
    full = _inputs(case)
    single = (lambda *x: _single_varlen(case, *x)) if case.documents else (lambda *x: _single(case, *x))
    threads = torch.get_num_threads()
    single_threads = single_process_threads(case.world_size)
    torch.set_num_threads(single_threads)
    try:
        reference = single(*full)[1:]
        times = []
        for _ in range(case.repeats):
            start = time.perf_counter()
            single(*full)
            times.append(time.perf_counter() - start)
        rows = [{"provider": "single", "median_s": statistics.median(times), "max_abs_diff": 0.0,
                 "threads": single_threads}]  # fmt: skip
        if case.documents and "single-mask" in providers:  # every masked tile computed: timed once, no warm-up
            start = time.perf_counter()
            masked = _single_varlen(case, *full, mask=True)[1:]
            seconds = time.perf_counter() - start
            diff = max((a - b).abs().max().item() for a, b in zip(masked, reference, strict=True))
            rows.append(
                {"provider": "single-mask", "median_s": seconds, "max_abs_diff": diff, "threads": single_threads}
            )
    finally:
        torch.set_num_threads(threads)
    for provider in providers:
        if provider in ("single", "single-mask"):
            continue
        try:
            _PREFLIGHT.get(provider, lambda: None)()
        except ImportError as exc:
            rows.append({"provider": provider, "error": str(exc)})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "result.pt")
            try:
                mp.spawn(_rank, args=(case.world_size, f"file://{tmp}/rdv", provider, case, path),
                         nprocs=case.world_size)  # fmt: skip
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                rows.append({"provider": provider, "error": str(exc).strip().splitlines()[-1]})
                continue
            result = torch.load(path)
        diff = max(
            (a.double() - b.double()).abs().max().item() for a, b in zip(result["grads"], reference, strict=True)
        )
        rows.append({"provider": provider, "median_s": statistics.median(result["times"]), "max_abs_diff": diff,
                     "threads": 1})  # fmt: skip
    single_s = rows[0]["median_s"]
    for row in rows:
        if "median_s" in row:
            row["speedup_vs_single"] = speedup(single_s, row["median_s"])
    return rows


def _seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall seconds of ``fn`` (synchronised on CUDA), after warm-up calls that let the fused CPU kernels
    load (``settle_compiles``)."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    settle_compiles(fn)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_virtual(case: Case, device: str = "cpu", impls: tuple[str, ...] = ("auto",)) -> list[dict]:
    """One full-sequence SDPA forward+backward vs a virtual ring of ``case.world_size`` ranks (one row per block
    kernel in ``impls``), on ``device``, with this process's threads: median seconds, ``speedup_vs_single``
    (single's time over the ring's), max |grad diff| vs single, ``threads``."""
    q, k, v, g = _inputs(case, device)
    window = case.window_pair

    def virtual(impl: str, world: int = case.world_size) -> list[torch.Tensor]:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = simulate_ring_attention(*leaves, world_size=world, causal=case.causal, impl=impl, layout="BSND",
                                      sharding=case.sharding, window=window)  # fmt: skip
        return list(torch.autograd.grad(out, leaves, g))

    threads = torch.get_num_threads()
    if window is None:
        reference = _single(case, q, k, v, g)[1:]
        single = {"provider": "single (SDPA)", "median_s": _seconds(lambda: _single(case, q, k, v, g), device,
                                                                    case.repeats)}  # fmt: skip
    else:  # one process, the same window on the same block kernels: the ring of one (Note [windows])
        reference = virtual("auto", world=1)
        single = {"provider": "single (window)", "median_s": _seconds(lambda: virtual("auto", 1), device, case.repeats)}
    rows = [{**single, "max_abs_diff": 0.0, "threads": threads}]
    for impl in impls:
        name = f"virtual ring W={case.world_size} ({impl})"
        try:
            diff = max(
                (a.double() - b.double()).abs().max().item() for a, b in zip(virtual(impl), reference, strict=True)
            )
            seconds = _seconds(lambda i=impl: virtual(i), device, case.repeats)
        except Exception as exc:  # a kernel that cannot run this case is reported, not fatal
            rows.append({"provider": name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"})
            continue
        TRAFFIC.reset()
        virtual(impl)
        sent = {"messages": TRAFFIC.messages, "sent_MB": TRAFFIC.bytes / 2**20}
        rows.append({"provider": name, "median_s": seconds, "max_abs_diff": diff, "threads": threads, **sent})
    for row in rows:
        if "median_s" in row:
            row["speedup_vs_single"] = speedup(rows[0]["median_s"], row["median_s"])
    return rows


def _window_note(case: Case) -> str:
    """The ring steps a window leaves out (Note [windows]), from the plan the ring runs."""
    from ..ring.attention import DensePlan

    world = case.world_size
    plan = DensePlan(case.causal, case.sharding, case.seq_len // world, world, case.window_pair)
    return f"window {case.window_pair}: ring steps taken {plan.steps} of {world} (the others send and compute nothing)"


def build_parser() -> argparse.ArgumentParser:
    """The ``ringattn bench ring`` parser (every option's help states its default once)."""
    from ..cli import DefaultsFormatter

    parser = argparse.ArgumentParser(
        prog="ringattn bench ring",
        description=__doc__.split("\n")[0].replace("``", ""),
        formatter_class=DefaultsFormatter,
    )
    defaults = Case()
    parser.add_argument("--world-size", type=int, default=defaults.world_size, help="ranks W")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="full sequence length S")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="batch size B")
    parser.add_argument("--heads", type=int, default=defaults.heads, help="query heads N")
    parser.add_argument("--kv-heads", type=int, default=defaults.kv_heads, help="key/value heads (0: N)")
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim, help="head size D")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=defaults.dtype, help="q, k, v dtype")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="full attention instead of causal")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs (median reported)")
    parser.add_argument(
        "--providers",
        default=None,
        help=f"comma-separated, from {', '.join(PROVIDERS)} ({PEER} needs the 'peers' extra); with --documents from "
        f"{', '.join(DOCUMENT_PROVIDERS)} (default every one installed here)",
    )
    parser.add_argument("--virtual", action="store_true", help="all W ranks in this process (see the module doc)")
    parser.add_argument("--device", default="cpu", help="--virtual only: cpu or cuda")
    parser.add_argument("--impls", default="auto", help="--virtual only: comma-separated block kernels to time")
    parser.add_argument(
        "--documents", type=int, default=defaults.documents, help="> 0: a packed batch of this many documents"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=defaults.window,
        help="--virtual only, >= 0: a sliding window of this many earlier tokens (causal; and later ones with "
        "--no-causal), timed against the ring of one under the same window; -1: none",
    )
    parser.add_argument("--sharding", choices=("zigzag", "contiguous"), default=defaults.sharding,
                        help="--virtual only: how the sequence is cut")  # fmt: skip
    parser.add_argument("--json", help="also write the rows to this file")
    return parser


def _providers(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> tuple[tuple[str, ...], list[str]]:
    """The providers to run and the notes about those left out; an argument error for an unknown or missing one."""
    if ns.providers is None:
        chosen = default_providers(ns.documents)
        notes = [] if ns.documents or installed(PEER) else [f"{PEER}: not installed, left out ({PEER_INSTALL})"]
        return chosen, notes
    chosen = tuple(dict.fromkeys(p.strip() for p in ns.providers.split(",") if p.strip()))
    known = DOCUMENT_PROVIDERS if ns.documents else PROVIDERS
    unknown = [p for p in chosen if p not in known]
    if not chosen or unknown:
        mode = " with --documents" if ns.documents else ""
        parser.error(f"--providers: expected providers from {', '.join(known)}{mode}, got {ns.providers!r}")
    missing = [p for p in chosen if not installed(p)]
    if missing:
        parser.error(f"--providers: {', '.join(missing)} is not installed; install it with {PEER_INSTALL}")
    if "single" not in chosen:
        chosen = ("single", *chosen)  # the baseline every ratio and difference is relative to
    return chosen, []


def main(argv: list[str]) -> int:
    """``ringattn bench ring [options]``; prints a table (and JSON with ``--json PATH``). Returns the exit status:
    0, 1 when a provider failed, 2 for a bad argument."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        providers, notes = _providers(parser, ns) if not ns.virtual else ((), [])
    except SystemExit as exc:  # argparse reports and exits; the CLI wants a status
        return int(exc.code or 0)
    if (ns.window >= 0 or ns.sharding != "zigzag") and not ns.virtual:
        parser.print_usage(sys.stderr)
        print("ringattn bench ring: error: --window and --sharding need --virtual", file=sys.stderr)
        return 2
    case = Case(ns.world_size, ns.seq_len, ns.batch, ns.heads, ns.head_dim, ns.dtype, ns.causal, ns.repeats,
                ns.kv_heads, ns.documents, ns.window, ns.sharding)  # fmt: skip
    if ns.documents:
        rows = measure(case, providers)
        flops = packed_block_flops(random_document_lengths(case), case.world_size, causal=case.causal, heads=case.heads,
                                   head_dim=case.head_dim)  # fmt: skip
        print(f"documents: {random_document_lengths(case)}")
        print(f"block GFLOP per rank (forward): {[round(f / 1e9, 2) for f in flops]}; "
              f"slowest / mean = {max(flops) * len(flops) / sum(flops):.4f}")  # fmt: skip
    elif ns.virtual:
        rows = measure_virtual(case, ns.device, tuple(ns.impls.split(",")))
    else:
        rows = measure(case, providers)
    print(f"ring attention forward+backward: {case}")
    print(f"{'provider':<24}{'median s':>10}{'x single':>10}{'max|grad diff|':>16}{'threads':>9}{'messages':>10}"
          f"{'sent MB':>10}")  # fmt: skip
    for row in rows:
        if "error" in row:
            print(f"{row['provider']:<24}  failed: {row['error']}")
        else:
            sent = f"{row['messages']:>10}{row['sent_MB']:>10.1f}" if "messages" in row else ""
            print(f"{row['provider']:<24}{row['median_s']:>10.3f}{row['speedup_vs_single']:>10.2f}"
                  f"{row['max_abs_diff']:>16.2e}{row['threads']:>9}{sent}")  # fmt: skip
    if ns.virtual and case.window_pair is not None:
        notes.append(_window_note(case))
    notes.append("x single: single time / provider time (higher = faster; as x naive in `ringattn bench`)")
    if not ns.virtual:
        notes.append(f"threads: per process; single runs min(W, {usable_cpus()} usable CPU cores), each rank 1")
    print("\n".join(notes))
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump({"case": dataclasses.asdict(case), "rows": rows, "notes": notes}, fh, indent=2)
    failed = [row["provider"] for row in rows if "error" in row]
    if failed:
        print(f"ringattn bench ring: {len(failed)} provider(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
