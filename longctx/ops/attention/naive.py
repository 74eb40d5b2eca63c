"""Plain-PyTorch softmax attention: the definition the Triton kernels are tested against.

Same layouts and causal rule as `attention_forward`: q (B, Sq, H, D), k/v (B, Sk, Hkv, D), or packed
(T, H, D) with `cu_seqlens_q`/`cu_seqlens_k`. Query row i may see key j iff j <= i + offset, the
offset defaulting to Sk - Sq (bottom-right aligned, per document in varlen). Rows that see nothing
give output 0 and log-sum-exp -inf. It materialises the (Sq, Sk) scores: for small tests only.

The scores are computed in the inputs' dtype and the softmax in at least fp32, so the same function
gives the float64 reference (on float64 inputs) and the low-precision PyTorch reference whose error
sets the tests' tolerances (on fp16 inputs). Differentiable through autograd.
"""
from __future__ import annotations

import math

import torch


def _dense_reference(q, k, v, scale, causal, offset):
    # q [B, Sq, H, D]; k, v [B, Sk, Hkv, D]
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
    if k.shape[1] == 0:  # a document with no keys: every row sees nothing
        lse = torch.full((q.shape[0], heads, q.shape[1]), float("-inf"), device=q.device)
        return q * 0, lse
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, Sq, Sk]
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = scores.to(softmax_dtype)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if causal:
        rows = torch.arange(seqlen_q, device=q.device)[:, None]
        cols = torch.arange(seqlen_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + offset, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total == 0, torch.ones_like(total), total)
    lse = (torch.log(total) + row_max).squeeze(-1)  # [B, H, Sq]; log 0 = -inf for empty rows
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out, lse.float()


def attention_reference(q, k, v, *, softmax_scale=None, causal=False, causal_offset=None,
                        cu_seqlens_q=None, cu_seqlens_k=None, causal_offsets=None):
    """Returns (out, lse): out like q, lse fp32 natural log, (B, H, Sq) dense or (H, Tq) varlen."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_q is None:
        offset = causal_offset if causal_offset is not None else k.shape[1] - q.shape[1]
        return _dense_reference(q, k, v, scale, causal, offset)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for doc in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[doc], bounds_q[doc + 1], bounds_k[doc], bounds_k[doc + 1]
        offset = int(causal_offsets[doc]) if causal_offsets is not None else (k1 - k0) - (q1 - q0)
        out, lse = _dense_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], scale, causal, offset)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)
