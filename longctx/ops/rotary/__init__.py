"""Rotary position embeddings applied to q or k (the half-split convention of Hugging Face).

On CUDA the Triton kernel (`kernel.py`) rotates in one pass each way, in fp32 with one rounding;
elsewhere the plain form (`naive.py`) runs, which rounds each product and the sum in x's dtype.
Both keep only the angles for the backward.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import use_kernel
from .kernel import rotary
from .naive import apply_rotary_naive

__all__ = ["apply_rotary"]


def _use_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel: Optional[bool]) -> bool:
    supported = (x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.shape[-1] % 2 == 0
                 and not (cos.requires_grad or sin.requires_grad))
    return use_kernel("rotary", x.device, supported, kernel,
                      f"fp16/bf16/fp32 x with an even head dim and angles that need no gradient, got {x.dtype}, "
                      f"head dim {x.shape[-1]}")


def _angle_rows(angle: torch.Tensor, batch: int, seqlen: int, head_dim: int) -> torch.Tensor:
    """(batch * seqlen, head_dim) with a unit stride in the head dim (a view when the layout allows)."""
    angle = angle.expand(batch, seqlen, 1, head_dim).reshape(batch * seqlen, head_dim)
    return angle if angle.stride(-1) == 1 else angle.contiguous()


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """(batch * seqlen, heads, head_dim) with a unit stride in the head dim (a view when the layout allows)."""
    rows = x.reshape(-1, *x.shape[2:])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        batch, seqlen, _, head_dim = x.shape
        cos, sin = (_angle_rows(a, batch, seqlen, head_dim) for a in (cos, sin))
        ctx.save_for_backward(cos, sin)
        return rotary(_token_rows(x), cos, sin).view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotary(_token_rows(grad), cos, sin, backward=True).view(grad.shape), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kernel: Optional[bool] = None) -> torch.Tensor:
    """Rotate x (B, S, H, D) by the angles cos, sin (B or 1, S, 1, D): x * cos + rotate_half(x) * sin,
    the output in x's dtype.

    `kernel`: None runs the Triton kernel on CUDA tensors and PyTorch elsewhere; True insists on the
    kernel (on a CPU only under TRITON_INTERPRET=1, for tests); False runs PyTorch."""
    if x.dim() != 4 or cos.dim() != 4 or cos.shape != sin.shape or cos.shape[2] != 1 \
            or cos.shape[-1] != x.shape[-1] or cos.shape[1] != x.shape[1] or cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"x must be (batch, seqlen, heads, head_dim) and cos, sin (batch or 1, seqlen, 1, "
                         f"head_dim), got x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if _use_kernel(x, cos, sin, kernel):
        return _Rotary.apply(x, cos, sin)
    return apply_rotary_naive(x, cos, sin)
