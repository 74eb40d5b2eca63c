"""Rotary position embeddings, with the scalings used to extend a model's context."""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """The inverse frequencies (head_dim / 2,) in fp32, after the configured scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":  # position interpolation: positions divided by the factor
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # Llama 3.1: long wavelengths scaled, short kept, smooth in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = original / low, original / high
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(between, smoothed, scaled)
    return inv_freq


def rotary_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin (B, S, 1, head_dim) for the given positions, computed in fp32."""
    freqs = position_ids[..., None].float() * inv_freq.float()          # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]               # [B, S, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)

