"""RMSNorm that keeps, for the backward, only its input and one fp32 1/rms per row.

The plain form (`naive.py`) leaves autograd holding an fp32 copy of the input and the normalised
tensor: 12 bytes per element at bf16, for each of a layer's two norms (24 GiB for one layer at 512K
tokens and hidden 2048). Here the backward recomputes the normalised input from the input (which
the residual stream holds anyway) and the saved scale.

On CUDA the Triton kernels (`kernel.py`) run both passes with no (rows, hidden) fp32 temporaries;
elsewhere (and for fp64) the same math runs in PyTorch, whose backward makes fp32 temporaries of
the input's size (about 20 bytes per element at its peak), which is fine on a CPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import use_kernel
from .kernel import MAX_COLS, rms_norm_bwd, rms_norm_fwd

__all__ = ["rms_norm"]


def _use_kernel(x: torch.Tensor, kernel: Optional[bool]) -> bool:
    supported = x.dtype in (torch.float16, torch.bfloat16, torch.float32) and 0 < x.shape[-1] <= MAX_COLS \
        and x.numel() > 0
    return use_kernel("RMSNorm", x.device, supported, kernel,
                      f"fp16/bf16/fp32 with 1..{MAX_COLS} columns, got {x.dtype} with shape {tuple(x.shape)}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, n) with unit column stride, a view where the layout allows it."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, kernel):
        ctx.kernel = kernel
        if kernel:
            y, rstd = rms_norm_fwd(_rows(x), weight.contiguous(), eps)
            ctx.save_for_backward(x, weight, rstd)
            return y.view(x.shape)
        wide = x.to(torch.promote_types(x.dtype, torch.float32))   # fp32 (fp64 stays fp64)
        rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)   # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return weight.to(x.dtype) * (wide * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        if ctx.kernel:
            grad_x, grad_weight = rms_norm_bwd(_rows(grad), _rows(x), weight.contiguous(), rstd,
                                               ctx.needs_input_grad[1])
            return grad_x.view(x.shape), grad_weight, None, None
        wide_dtype = rstd.dtype
        normed = x.to(wide_dtype) * rstd
        grad = grad.to(wide_dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # the forward multiplies by the weight in x's dtype: the weight's gradient sees the
            # normalised input as rounded to that dtype
            grad_weight = (grad * normed.to(x.dtype).to(wide_dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = grad * weight.to(x.dtype).to(wide_dtype)
        # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (g - normed * mean(g * normed))
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: Optional[bool] = None) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension; statistics in fp32 (fp64 for
    fp64), the output in x's dtype (as Hugging Face's LlamaRMSNorm when weight and x share a dtype).

    x (..., n), weight (n,). `kernel`: None runs the Triton kernel on CUDA tensors and PyTorch
    elsewhere; True insists on the kernel (on a CPU only under TRITON_INTERPRET=1, for tests);
    False runs PyTorch."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x's last dimension, got "
                         f"{tuple(weight.shape)}")
    return _RMSNorm.apply(x, weight, eps, _use_kernel(x, kernel))
