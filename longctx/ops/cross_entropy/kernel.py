"""A chunk's cross entropy from its logits in Triton: per-row losses, and the logits' gradient
written over the logits, with no fp32 copy of the (rows, vocab) tensor.

PyTorch needs about eight passes over an fp32 copy of the logits for the same work (the copy,
logsumexp, gather, subtract, exp, the one-hot subtraction, the mask, the cast back): at 4096 rows
and vocab 128256 that is a 2 GiB temporary and ~70 ms of an H100 step. Here each row is read
twice (once for its logsumexp, once to turn it into softmax - onehot) and written once, in the
logits' own dtype.

Labels must lie in [0, V) or equal the ignore index: checking that would cost a GPU->CPU sync
per chunk, so the kernel does not raise; it never reads outside a row, and a row whose label is
out of range gets a NaN loss and a NaN gradient, which shows in the loss.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns streamed per step on a GPU. Untuned: 4096 with 8 warps (16 elements a thread) is a
# usual choice for a memory-bound row reduction; 8192 with 16 warps is the other candidate.
BLOCK_V = 4096
# Under the interpreter (tests on a CPU) blocks are small, so that short rows span several.
INTERPRETER_BLOCK_V = 256


@triton.jit
def _loss_and_grad_kernel(LOGITS, LABELS, LOSS, stride_row, n_cols, ignore_index,
                          WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # one program per row; rows * vocab passes 2^31, so the row offset is int64
    i_r = tl.program_id(0)
    p_row = LOGITS + i_r.to(tl.int64) * stride_row
    label = tl.load(LABELS + i_r).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < n_cols)
    o_v = tl.arange(0, BLOCK_V)

    # pass 1: running max and sum of exp(x - max) in fp32; an ignored row reads nothing
    n_read = tl.where(valid, n_cols, 0)
    b_max = float("-inf")
    b_sum = 0.0
    for start in range(0, n_read, BLOCK_V):
        o_c = start + o_v
        b_x = tl.load(p_row + o_c, mask=o_c < n_cols, other=float("-inf")).to(tl.float32)   # [BLOCK_V]
        b_new_max = tl.maximum(b_max, tl.max(b_x, 0))
        b_sum = b_sum * tl.exp(b_max - b_new_max) + tl.sum(tl.exp(b_x - b_new_max), 0)
        b_max = b_new_max
    # ignored rows (max -inf, sum 0) get lse 0, which only feeds values thrown away below
    b_lse = tl.where(valid, b_max, 0.0) + tl.log(tl.where(valid, b_sum, 1.0))
    # the label's logit, read before pass 2 overwrites it; never outside the row
    b_x_label = tl.load(p_row + tl.where(in_range, label, 0), mask=valid & in_range, other=0.0).to(tl.float32)
    b_loss = tl.where(in_range, b_lse - b_x_label, float("nan"))
    tl.store(LOSS + i_r, tl.where(valid, b_loss, 0.0))

    if WITH_GRAD:
        # pass 2: d(sum of losses)/d(logits) = softmax - onehot, rounded once to the logits' dtype;
        # zeros on ignored rows, NaN on rows whose label is out of range
        b_fill = tl.where(valid, float("nan"), 0.0)
        keep = valid & in_range
        for start in range(0, n_cols, BLOCK_V):
            o_c = start + o_v
            m_c = o_c < n_cols
            b_x = tl.load(p_row + o_c, mask=m_c & keep, other=0.0).to(tl.float32)            # [BLOCK_V]
            b_grad = tl.exp(b_x - b_lse) - tl.where(o_c == label, 1.0, 0.0)
            tl.store(p_row + o_c, tl.where(keep, b_grad, b_fill).to(LOGITS.dtype.element_ty), mask=m_c)


def block_shape(n_cols: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of n_cols logits."""
    block_v = min(BLOCK_V if on_gpu else INTERPRETER_BLOCK_V, triton.next_power_of_2(n_cols))
    return block_v, 8 if block_v >= 4096 else 4


def logits_loss_and_grad_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, with_grad: bool,
                          block_v: int | None = None) -> torch.Tensor:
    """Per-row cross entropy of logits (n, V) against labels (n,); with `with_grad`, overwrites the
    logits with d(sum of the losses)/d(logits) = softmax - onehot(label).

    logits: fp16/bf16/fp32 with unit column stride. labels: integers in [0, V) or `ignore_index`
    (not checked: see the module docstring). Returns the losses, fp32 (n,): lse - logits[label],
    0 where the label is `ignore_index`. `block_v` (a power of two) overrides the block width."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be (rows, vocab) with unit column stride, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the cross-entropy kernel takes fp16/bf16/fp32 logits, got {logits.dtype}")
    if labels.shape != logits.shape[:1] or labels.device != logits.device:
        raise ValueError(f"labels must be ({logits.shape[0]},) on {logits.device}, got {tuple(labels.shape)} "
                         f"on {labels.device}")
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    if n_rows == 0:
        return loss
    block, warps = block_shape(n_cols, logits.is_cuda)
    if block_v is not None:
        block = block_v
    _loss_and_grad_kernel[(n_rows,)](
        logits, labels.contiguous(), loss, logits.stride(0), n_cols, ignore_index,
        WITH_GRAD=with_grad, BLOCK_V=block, num_warps=warps)
    return loss
