"""Rotary position embeddings applied to q or k, in plain PyTorch: the definition the kernel is
tested against, and the path for CPUs (where `apply_rotary` copies its result into q and k)."""
from __future__ import annotations

import torch


def apply_rotary_naive(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, S, H, D) by the position angles (the half-split convention of Hugging Face)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    # in x's dtype, whatever dtype the caller computed the angles in
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
