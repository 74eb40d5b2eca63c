"""RMSNorm in plain PyTorch: the definition the kernel and the lean autograd form are tested against."""
from __future__ import annotations

import torch


def rms_norm_naive(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) as Hugging Face's LlamaRMSNorm computes it: statistics in
    fp32 (fp64 stays fp64), the product with the weight in x's dtype. Autograd keeps the fp32 copy
    of x and the normalised tensor (12 bytes per element at bf16)."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight.to(x.dtype) * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
