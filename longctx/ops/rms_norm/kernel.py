"""RMSNorm forward and backward in Triton: one pass over the rows each, nothing kept but the input
and one fp32 1/rms per row, and no fp32 copy of a (rows, hidden) tensor in either pass.

The forward writes y = (x * rstd rounded to x's dtype) * (weight rounded to x's dtype), rounded to
x's dtype, as the PyTorch form computes it. The backward recomputes x * rstd and, per program, sums
its rows' weight gradients in fp32 registers; the launcher adds the programs' partial sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# elements of a block held by one program; hidden sizes above MAX_COLS run the PyTorch form
BLOCK_ELEMENTS = 8192
MAX_COLS = 32768


def block_shape(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_N, num_warps): whole rows, several of them when rows are short."""
    block_n = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(16, BLOCK_ELEMENTS // block_n))
    return block_rows, block_n, 8 if block_rows * block_n >= 4096 else 4


@triton.jit
def _fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps,
                BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    o_n = tl.arange(0, BLOCK_N)
    m_r = o_r < n_rows
    m_n = o_n < n_cols
    mask = m_r[:, None] & m_n[None, :]
    rows = o_r.to(tl.int64)
    b_x = tl.load(X + rows[:, None] * stride_x + o_n[None, :], mask=mask, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) / n_cols + eps)             # [BLOCK_ROWS]
    b_w = tl.load(W + o_n, mask=m_n, other=0.0).to(Y.dtype.element_ty).to(tl.float32)
    b_normed = (b_x * b_rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32)
    # a product of two values of x's dtype is exact in fp32: one rounding, as PyTorch's
    tl.store(Y + rows[:, None] * stride_y + o_n[None, :], (b_normed * b_w[None, :]).to(Y.dtype.element_ty),
             mask=mask)
    tl.store(RSTD + rows, b_rstd, mask=m_r)


@triton.jit
def _bwd_kernel(X, W, DY, DX, RSTD, DW, stride_x, stride_dy, stride_dx, n_rows, n_cols, rows_per_program,
                BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    # program i_p handles rows [row_start, row_end) and writes its weight-gradient sum to DW[i_p]
    i_p = tl.program_id(0)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < n_cols
    b_w = tl.load(W + o_n, mask=m_n, other=0.0).to(DX.dtype.element_ty).to(tl.float32)
    b_dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = i_p * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_ROWS):
        o_r = r0 + tl.arange(0, BLOCK_ROWS)
        m_r = o_r < row_end
        mask = m_r[:, None] & m_n[None, :]
        rows = o_r.to(tl.int64)
        b_x = tl.load(X + rows[:, None] * stride_x + o_n[None, :], mask=mask, other=0.0).to(tl.float32)
        b_dy = tl.load(DY + rows[:, None] * stride_dy + o_n[None, :], mask=mask, other=0.0).to(tl.float32)
        b_rstd = tl.load(RSTD + rows, mask=m_r, other=0.0)
        b_normed = b_x * b_rstd[:, None]
        # the forward multiplied the weight by x * rstd as rounded to x's dtype
        b_dw += tl.sum(b_dy * b_normed.to(DX.dtype.element_ty).to(tl.float32), 0)
        b_dn = b_dy * b_w[None, :]
        # d/dx of x * rstd: rstd * (dn - normed * mean(dn * normed))
        b_c = tl.sum(b_dn * b_normed, 1) / n_cols
        b_dx = b_rstd[:, None] * (b_dn - b_normed * b_c[:, None])
        tl.store(DX + rows[:, None] * stride_dx + o_n[None, :], b_dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + i_p.to(tl.int64) * n_cols + o_n, b_dw, mask=m_n)


def _programs(x: torch.Tensor) -> int:
    if x.is_cuda:
        return 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return 4   # the interpreter: a few programs, so that tests cross their row ranges


def rms_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d (rows, n) with unit column stride -> y (rows, n) in x's dtype, rstd (rows,) fp32."""
    n_rows, n_cols = x2d.shape
    y = torch.empty(x2d.shape, device=x2d.device, dtype=x2d.dtype)
    rstd = torch.empty(n_rows, device=x2d.device, dtype=torch.float32)
    block_rows, block_n, warps = block_shape(n_cols)
    _fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x2d, weight, y, rstd, x2d.stride(0), y.stride(0), n_rows, n_cols, eps,
        BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=warps)
    return y, rstd


def rms_norm_bwd(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> dx (rows, n) in x's dtype, and the weight's gradient in its dtype (or None)."""
    n_rows, n_cols = x2d.shape
    dx = torch.empty(x2d.shape, device=x2d.device, dtype=x2d.dtype)
    block_rows, block_n, warps = block_shape(n_cols)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, _programs(x2d)), block_rows) * block_rows
    programs = max(1, triton.cdiv(n_rows, rows_per_program))
    dw = torch.empty(programs, n_cols, device=x2d.device, dtype=torch.float32)
    _bwd_kernel[(programs,)](
        x2d, weight, dy2d, dx, rstd, dw, x2d.stride(0), dy2d.stride(0), dx.stride(0), n_rows, n_cols,
        rows_per_program, BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=warps)
    return dx, dw.sum(0).to(weight.dtype) if weight_grad else None
