"""Single-device math: Triton kernels, each beside a plain-PyTorch reference. No torch.distributed here."""
