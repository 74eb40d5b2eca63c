"""The `kernel` argument of the ops that have a Triton kernel beside a PyTorch form."""
from __future__ import annotations

import os
from typing import Optional

import torch

# Triton decides when a kernel is defined (at import) whether it runs in its CPU interpreter
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_kernel(op: str, device: torch.device, supported: bool, kernel: Optional[bool], takes: str) -> bool:
    """Whether `op` runs its Triton kernel. `kernel`: None runs it on CUDA tensors the kernel
    `supported`, PyTorch elsewhere; True insists on it (on a CPU only under TRITON_INTERPRET=1, for
    tests); False runs PyTorch. `takes` says what the kernel takes and what it got, for the error."""
    if kernel is None:
        return device.type == "cuda" and supported
    if not kernel:
        return False
    if not supported:
        raise ValueError(f"the {op} kernel takes {takes}: pass kernel=None to run PyTorch for it")
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"the {op} kernel runs on CUDA tensors, got {device}: pass kernel=None, or set "
                           f"TRITON_INTERPRET=1 before importing longctx (tests)")
    return True
