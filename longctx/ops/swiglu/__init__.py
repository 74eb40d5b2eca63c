"""silu(gate) * up that keeps, for the backward, only gate and up.

Autograd on `F.silu(gate) * up` (`naive.py`) keeps gate (for silu's backward) and both factors of
the product, silu(gate) and up: three seq x intermediate tensors. Here silu is recomputed from gate
in the backward, so a layer's MLP keeps gate, up and the product (the down projection's input): a
quarter less of the largest activations (16 KB per token per layer at the 1B shape in bf16).

On CUDA this runs Liger's Triton kernels (`liger_kernel.ops.swiglu`): one pass each way, the backward
writing the two gradients over the saved gate and up instead of allocating them. Measured on an H200
against the kernels longctx carried before (bench/results/ops_h200.json, bf16, the 1B and 8B shapes at
8K and 32K tokens) they are as fast (ours was 1.14x faster forward and backward at 1B and 8K tokens,
within 3% elsewhere) and allocate a third of the memory forward and backward. Elsewhere (and for
fp64) the PyTorch form here runs, which computes exactly what the plain form computes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..dispatch import use_kernel

__all__ = ["silu_mul"]


def _use_kernel(gate: torch.Tensor, up: torch.Tensor, kernel: Optional[bool]) -> bool:
    supported = gate.dtype in (torch.float16, torch.bfloat16, torch.float32) and up.dtype == gate.dtype \
        and up.device == gate.device
    return use_kernel("SwiGLU", gate.device, supported, kernel,
                      f"gate and up of one fp16/bf16/fp32 dtype on one device, got {gate.dtype} on {gate.device} "
                      f"and {up.dtype} on {up.device}")


class _SiluMul(torch.autograd.Function):
    """The PyTorch form."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # in the inputs' dtype, one rounding per op as autograd's form, and in place: at most three
        # gate-sized temporaries beside the two gradients (fp32 ones would double a 32K-token MLP's)
        sigmoid = torch.sigmoid(gate)
        silu = F.silu(gate)           # rounded once, as the forward's
        grad_up = grad * silu
        # d silu(g) / dg = sigmoid + silu * (1 - sigmoid)
        grad_gate = silu.mul_(torch.sub(1, sigmoid)).add_(sigmoid)
        del sigmoid
        grad_gate.mul_(up).mul_(grad)
        return grad_gate, grad_up


class _LigerSiluMul(torch.autograd.Function):
    """Liger's launchers (`swiglu_forward`, `swiglu_backward`), as `LigerSiLUMulFunction` calls them, but
    telling autograd that the backward overwrote the saved gate and up (their version counters): a
    second backward through the graph (retain_graph) or another saver of gate or up then fails
    instead of reading gradients as activations."""

    @staticmethod
    def forward(ctx, gate, up):
        from liger_kernel.ops.swiglu import swiglu_forward
        gate, up = gate.contiguous(), up.contiguous()   # no copies for the outputs of linear layers
        _, _, out = swiglu_forward(gate, up)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad):
        from liger_kernel.ops.swiglu import swiglu_backward
        gate, up = ctx.saved_tensors
        # bumped before the write: the gradients Liger returns are views of gate and up made after it
        torch.autograd.graph.increment_version((gate, up))
        return swiglu_backward(gate, up, grad.contiguous())   # written over gate and up


def silu_mul(gate: torch.Tensor, up: torch.Tensor, kernel: Optional[bool] = None) -> torch.Tensor:
    """silu(gate) * up (the SwiGLU product), saving only gate and up for the backward.

    gate, up (..., intermediate) of one shape; the output has it too. `kernel`: None runs Liger's
    kernels on CUDA tensors of fp16/bf16/fp32 and PyTorch elsewhere; True insists on them (on a CPU
    only under TRITON_INTERPRET=1, for tests); False runs PyTorch. Liger's backward writes the
    gradients over gate and up (over their contiguous copies where they are not contiguous)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if _use_kernel(gate, up, kernel) and gate.numel():   # Liger's launcher takes no empty rows
        return _LigerSiluMul.apply(gate, up)
    return _SiluMul.apply(gate, up)
