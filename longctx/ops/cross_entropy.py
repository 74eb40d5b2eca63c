"""Cross entropy straight from hidden states, one chunk of the sequence at a time.

At long context the logits are the largest tensor of a step (128K tokens x 128K vocab in fp32 is
64 GiB), so they never exist whole: each chunk's logits are made, turned into its loss and its
gradients with respect to the hidden states and the output weight, and dropped. The gradients
are computed in the forward (the loss is a scalar, so the backward only scales them), which saves
recomputing the logits.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        # hidden [N, h]; weight [V, h]; labels [N]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # the three matmuls run in the autocast dtype when autocast is on (an fp32 matmul of the
        # vocab-sized weight gradient costs more than the rest of a short step), else in the
        # inputs' dtype; softmax, loss and the weight gradient accumulate in fp32 (fp64 for fp64)
        device_type = hidden.device.type
        mm_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                    else hidden.dtype)
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        w = weight.to(mm_dtype)
        loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if needs_grad else None
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size].to(mm_dtype)
                y = labels[start:start + chunk_size]
                valid = y != IGNORE_INDEX
                target = torch.where(valid, y, 0)
                logits = (h @ w.T).to(acc_dtype)                                  # [n, V]
                lse = torch.logsumexp(logits, dim=-1)
                loss_sum += ((lse - logits.gather(1, target[:, None])[:, 0]) * valid).sum()
                if needs_grad:
                    # d(sum of losses)/d(logits) = softmax - onehot, on valid rows only, made in
                    # the fp32 logits' memory, which goes once the matmuls' copy exists
                    grad_logits = torch.exp_(logits.sub_(lse[:, None]))
                    del logits
                    grad_logits[torch.arange(len(y), device=y.device), target] -= 1.0
                    grad_logits = grad_logits.mul_(valid[:, None]).to(mm_dtype)
                    grad_hidden[start:start + chunk_size] = (grad_logits @ w).to(hidden.dtype)
                    if mm_dtype == acc_dtype:
                        grad_weight.addmm_(grad_logits.T, h)
                    else:
                        grad_weight += grad_logits.T @ h
                    del grad_logits
                else:
                    del logits   # a chunk's logits go before the next chunk's are made
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype),
                (grad_weight * grad_loss).to(ctx.weight_dtype), None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 4096, reduction: str = "sum") -> torch.Tensor:
    """Cross entropy of `hidden @ weight.T` against `labels`, without the whole logits tensor.

    hidden (..., h), weight (V, h), labels (...) with IGNORE_INDEX (-100) where no loss counts.
    reduction "sum" (the sum over valid tokens, fp32) or "mean" (over valid tokens; nan if none).
    Labels are used as given: shift them before calling.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must agree "
                         "on every dimension but the last")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    flat_labels = labels.reshape(-1)
    loss = _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat_labels, chunk_size)
    if reduction == "mean":
        loss = loss / (flat_labels != IGNORE_INDEX).sum()
    return loss
