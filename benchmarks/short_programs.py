"""Consecutive short programs that use a dtype nobody has compiled: from which program on does ``backend="auto"``
run the fused CPU kernel from its first call, and is anything of ringattn left running afterwards (Note [detached
compiles] in ``src/ringattn/backends/_warm.py``)?

    PYTHONPATH=src python benchmarks/short_programs.py [--programs 3] [--seconds 3] [--dtype bfloat16]

Each program imports ringattn, then calls ``merge_states`` (two parts, T=4096, N=8, D=128, LSE form) on CPU with the
default policy (``RINGATTN_AUTO_CPU`` unset) for ``--seconds`` seconds, and reports the backend of its first call and
how many calls ran the fused kernel. Every program uses one fresh private cache directory (``RINGATTN_CACHE_DIR``), so
nothing is compiled before the first. After the last program, the script looks for compile workers of that
directory every 10 s for 2 minutes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

PROGRAM = """
import sys, time
import torch
import ringattn
from ringattn import backends
from ringattn.backends import _warm

dtype = getattr(torch, sys.argv[1])
seconds = float(sys.argv[2])
gen = torch.Generator().manual_seed(0)
o = [torch.randn(4096, 8, 128, generator=gen).to(dtype) for _ in range(2)]
lse = [torch.randn(8, 4096, generator=gen) for _ in range(2)]
ran = []
start = time.perf_counter()
while time.perf_counter() - start < seconds:
    ringattn.merge_states(o, lse, layout="TND", lse_layout="NT", lse_base="e")
    ran.append(_warm.last_backend() or "torch")
print(ran[0], sum(r != "torch" for r in ran), len(ran))
"""


def workers(cache: str) -> list[int]:
    """Processes whose command line runs a compile worker on ``cache``'s queue."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "worker_main" in cmd and cache in cmd:
            found.append(int(pid))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="ringattn-short-programs-")
    env = {k: v for k, v in os.environ.items() if k != "RINGATTN_AUTO_CPU"}
    env["RINGATTN_CACHE_DIR"] = cache
    t0 = time.monotonic()
    for i in range(args.programs):
        begun = time.monotonic() - t0
        run = subprocess.run([sys.executable, "-c", PROGRAM, args.dtype, str(args.seconds)], env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        first, fused, calls = run.stdout.split()
        print(f"program {i + 1}: started at {begun:5.1f} s, ended at {time.monotonic() - t0:5.1f} s; first call: "
              f"{first}; fused calls {fused}/{calls}", flush=True)  # fmt: skip
    end = time.monotonic()
    for _ in range(13):
        left = workers(cache)
        print(f"{time.monotonic() - end:5.1f} s after the last program: {len(left)} worker(s) running", flush=True)
        if not left:
            break
        time.sleep(10)


if __name__ == "__main__":
    main()
