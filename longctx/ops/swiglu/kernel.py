"""The SwiGLU product silu(gate) * up in Triton: one elementwise pass each way over flat views.

The forward reads gate and up and writes the product; the backward reads the product's gradient,
gate and up and writes both gradients. The PyTorch form (`__init__.py`) runs two elementwise kernels
forward and eight backward, each reading and writing seq x intermediate tensors.

Forward: silu(g) = g / (1 + exp(-g)) in fp32 with PyTorch's roundings (its CUDA kernel calls expf and
divides with IEEE rounding), rounded to the input dtype, then times up in fp32 and rounded once: on a
GPU the output is PyTorch's bit for bit (the tests check it where a GPU is). Under Triton's
interpreter exp is NumPy's, which differs from PyTorch's CPU exp in the last bit of many floats, so
there the roundings are the same but silu's fp32 value may not be. Backward: every value in fp32,
each gradient rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..dispatch import INTERPRETED

# elements per program: 16 per thread at 8 warps (two 16-byte loads per tensor at 16 bits)
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _exp(b_x, LIBDEVICE_EXP: tl.constexpr):
    # tl.exp lowers to an approximate exp2 on GPUs; libdevice's expf is what PyTorch's kernels call.
    # The interpreter runs no libdevice functions: there tl.exp is NumPy's exp.
    if LIBDEVICE_EXP:
        b_y = libdevice.exp(b_x)
    else:
        b_y = tl.exp(b_x)
    return b_y


@triton.jit
def _fwd_kernel(GATE, UP, OUT, n, BLOCK: tl.constexpr, LIBDEVICE_EXP: tl.constexpr):
    i_b = tl.program_id(0)
    o = i_b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)     # int64: tensors above 2^31 elements
    m = o < n
    b_g = tl.load(GATE + o, mask=m, other=0.0).to(tl.float32)
    b_up = tl.load(UP + o, mask=m, other=0.0).to(tl.float32)
    # div_rn: `/` is an approximate division on GPUs, PyTorch's is IEEE-rounded
    b_silu = tl.math.div_rn(b_g, 1.0 + _exp(-b_g, LIBDEVICE_EXP))
    b_silu = b_silu.to(OUT.dtype.element_ty).to(tl.float32)
    # a product of two values of the input dtype is exact in fp32 (fp16, bf16): one rounding, as PyTorch's
    tl.store(OUT + o, (b_silu * b_up).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(GRAD, GATE, UP, GRAD_GATE, GRAD_UP, n, BLOCK: tl.constexpr, LIBDEVICE_EXP: tl.constexpr):
    i_b = tl.program_id(0)
    o = i_b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_dy = tl.load(GRAD + o, mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(GATE + o, mask=m, other=0.0).to(tl.float32)
    b_up = tl.load(UP + o, mask=m, other=0.0).to(tl.float32)
    b_denominator = 1.0 + _exp(-b_g, LIBDEVICE_EXP)
    b_sigmoid = tl.math.div_rn(1.0, b_denominator)
    b_silu = tl.math.div_rn(b_g, b_denominator)   # the forward's fp32 value, one rounding fewer than g * sigmoid
    # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    b_dsilu = b_sigmoid * (1.0 + b_g * (1.0 - b_sigmoid))
    tl.store(GRAD_GATE + o, (b_dy * b_up * b_dsilu).to(GRAD_GATE.dtype.element_ty), mask=m)
    tl.store(GRAD_UP + o, (b_dy * b_silu).to(GRAD_UP.dtype.element_ty), mask=m)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up of one shape, dtype and device -> silu(gate) * up, contiguous, in their dtype."""
    gate, up = gate.contiguous(), up.contiguous()   # no copies for the outputs of linear layers
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    if out.numel():
        _fwd_kernel[_grid(out.numel())](gate, up, out, out.numel(), BLOCK=BLOCK,
                                        LIBDEVICE_EXP=not INTERPRETED, num_warps=NUM_WARPS)
    return out


def silu_mul_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> the gradients of gate and up, contiguous, in gate's dtype."""
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    grad_gate = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    grad_up = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    if gate.numel():
        _bwd_kernel[_grid(gate.numel())](grad, gate, up, grad_gate, grad_up, gate.numel(), BLOCK=BLOCK,
                                         LIBDEVICE_EXP=not INTERPRETED, num_warps=NUM_WARPS)
    return grad_gate, grad_up
