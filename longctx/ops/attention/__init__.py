"""FlashAttention-2 in Triton: forward and backward, causal or not, GQA/MQA, head dims up to 256,
packed variable-length documents; the log-sum-exp in and out for ring attention.

Two levels:
- `flash_attn_func`, `flash_attn_varlen_func`: autograd functions, the flash-attn interface.
- `attention_forward`, `attention_backward`: no autograd; they take and return the log-sum-exp and a
  causal offset so that ring attention can run one (query block, key block) pair at a time.

Causal rule: query row i (0-based in its block or document) sees key j iff j <= i + offset; the offset
defaults to Sk - Sq (bottom-right aligned, as flash-attn >= 2.1), per document in varlen. Rows that
see nothing give output 0 and log-sum-exp -inf, and contribute nothing to the gradients.

Layouts: dense q (B, Sq, H, D), k/v (B, Sk, Hkv, D); packed q (Tq, H, D), k/v (Tk, Hkv, D) with int32
`cu_seqlens_*` (document starts plus the total; zero-length documents allowed). Any batch, sequence
and head strides are taken as they are (views such as `x[:, :S // 2]` are not copied); a head dim
that is not contiguous is copied. The log-sum-exp is fp32 natural log, (B, H, Sq) or (H, Tq).
fp16 and bf16 run with fp32 accumulation; fp32 inputs are accepted (tf32 products on GPUs).
`max_seqlen_q`/`max_seqlen_k` must be at least the longest document (they size the grid; they are
not checked, which would cost a device sync).

`deterministic`: with False (the default) the backward may sum dQ with fp32 atomics in one pass with
dK and dV (backward.py), where that measured faster for the head dim; dQ may then change in the last
bits from run to run. `deterministic=True` always runs the bitwise reproducible two-kernel backward.
"""
from __future__ import annotations

import torch

from .backward import _bwd
from .forward import _fwd, check_inputs, scale_or_default

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "attention_forward", "attention_backward"]


def _check_offsets(causal, causal_offset, causal_offsets, varlen):
    if causal_offset is not None and varlen:
        raise ValueError("causal_offset is for the dense layout; pass causal_offsets (one per document) in varlen")
    if causal_offsets is not None and not varlen:
        raise ValueError("causal_offsets is for the packed layout; pass causal_offset (an int) for dense inputs")
    if (causal_offset is not None or causal_offsets is not None) and not causal:
        raise ValueError("a causal offset was given with causal=False: set causal=True or drop the offset")


def _max_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if max_seqlen_q is None or max_seqlen_k is None:
        # costs a device sync; pass them to avoid it
        lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()
        lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item()
        max_seqlen_q = lengths_q if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = lengths_k if max_seqlen_k is None else max_seqlen_k
    return int(max_seqlen_q), int(max_seqlen_k)


def attention_forward(q, k, v, *, softmax_scale=None, causal=False, causal_offset=None,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                      causal_offsets=None, out_dtype=None):
    """Forward without autograd. Returns (out, lse).

    q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D), lse (B, H, Sq) fp32; or packed
    q (Tq, H, D), k/v (Tk, Hkv, D) with cu_seqlens_q/k -> out (Tq, H, D), lse (H, Tq).
    `out_dtype=torch.float32` returns the output in fp32 (for merging partial results).
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    check_inputs(q, k, v, varlen, cu_seqlens_q, cu_seqlens_k, causal_offsets)
    _check_offsets(causal, causal_offset, causal_offsets, varlen)
    if varlen:
        max_seqlen_q, max_seqlen_k = _max_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _fwd(q, k, v, softmax_scale=scale_or_default(softmax_scale, q.shape[-1]), causal=causal,
                causal_offset=causal_offset, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal_offsets=causal_offsets,
                out_dtype=out_dtype)


def attention_backward(dout, q, k, v, out, lse, *, softmax_scale=None, causal=False, causal_offset=None,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                       causal_offsets=None, delta=None, grad_dtype=None, deterministic=False):
    """Backward without autograd. Returns (dq, dk, dv), dk/dv in k's shape (GQA groups summed).

    `out` and `lse` are what the forward returned (or, in ring attention, the merged output and
    log-sum-exp). `delta` may pass rowsum(dout * out) precomputed (fp32, lse's shape).
    `grad_dtype=torch.float32` returns fp32 gradients (for accumulation).
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    check_inputs(q, k, v, varlen, cu_seqlens_q, cu_seqlens_k, causal_offsets)
    _check_offsets(causal, causal_offset, causal_offsets, varlen)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout and out must have q's shape {tuple(q.shape)}, got {tuple(dout.shape)} "
                         f"and {tuple(out.shape)}")
    if dout.device != q.device or out.device != q.device or lse.device != q.device:
        raise ValueError("dout, out and lse must be on q's device")
    heads = q.shape[-2]
    lse_shape = (heads, q.shape[0]) if varlen else (q.shape[0], heads, q.shape[1])
    for name, t in (("lse", lse), ("delta", delta)):
        if t is not None and (tuple(t.shape) != lse_shape or t.dtype != torch.float32):
            raise ValueError(f"{name} must be float32 of shape {lse_shape}, got {t.dtype} {tuple(t.shape)}")
    if varlen:
        max_seqlen_q, max_seqlen_k = _max_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _bwd(dout, q, k, v, out, lse, softmax_scale=scale_or_default(softmax_scale, q.shape[-1]),
                causal=causal, causal_offset=causal_offset, cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                causal_offsets=causal_offsets, delta=delta, grad_dtype=grad_dtype, deterministic=deterministic)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                deterministic):
        kwargs = dict(softmax_scale=softmax_scale, causal=causal, cu_seqlens_q=cu_seqlens_q,
                      cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
        out, lse = attention_forward(q, k, v, **kwargs)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.kwargs = dict(kwargs, cu_seqlens_q=None, cu_seqlens_k=None)
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        kwargs = dict(ctx.kwargs, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, deterministic=ctx.deterministic, **kwargs)
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, deterministic=False):
    """Softmax attention with autograd. q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> (B, Sq, H, D).

    H must be a multiple of Hkv (GQA/MQA: K and V are not repeated); D at most 256; fp16 or bf16.
    Causal masks are bottom-right aligned when Sq != Sk. `softmax_scale` defaults to 1/sqrt(D).
    `deterministic=True`: a bitwise reproducible backward (see the module's notes).
    """
    check_inputs(q, k, v, varlen=False)
    return _FlashAttention.apply(q, k, v, causal, softmax_scale, None, None, None, None, deterministic)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=False, softmax_scale=None, deterministic=False):
    """Softmax attention over packed documents, with autograd. q (Tq, H, D), k/v (Tk, Hkv, D) -> (Tq, H, D).

    `cu_seqlens_q`/`cu_seqlens_k`: int32 (documents + 1,), document starts plus the total; attention
    stays inside each document. `max_seqlen_*`: the longest document (at least).
    """
    check_inputs(q, k, v, True, cu_seqlens_q, cu_seqlens_k)
    return _FlashAttention.apply(q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, deterministic)
