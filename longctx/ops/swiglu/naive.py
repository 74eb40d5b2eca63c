"""The SwiGLU product in plain PyTorch: the definition the kernel and the lean autograd form are tested
against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul_naive(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up as Hugging Face's LlamaMLP computes it. Autograd keeps gate, silu(gate) and up."""
    return F.silu(gate) * up
