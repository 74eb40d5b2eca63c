"""Plain-PyTorch softmax attention: the definition the Triton kernels are tested against.

Same layouts and causal rule as `attention_forward`: q (B, Sq, H, D), k/v (B, Sk, Hkv, D), or packed
(T, H, D) with `cu_seqlens_q`/`cu_seqlens_k`. Query row i may see key j iff j <= i + offset, the
offset defaulting to Sk - Sq (bottom-right aligned, per document in varlen). Rows that see nothing
give output 0 and log-sum-exp -inf. It materialises the (Sq, Sk) scores: for small tests only.

The scores are computed in the inputs' dtype and the softmax in at least fp32, so the same function
gives the float64 reference (on float64 inputs) and the low-precision PyTorch reference whose error
sets the tests' tolerances (on fp16 inputs). Differentiable through autograd.

`attention_forward` / `attention_backward`: the same math at the kernel's low level (the signatures
of `longctx.ops.attention.attention_forward` / `attention_backward`, log-sum-exp in and out, a
`delta` for the backward, `causal_offset(s)`), so that ring attention runs its block logic over
either on a CPU. On float64 inputs their log-sum-exp and fp32-requested results stay float64, so
the distributed tests can hold ring attention to float64 round-off.
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
    outs, lses = [], []
    for q0, q1, k0, k1, offset in _documents(cu_seqlens_q, cu_seqlens_k, causal_offsets):
        out, lse = _dense_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], scale, causal, offset)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


# ------------------------------------------------------------------------------------------------
# the kernel's low level in PyTorch: forward with the log-sum-exp, backward block by block
# ------------------------------------------------------------------------------------------------
def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What sums of products of `dtype` inputs run in: float64 for a float64 reference, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _probabilities(q, k, lse, scale, causal, offset):
    """Scores masked to what each row may see, and exp(scores - lse) (0 where masked)."""
    # q [B, Sq, H, D], k [B, Sk, H, D] (heads already repeated), lse [B, H, Sq]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        rows = torch.arange(q.shape[1], device=q.device)[:, None]
        cols = torch.arange(k.shape[1], device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + offset, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)  # -inf on rows that see nothing
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite_lse[..., None]), lse


def _repeat_heads(x, heads):
    return x if x.shape[2] == heads else x.repeat_interleave(heads // x.shape[2], dim=2)


def _dense_forward(q, k, v, scale, causal, offset, out_dtype):
    accum = accumulation_dtype(q.dtype)
    heads = q.shape[2]
    probs, lse = _probabilities(q.to(accum), _repeat_heads(k.to(accum), heads), None, scale, causal, offset)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, _repeat_heads(v.to(accum), heads))
    return out.to(out_dtype), lse


def _dense_backward(dout, q, k, v, out, lse, delta, scale, causal, offset, grad_dtype):
    accum = accumulation_dtype(q.dtype)
    batch, seqlen_k, kv_heads, head_dim = k.shape
    heads = q.shape[2]
    qf, kf, vf, dof = q.to(accum), _repeat_heads(k.to(accum), heads), _repeat_heads(v.to(accum), heads), dout.to(accum)
    if delta is None:
        delta = (dof * out.to(accum)).sum(-1).transpose(1, 2)  # [B, H, Sq]
    probs, _ = _probabilities(qf, kf, lse.to(accum), scale, causal, offset)
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dof)
    dprobs = torch.einsum("bqhd,bkhd->bhqk", dof, vf)
    dscores = probs * (dprobs - delta.to(accum)[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, kf) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, qf) * scale
    if heads != kv_heads:  # grouped-query: each kv head gathers the gradients of its query heads
        dk = dk.view(batch, seqlen_k, kv_heads, heads // kv_heads, head_dim).sum(3)
        dv = dv.view(batch, seqlen_k, kv_heads, heads // kv_heads, head_dim).sum(3)
    return dq.to(grad_dtype), dk.to(grad_dtype), dv.to(grad_dtype)


def _documents(cu_seqlens_q, cu_seqlens_k, causal_offsets):
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must list the same documents, got "
                         f"{len(bounds_q) - 1} and {len(bounds_k) - 1}")
    offsets = causal_offsets.tolist() if causal_offsets is not None else None
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        yield q0, q1, k0, k1, (offsets[i] if offsets is not None else (k1 - k0) - (q1 - q0))


def attention_forward(q, k, v, *, softmax_scale=None, causal=False, causal_offset=None,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                      causal_offsets=None, out_dtype=None):
    """(out, lse): out (like q, or `out_dtype`), lse (B, H, Sq) or (H, Tq), natural log."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out_dtype = out_dtype or q.dtype
    if cu_seqlens_q is None:
        offset = causal_offset if causal_offset is not None else k.shape[1] - q.shape[1]
        return _dense_forward(q, k, v, scale, causal, offset, out_dtype)
    out = q.new_zeros(q.shape, dtype=out_dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    for q0, q1, k0, k1, offset in _documents(cu_seqlens_q, cu_seqlens_k, causal_offsets):
        if q1 > q0 and k1 > k0:
            doc_out, doc_lse = _dense_forward(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                              scale, causal, offset, out_dtype)
            out[q0:q1], lse[:, q0:q1] = doc_out[0], doc_lse[0]
    return out, lse


def attention_backward(dout, q, k, v, out, lse, *, softmax_scale=None, causal=False, causal_offset=None,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                       causal_offsets=None, delta=None, grad_dtype=None):
    """(dq, dk, dv) of the block given the rows' final lse (and delta = rowsum(dout * out))."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    grad_dtype = grad_dtype or q.dtype
    if cu_seqlens_q is None:
        offset = causal_offset if causal_offset is not None else k.shape[1] - q.shape[1]
        return _dense_backward(dout, q, k, v, out, lse, delta, scale, causal, offset, grad_dtype)
    dq = q.new_zeros(q.shape, dtype=grad_dtype)
    dk = k.new_zeros(k.shape, dtype=grad_dtype)
    dv = v.new_zeros(v.shape, dtype=grad_dtype)
    for q0, q1, k0, k1, offset in _documents(cu_seqlens_q, cu_seqlens_k, causal_offsets):
        if q1 > q0 and k1 > k0:
            doc_delta = None if delta is None else delta[None, :, q0:q1]
            grads = _dense_backward(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                    out[None, q0:q1], lse[None, :, q0:q1], doc_delta,
                                    scale, causal, offset, grad_dtype)
            dq[q0:q1], dk[k0:k1], dv[k0:k1] = (g[0] for g in grads)
    return dq, dk, dv
