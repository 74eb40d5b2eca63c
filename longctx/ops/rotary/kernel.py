"""Rotary embedding in Triton: one pass that reads x and the angles and writes the rotated x, for
the forward and (rotating by minus the angle) the backward.

With x = [x1, x2] split at the middle of the head dim and cos = [c1, c2], sin = [s1, s2]:
    forward   y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
    backward  g1 = d1 c1 + d2 s2,  g2 = d2 c2 - d1 s1     (the transpose of the forward)
computed in fp32 and rounded once. The PyTorch form runs about five kernels each way (slice and
negate, cat, two products, a sum), each a pass over q or k.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# elements of each half held by one program
BLOCK_ELEMENTS = 4096


@triton.jit
def _rotary_kernel(X, COS, SIN, Y, stride_xt, stride_xh, stride_ct, stride_st, stride_yt, stride_yh,
                   n_rows, n_heads, half,
                   BACKWARD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # a row is one (token, head); the angles are per token
    o_r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    o_d = tl.arange(0, BLOCK_HALF)
    m_r = o_r < n_rows
    mask = m_r[:, None] & (o_d < half)[None, :]
    o_t = o_r // n_heads
    o_h = o_r % n_heads
    p_x = X + (o_t * stride_xt + o_h * stride_xh)[:, None] + o_d[None, :]     # [BLOCK_ROWS, BLOCK_HALF]
    p_c = COS + (o_t * stride_ct)[:, None] + o_d[None, :]
    p_s = SIN + (o_t * stride_st)[:, None] + o_d[None, :]
    b_x1 = tl.load(p_x, mask=mask, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_x + half, mask=mask, other=0.0).to(tl.float32)
    b_c1 = tl.load(p_c, mask=mask, other=0.0).to(tl.float32)
    b_c2 = tl.load(p_c + half, mask=mask, other=0.0).to(tl.float32)
    b_s1 = tl.load(p_s, mask=mask, other=0.0).to(tl.float32)
    b_s2 = tl.load(p_s + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        b_y1 = b_x1 * b_c1 + b_x2 * b_s2
        b_y2 = b_x2 * b_c2 - b_x1 * b_s1
    else:
        b_y1 = b_x1 * b_c1 - b_x2 * b_s1
        b_y2 = b_x2 * b_c2 + b_x1 * b_s2
    p_y = Y + (o_t * stride_yt + o_h * stride_yh)[:, None] + o_d[None, :]
    tl.store(p_y, b_y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(p_y + half, b_y2.to(Y.dtype.element_ty), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """x (T, H, D) with a unit stride in D; cos, sin (T, D) with a unit stride in D.
    Returns the rotated x, (T, H, D) contiguous, in x's dtype."""
    tokens, heads, head_dim = x.shape
    y = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_rows = max(1, BLOCK_ELEMENTS // block_half)
    n_rows = tokens * heads
    _rotary_kernel[(triton.cdiv(n_rows, block_rows),)](
        x, cos, sin, y, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), y.stride(0), y.stride(1),
        n_rows, heads, half, BACKWARD=backward, BLOCK_ROWS=block_rows, BLOCK_HALF=block_half,
        num_warps=4 if block_rows * block_half <= 2048 else 8)
    return y
