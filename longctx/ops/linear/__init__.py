"""Lightning attention: causal linear attention with a per-head decay, carrying a state in and out."""
from __future__ import annotations

from typing import Optional

import torch

from longctx.ops.dispatch import use_kernel
from longctx.ops.linear.backward import LightningAttnFunction
from longctx.ops.linear.forward import CHUNK_SIZE, MAX_HEAD_DIM
from longctx.ops.linear.naive import lightning_attn_chunked

__all__ = ["lightning_attn_func", "uses_kernel"]


def uses_kernel(q: torch.Tensor, v: torch.Tensor, kernel: Optional[bool] = None) -> bool:
    """Whether lightning attention runs its Triton kernels on q, v (`ops.dispatch.use_kernel`: None
    runs them on CUDA where they apply, True insists, False runs the chunked PyTorch form)."""
    supported = (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[1] > 0
                 and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM)
    return use_kernel("lightning attention", q.device, supported, kernel,
                      f"fp16/bf16/fp32, head dims up to {MAX_HEAD_DIM} and a non-empty sequence, got "
                      f"{q.dtype}, Dk={q.shape[-1]}, Dv={v.shape[-1]}, seqlen {q.shape[1]}")


def _check_inputs(q, k, v, decay, initial_state, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, seqlen, heads, head_dim); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, seqlen, heads, dk = q.shape
    if k.shape[:2] != (batch, seqlen) or v.shape[:2] != (batch, seqlen):
        raise ValueError(f"q, k, v must share batch and seqlen; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[3] != dk:
        raise ValueError(f"q and k need the same head_dim; got {dk} and {k.shape[3]}")
    if k.shape[2] != v.shape[2] or heads % k.shape[2] != 0:
        raise ValueError(f"k and v need the same number of heads, dividing the {heads} query heads (GQA); "
                         f"got {k.shape[2]} and {v.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                               torch.float64):
        raise TypeError(f"q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if decay.shape != (heads,):
        raise ValueError(f"decay must have one value per query head, shape ({heads},); got {tuple(decay.shape)}")
    if not decay.is_floating_point():
        raise TypeError(f"decay must be a float tensor (fp32); got {decay.dtype}")
    if not torch.compiler.is_compiling() and decay.device.type == "cpu" and bool((decay < 0).any()):
        # On a GPU this check would sync with the host on every call: the caller keeps decay >= 0.
        raise ValueError(f"decay must be >= 0 (lambda = exp(-decay) <= 1); got {decay.tolist()}")
    if initial_state is not None and initial_state.shape != (batch, heads, dk, v.shape[3]):
        raise ValueError(f"initial_state must be (batch, heads, Dk, Dv) = {(batch, heads, dk, v.shape[3])}; "
                         f"got {tuple(initial_state.shape)}")
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"with cu_seqlens the documents are packed into one row: batch must be 1, got {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens must be a 1-D int32 tensor of document starts plus the total token count")
        if cu_seqlens.device.type == "cpu":  # on a GPU this check would sync with the host on every call
            bounds = cu_seqlens.tolist()
            if bounds[0] != 0 or bounds[-1] != seqlen or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
                raise ValueError(f"cu_seqlens must rise from 0 to the token count {seqlen}; got {bounds[:8]}"
                                 f"{'...' if len(bounds) > 8 else ''}")


def lightning_attn_func(q, k, v, decay, initial_state=None, cu_seqlens=None, *, chunk_size=CHUNK_SIZE,
                        num_segments=None, kernel: Optional[bool] = None):
    """Causal linear attention with a per-head exponential decay (lightning attention).

        S_t = exp(-decay) * S_{t-1} + k_t^T v_t ;  o_t = q_t S_t ;  S_0 = initial_state or 0

    q, k: (B, S, H, Dk); v: (B, S, H, Dv). k and v may have fewer heads Hkv dividing H (GQA): query
    head h then reads k/v head h // (H // Hkv), and keeps its own state (its decay is its own).
    decay: (H,) >= 0, fp32. initial_state: (B, H, Dk, Dv), fp32, or None for zeros.
    cu_seqlens: int32 starts of packed documents plus the total, over the B*S tokens (B must be 1): the
    state restarts from zero at each document; initial_state feeds the first document and the final
    state is the one at the end of the last document.
    No scale is applied: scale q first if you want one.

    Returns (out (B, S, H, Dv) in the dtype of q, final_state (B, H, Dk, Dv) fp32). Differentiable in
    q, k, v and initial_state, including through final_state.

    `kernel`: None runs the Triton kernels on CUDA (where they apply: not float64, head dims up to
    MAX_HEAD_DIM) and the chunked PyTorch form elsewhere; True insists on the kernels (on a CPU under
    TRITON_INTERPRET=1: tests); False runs PyTorch (see `ops/dispatch.py`). Tuning: `chunk_size` (a power of two >= 16) tokens per chunk,
    `num_segments` pieces of the sequence run in parallel (None: enough to fill the GPU).
    """
    _check_inputs(q, k, v, decay, initial_state, cu_seqlens)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16; got {chunk_size}")
    if not uses_kernel(q, v, kernel):
        return lightning_attn_chunked(q, k, v, decay, initial_state, cu_seqlens, chunk_size)
    return LightningAttnFunction.apply(q, k, v, decay, initial_state, cu_seqlens, chunk_size, num_segments)
