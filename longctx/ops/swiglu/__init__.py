"""silu(gate) * up that keeps, for the backward, only gate and up.

Autograd on `F.silu(gate) * up` (`naive.py`) keeps gate (for silu's backward) and both factors of
the product, silu(gate) and up: three seq x intermediate tensors. Here silu is recomputed from gate
in the backward, so a layer's MLP keeps gate, up and the product (the down projection's input): a
quarter less of the largest activations (16 KB per token per layer at the 1B shape in bf16). The
forward computes exactly what the plain form computes.

On CUDA the Triton kernels (`kernel.py`) make one pass each way: the forward reads two tensors and
writes one, the backward reads three and writes two, all math in fp32 registers. The PyTorch form
runs about ten elementwise kernels for the two passes (two forward, eight backward), each reading
and writing gate-sized tensors, and its backward holds up to three gate-sized temporaries. Elsewhere
(and for fp64) PyTorch runs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..dispatch import use_kernel
from .kernel import silu_mul_bwd, silu_mul_fwd

__all__ = ["silu_mul"]


def _use_kernel(gate: torch.Tensor, up: torch.Tensor, kernel: Optional[bool]) -> bool:
    supported = gate.dtype in (torch.float16, torch.bfloat16, torch.float32) and up.dtype == gate.dtype \
        and up.device == gate.device
    return use_kernel("SwiGLU", gate.device, supported, kernel,
                      f"gate and up of one fp16/bf16/fp32 dtype on one device, got {gate.dtype} on {gate.device} "
                      f"and {up.dtype} on {up.device}")


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kernel):
        ctx.kernel = kernel
        ctx.save_for_backward(gate, up)
        if kernel:
            return silu_mul_fwd(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        if ctx.kernel:
            return *silu_mul_bwd(grad, gate, up), None
        # in the inputs' dtype, one rounding per op as autograd's form, and in place: at most three
        # gate-sized temporaries beside the two gradients (fp32 ones would double a 32K-token MLP's)
        sigmoid = torch.sigmoid(gate)
        silu = F.silu(gate)           # rounded once, as the forward's
        grad_up = grad * silu
        # d silu(g) / dg = sigmoid + silu * (1 - sigmoid)
        grad_gate = silu.mul_(torch.sub(1, sigmoid)).add_(sigmoid)
        del sigmoid
        grad_gate.mul_(up).mul_(grad)
        return grad_gate, grad_up, None


def silu_mul(gate: torch.Tensor, up: torch.Tensor, kernel: Optional[bool] = None) -> torch.Tensor:
    """silu(gate) * up (the SwiGLU product), saving only gate and up for the backward.

    gate, up (..., intermediate) of one shape; the output has it too. `kernel`: None runs the Triton
    kernels on CUDA tensors of fp16/bf16/fp32 and PyTorch elsewhere; True insists on the kernels (on a
    CPU only under TRITON_INTERPRET=1, for tests); False runs PyTorch."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return _SiluMul.apply(gate, up, _use_kernel(gate, up, kernel))
