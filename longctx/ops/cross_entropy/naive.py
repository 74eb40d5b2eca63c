"""Cross entropy from hidden states in plain PyTorch: the definition the chunked forms are tested
against. It makes the whole (tokens, vocab) logits tensor."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx.ops.cross_entropy import IGNORE_INDEX


def cross_entropy_naive(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        reduction: str = "sum") -> torch.Tensor:
    """F.cross_entropy of the full logits `hidden @ weight.T` (in hidden's dtype) against labels,
    with IGNORE_INDEX where no loss counts. hidden (..., h), weight (V, h), labels (...)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction)
