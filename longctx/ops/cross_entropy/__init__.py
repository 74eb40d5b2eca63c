"""Cross entropy straight from hidden states, one chunk of the sequence at a time.

At long context the logits are the largest tensor of a step (128K tokens x 128K vocab in fp32 is
64 GiB), so they never exist whole: each chunk's logits are made, turned into its loss and its
gradients with respect to the hidden states and the output weight, and dropped. The gradients
are computed in the forward (the loss is a scalar, so the backward only scales them), which saves
recomputing the logits.

On CUDA the Triton kernel (`kernel.py`) turns a chunk's logits into its losses and, in place,
into their gradient, in the matmul's dtype: two reads and one write of the logits. Elsewhere (and
for fp64) PyTorch does it on an fp32 copy of the chunk's logits, in about eight passes over that
copy (at 4096 rows x vocab 128256: a 2 GiB temporary, ~70 ms of an H100 step). `naive.py` holds
the plain definition the tests compare both with.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import use_kernel
from .kernel import logits_loss_and_grad_

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy"]

IGNORE_INDEX = -100


def _use_kernel(mm_dtype: torch.dtype, device: torch.device, kernel: Optional[bool]) -> bool:
    supported = mm_dtype in (torch.float16, torch.bfloat16, torch.float32)
    return use_kernel("cross-entropy", device, supported, kernel, f"fp16/bf16/fp32 logits, got {mm_dtype}")


def _loss_and_grad_logits_torch(h, w, labels, acc_dtype, mm_dtype, needs_grad):
    """A chunk's summed loss and, if wanted, d(loss)/d(logits) in mm_dtype, on an fp32 (fp64 for
    fp64) copy of its logits."""
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)
    logits = (h @ w.T).to(acc_dtype)                                          # [n, V]
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, target[:, None])[:, 0]) * valid).sum()
    if not needs_grad:
        return loss, None
    # d(sum of losses)/d(logits) = softmax - onehot, on valid rows only, made in the wide logits'
    # memory, which goes once the matmuls' copy exists
    grad_logits = torch.exp_(logits.sub_(lse[:, None]))
    del logits
    grad_logits[torch.arange(len(labels), device=labels.device), target] -= 1.0
    return loss, grad_logits.mul_(valid[:, None]).to(mm_dtype)


def _loss_and_grad_logits_kernel(h, w, labels, needs_grad):
    """The same with the Triton kernel: the logits stay in mm_dtype and become their gradient."""
    logits = h @ w.T                                                          # [n, V]
    loss_rows = logits_loss_and_grad_(logits, labels, IGNORE_INDEX, with_grad=needs_grad)
    return loss_rows.sum(), logits if needs_grad else None


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, mm_dtype, kernel):
        # hidden [N, h]; weight [V, h]; labels [N]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # the three matmuls run in mm_dtype (see chunked_cross_entropy); softmax, loss and the
        # weight gradient accumulate in fp32 (fp64 for fp64)
        device_type = hidden.device.type
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        w = weight.to(mm_dtype)
        loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if needs_grad else None
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size].to(mm_dtype)
                y = labels[start:start + chunk_size]
                if kernel:
                    loss, grad_logits = _loss_and_grad_logits_kernel(h, w, y, needs_grad)
                else:
                    loss, grad_logits = _loss_and_grad_logits_torch(h, w, y, acc_dtype, mm_dtype, needs_grad)
                loss_sum += loss
                if needs_grad:
                    grad_hidden[start:start + chunk_size] = (grad_logits @ w).to(hidden.dtype)
                    if mm_dtype == acc_dtype:
                        grad_weight.addmm_(grad_logits.T, h)
                    else:
                        grad_weight += grad_logits.T @ h
                # a chunk's logits (or their gradient) go before the next chunk's are made
                del grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype),
                (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 4096, reduction: str = "sum",
                          kernel: Optional[bool] = None) -> torch.Tensor:
    """Cross entropy of `hidden @ weight.T` against `labels`, without the whole logits tensor.

    hidden (..., h), weight (V, h), labels (...) on hidden's device, each in [0, V) or
    IGNORE_INDEX (-100) where no loss counts. reduction "sum" (the sum over valid tokens, fp32) or
    "mean" (over valid tokens; nan if none). Labels are used as given: shift them before calling.

    The matmuls run in the autocast dtype when autocast is on (an fp32 matmul of the vocab-sized
    weight gradient costs more than the rest of a short step), else in hidden's dtype; the logits
    come out in that dtype. `kernel`: None runs the Triton kernel on the logits on CUDA (fp16,
    bf16, fp32) and PyTorch elsewhere and for fp64; True insists on the kernel (on a CPU only
    under TRITON_INTERPRET=1, for tests); False runs PyTorch. A label outside [0, V) other than
    IGNORE_INDEX is an error in PyTorch; the kernel cannot check it without a sync and gives
    that token a NaN loss instead.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must agree "
                         "on every dimension but the last")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    device_type = hidden.device.type
    mm_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                else hidden.dtype)
    flat_labels = labels.reshape(-1)
    loss = _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat_labels, chunk_size,
                                      mm_dtype, _use_kernel(mm_dtype, hidden.device, kernel))
    if reduction == "mean":
        loss = loss / (flat_labels != IGNORE_INDEX).sum()
    return loss
