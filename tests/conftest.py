"""Shared fixtures: the backends under test, seeded generators, per-dtype tolerances."""

from __future__ import annotations

import os

import torch

# Triton kernels run on CPU through the interpreter when no GPU is present; this must be set before
# triton is first imported anywhere in the test process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
