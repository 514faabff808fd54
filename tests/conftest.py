"""Shared fixtures: the backends under test, seeded generators, per-dtype tolerances."""

from __future__ import annotations

import os

import torch

# backend="auto" on CPU compiles the fused kernel on the caller's thread instead of answering with torch meanwhile
# (Note [cold start] in backends/_warm.py): every test then runs one backend, the same in its worker processes, and
# auto keeps exercising the fused kernel. tests/test_cold_start.py tests the default policy.
os.environ["RINGATTN_AUTO_CPU"] = "wait"

# Triton kernels run on CPU through the interpreter when no GPU is present; this must be set before
# triton is first imported anywhere in the test process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
