"""The `cudnn` backend of the attention seam (backends.py): PyTorch's private cuDNN attention ops.

Dense calls take (B, H, S, D) views of the seam's (B, S, H, D) tensors; the log-sum-exp comes back
(B, H, S, 1) and is reshaped to the seam's (B, H, S). Packed calls (`_cudnn_attention_forward` /
`_cudnn_attention_backward` with cum_seq_q/k) run only where `cudnn_varlen_trusted()`: PyTorch sized
the varlen backward's dQ buffer by the head dim before pytorch#186142 (June 2026), an illegal
address once a document is longer than the head dim. cuDNN's causal mask is top-left, so a causal
call with fewer queries than keys is refused (the seam's rule is bottom-right; ring attention's
causal blocks are square). Grouped-query K/V go to cuDNN as they are; if it refuses them (or with
LONGCTX_CUDNN_GQA=repeat), they are repeated per query head (and the gradients summed back).
"""
from __future__ import annotations

import functools
import math
import os

import torch

CUDNN_VARLEN_ENV = "LONGCTX_CUDNN_VARLEN"


def _lse_like(q, varlen, dtype):
    heads = q.shape[-2]
    shape = (heads, q.shape[0]) if varlen else (q.shape[0], heads, q.shape[1])
    return torch.full(shape, -math.inf, dtype=dtype, device=q.device)


def _op(name):
    return getattr(torch.ops.aten, name, None)


def cudnn_available():
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if not torch.backends.cudnn.is_available():
        return False, "this torch has no cuDNN"
    if _op("_scaled_dot_product_cudnn_attention") is None:
        return False, "this torch has no _scaled_dot_product_cudnn_attention"
    return True, ""


def _torch_version() -> tuple:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def cudnn_varlen_trusted() -> bool:
    """Whether cuDNN's packed path may run (see the module's notes on pytorch#186142)."""
    if _op("_cudnn_attention_forward") is None or _op("_cudnn_attention_backward") is None:
        return False
    forced = os.environ.get(CUDNN_VARLEN_ENV)
    if forced is not None and forced != "":
        return forced not in ("0", "false", "False")
    return _torch_version() >= (2, 13)


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def cudnn_supports(device, dtype, head_dim, causal, gqa, varlen):
    if device.type != "cuda":
        return False, f"cuDNN attention runs on CUDA, not {device.type}"
    if capability(device) < (8, 0):
        return False, "cuDNN attention needs sm80 or newer"
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"cuDNN attention takes fp16/bf16, not {dtype}"
    if head_dim % 8 or head_dim > 128:
        return False, f"cuDNN attention takes head dims that are multiples of 8 up to 128, not {head_dim}"
    if varlen and not cudnn_varlen_trusted():
        return False, (f"cuDNN's packed backward is not trusted on torch {torch.__version__} (pytorch#186142); "
                       f"{CUDNN_VARLEN_ENV}=1 after scripts/check_backends_gpu.py passes")
    if varlen and gqa:
        return False, "cuDNN's packed path takes as many key/value heads as query heads"
    return True, ""


# set once cuDNN refuses grouped-query K/V as they are: from then on they are repeated per query head.
# LONGCTX_CUDNN_GQA=repeat sets it from the start (where scripts/check_backends_gpu.py finds cuDNN's
# own grouped-query path wrong rather than refused)
_GQA_REPEATED: list = [os.environ.get("LONGCTX_CUDNN_GQA", "") == "repeat"]


def _repeat(x, heads, dim):
    return x if x.shape[dim] == heads else x.repeat_interleave(heads // x.shape[dim], dim=dim)


def _fold(grad, kv_heads, dim):
    """Sum the gradients of repeated key/value heads back to their own head."""
    heads = grad.shape[dim]
    if heads == kv_heads:
        return grad
    shape = list(grad.shape)
    shape[dim:dim + 1] = [kv_heads, heads // kv_heads]
    return grad.reshape(shape).sum(dim + 1)


def _no_causal_offset(q, k, causal):
    if causal and q.shape[-3] != k.shape[-3]:
        raise ValueError(f"cuDNN attention masks causal blocks top-left; the seam's causal rule is bottom-right: "
                         f"a causal call with {q.shape[-3]} queries and {k.shape[-3]} keys needs the triton or "
                         f"torch backend")


def _cudnn_dense_forward(q, k, v, causal, scale):
    heads = q.shape[2]
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    qt = q.transpose(1, 2)
    grouped = k.shape[2] != heads
    if not (grouped and _GQA_REPEATED[0]):
        try:
            return op(qt, k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal, False, scale=scale)
        except RuntimeError:
            if not grouped:
                raise
            _GQA_REPEATED[0] = True
    kt, vt = (_repeat(x, heads, 2).transpose(1, 2) for x in (k, v))
    return op(qt, kt, vt, None, True, 0.0, causal, False, scale=scale)


def cudnn_forward(q, k, v, *, causal, softmax_scale=None, cu_seqlens=None, max_seqlen=None, out_dtype=None):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    _no_causal_offset(q, k, causal)
    varlen = cu_seqlens is not None
    if k.shape[-3] == 0:
        return q.new_zeros(q.shape, dtype=out_dtype or q.dtype), _lse_like(q, varlen, torch.float32)
    if varlen:
        out, lse = _cudnn_varlen_forward(q, k, v, causal, scale, cu_seqlens, max_seqlen)
    else:
        result = _cudnn_dense_forward(q, k, v, causal, scale)
        out = result[0].transpose(1, 2)                       # (B, S, H, D)
        lse = result[1].reshape(q.shape[0], q.shape[2], q.shape[1])
    return (out if out_dtype is None else out.to(out_dtype)), lse.float()


def cudnn_backward(dout, q, k, v, out, lse, *, causal, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
                   delta=None, grad_dtype=None):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    _no_causal_offset(q, k, causal)
    dout, out = dout.to(q.dtype), out.to(q.dtype)
    if k.shape[-3] == 0:
        grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    elif cu_seqlens is not None:
        grads = _cudnn_varlen_backward(dout, q, k, v, out, lse, causal, scale, cu_seqlens, max_seqlen)
    else:
        grads = _cudnn_dense_backward(dout, q, k, v, out, lse, causal, scale)
    return tuple(g if grad_dtype is None else g.to(grad_dtype) for g in grads)


def _no_dropout_state(device):
    """The philox seed and offset the backward takes (unused without dropout): 0-d, as the forward's."""
    return torch.zeros((), dtype=torch.long, device=device)


def _cudnn_dense_backward(dout, q, k, v, out, lse, causal, scale):
    heads, kv_heads = q.shape[2], k.shape[2]
    empty = _no_dropout_state(q.device)
    stats = lse.float().unsqueeze(-1).contiguous()            # cuDNN's (B, H, S, 1)
    t = lambda x: x.transpose(1, 2)  # noqa: E731

    def run(kk, vv):
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            t(dout), t(q), t(kk), t(vv), t(out), stats, empty, empty, None, None, None,
            q.shape[1], k.shape[1], 0.0, causal, scale=scale)
    if heads == kv_heads or not _GQA_REPEATED[0]:
        try:
            dq, dk, dv = run(k, v)
            return t(dq), t(dk), t(dv)
        except RuntimeError:
            if heads == kv_heads:
                raise
            _GQA_REPEATED[0] = True
    dq, dk, dv = run(_repeat(k, heads, 2), _repeat(v, heads, 2))
    return t(dq), _fold(t(dk), kv_heads, 2), _fold(t(dv), kv_heads, 2)


# cuDNN's packed lse: head-major (H, T) or token-major (T, H[, 1]); found by the first forward
_VARLEN_TOKEN_MAJOR: list = [None]


def _cudnn_varlen_forward(q, k, v, causal, scale, cu_seqlens, max_seqlen):
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cu = cu_seqlens.to(torch.int32)
    result = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_seqlen, max_seqlen, True, 0.0,
                                                     causal, False, scale=scale)
    out, lse = result[0], result[1]
    tokens, heads = q.shape[0], q.shape[1]
    token_major = lse.shape[0] == tokens and (tokens != heads or lse.dim() == 3)
    _VARLEN_TOKEN_MAJOR[0] = token_major
    lse = lse.reshape(tokens, heads).t() if token_major else lse.reshape(heads, tokens)
    return out, lse


def _cudnn_varlen_backward(dout, q, k, v, out, lse, causal, scale, cu_seqlens, max_seqlen):
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if _VARLEN_TOKEN_MAJOR[0] is None:      # no forward in this process yet: ask cuDNN its layout
        _cudnn_varlen_forward(q[:2], k[:2], v[:2], False, scale,
                              torch.tensor([0, 2], dtype=torch.int32, device=q.device), 2)
    stats = lse.float().t().contiguous().unsqueeze(-1) if _VARLEN_TOKEN_MAJOR[0] else lse.float().contiguous()
    cu = cu_seqlens.to(torch.int32)
    empty = _no_dropout_state(q.device)
    return torch.ops.aten._cudnn_attention_backward(dout.contiguous(), q, k, v, out, stats, empty, empty, None,
                                                    cu, cu, max_seqlen, max_seqlen, 0.0, causal, scale=scale)
