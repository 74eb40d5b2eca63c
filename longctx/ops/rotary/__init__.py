"""Rotary position embeddings applied to q and k together (the half-split convention of Hugging Face).

On CUDA this runs Liger's Triton kernel (`liger_kernel.ops.rope`): one program per token rotates all
heads of q and k in place, and the backward rotates the incoming gradients in place. Measured on an
H200 against the kernel longctx carried before (bench/results/ops_h200.json, bf16, the 1B and 8B
shapes at 8K and 32K tokens) it took 0.50-0.64x that kernel's time forward and backward (0.25-0.80x
forward) and allocated nothing above its inputs, where ours allocated 0.08-0.63 GiB. Elsewhere the plain form (`naive.py`) runs and writes its result
into q and k too, so that CPUs (and the tests) see the aliasing GPUs do.

In place means: the returned tensors are q and k (or, for non-contiguous ones on the kernel path,
rotated contiguous copies); the unrotated values are gone. The projections' outputs, rotated right
after the projection, are the intended inputs. Both paths tell autograd of the write, so a graph
that saved the unrotated q or k is refused with an error instead of getting wrong gradients, and
so is a leaf that requires grad.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import use_kernel
from .naive import apply_rotary_naive

__all__ = ["apply_rotary"]


def _use_kernel(q: torch.Tensor, k: torch.Tensor, kernel: Optional[bool]) -> bool:
    supported = q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype
    return use_kernel("rotary", q.device, supported, kernel,
                      f"q and k of one fp16/bf16/fp32 dtype, got {q.dtype} and {k.dtype}")


class _LigerRotary(torch.autograd.Function):
    """Liger's launchers (`rope_forward`, `rope_backward`), which take (B, H, S, D) views of (B, S, H, D)
    memory. Not `LigerRopeFunction`, which writes into q and k without telling autograd, so that a
    saved unrotated q would silently give wrong gradients. Nor can q and k be marked dirty: they are
    views (of the projections' outputs), and autograd takes in-place views from a Function of one
    output only. So the version counters are bumped by hand, which is what autograd checks saved
    tensors against; the outputs alias the inputs and the math needs nothing of them."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        from liger_kernel.ops.rope import rope_forward
        # q, k contiguous (B, S, H, D): the transposes are what Liger transposes back, no copies
        rope_forward(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        torch.autograd.graph.increment_version((q, k))
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        from liger_kernel.ops.rope import rope_backward
        cos, sin = ctx.saved_tensors
        # Liger rotates the gradients back in place (in a contiguous copy where they are not contiguous)
        grad_q, grad_k = rope_backward(grad_q.transpose(1, 2), grad_k.transpose(1, 2), cos, sin)
        return grad_q.transpose(1, 2), grad_k.transpose(1, 2), None, None


def _overwrites_a_leaf(x: torch.Tensor) -> bool:
    """Whether writing into x writes into a leaf that requires grad (which autograd refuses)."""
    base = x if x._base is None else x._base
    return base.is_leaf and base.requires_grad


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kernel: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, S, H, D) and k (B, S, Hkv, D) in place by the per-token angles cos, sin
    (B or 1, S, 1, D): x * cos + rotate_half(x) * sin in x's dtype. Returns the rotated q and k.

    The angles are those of `longctx.model.rotary.rotary_cos_sin` (gathered per token from the
    position ids, so any positions work: offsets, packed documents restarting at 0): both halves of
    the head dim the same, as Liger's kernel reads only the first; no gradient flows to them.
    `kernel`: None runs Liger's kernel on CUDA tensors and PyTorch elsewhere; True insists on the
    kernel (on a CPU only under TRITON_INTERPRET=1, for tests); False runs PyTorch."""
    if q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1] \
            or q.shape[-1] % 2 or cos.shape != sin.shape or cos.dim() != 4 \
            or cos.shape[1:] != (q.shape[1], 1, q.shape[-1]) or cos.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"q, k must be (batch, seqlen, heads, head_dim) with an even head_dim and cos, sin "
                         f"(batch or 1, seqlen, 1, head_dim), got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary takes angles that need no gradient (as rotary_cos_sin's)")
    if _use_kernel(q, k, kernel):
        q, k = q.contiguous(), k.contiguous()
        if _overwrites_a_leaf(q) or _overwrites_a_leaf(k):
            raise RuntimeError("apply_rotary rotates q and k in place: a leaf Variable that requires grad "
                               "(or a view of one) cannot be rotated; pass a copy")
        # in q's dtype (Liger computes in the angles'), as (B or 1, S, D) rows, contiguous
        cos, sin = (a.to(q.dtype).squeeze(2).contiguous() for a in (cos, sin))
        return _LigerRotary.apply(q, k, cos, sin)
    rotated_q, rotated_k = apply_rotary_naive(q, cos, sin), apply_rotary_naive(k, cos, sin)
    return q.copy_(rotated_q), k.copy_(rotated_k)
