"""Rotary position embeddings, with the scalings used to extend a model's context.

`rope_scaling` types, each computed as transformers' `modeling_rope_utils` computes it (so that an
exported model gives transformers' logits):
- "linear" (Position Interpolation, Chen et al. 2023): every frequency divided by `factor`.
- "llama3" (Llama 3.1): long wavelengths divided by `factor`, short ones kept, smooth in between.
- "yarn" (Peng et al. 2023): per dimension, interpolation (divided by `factor`) for wavelengths
  longer than the original context / `beta_slow` rotations, extrapolation (kept) for those that
  turn more than `beta_fast` times in it, a linear ramp between; and cos/sin scaled by the
  attention factor 0.1 ln(factor) + 1 (or as `attention_factor` / `mscale` / `mscale_all_dim`
  say), which sharpens the softmax that the longer context flattens.
- "dynamic" (dynamic NTK, /u/emozilla): no change up to max_position_embeddings; beyond, the base
  grows with the current length L: theta * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2)).
  L is the forward's largest position + 1 (over the sequence-parallel group when split), so the
  frequencies follow the longest document in a step. Training at a fixed length L > max_pos
  therefore trains one set of frequencies, those of L, while inference at another length uses
  others: dynamic NTK is an inference-time extension, and a model finetuned with it is
  finetuned for length L only (YaRN or linear give every length the same frequencies).
  transformers caches the frequencies of the longest sequence seen until a sequence shorter than
  max_pos resets them; longctx recomputes them per forward, which is the same for one forward and
  for greedy decoding (lengths only grow).
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def rope_type(config: ModelConfig) -> str:
    scaling = config.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _default_inv_freq(base, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(config: ModelConfig, seq_len: int | torch.Tensor | None = None) -> torch.Tensor:
    """The inverse frequencies (head_dim / 2,) in fp32, after the configured scaling. `seq_len`
    matters only to "dynamic" (None: max_position_embeddings, i.e. unscaled)."""
    dim = config.head_dim
    inv_freq = _default_inv_freq(config.rope_theta, dim)
    scaling = config.rope_scaling or {}
    kind = rope_type(config)
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
    if kind == "yarn":
        return _yarn_inv_freq(config, dim)
    if kind == "dynamic":
        return _dynamic_inv_freq(config, dim, seq_len)
    return inv_freq


def _yarn_inv_freq(config: ModelConfig, dim: int) -> torch.Tensor:
    scaling = config.rope_scaling
    base, factor = config.rope_theta, scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension_of(rotations):   # the dimension that turns `rotations` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001   # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp           # 1: keep the dimension's frequency, 0: interpolate it
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _dynamic_inv_freq(config: ModelConfig, dim: int, seq_len) -> torch.Tensor:
    limit = config.max_position_embeddings
    if seq_len is None:
        seq_len = limit
    if isinstance(seq_len, torch.Tensor):
        seq_len = torch.maximum(seq_len.cpu(), torch.tensor(limit, dtype=seq_len.dtype))
    else:
        seq_len = torch.tensor(max(int(seq_len), limit))   # a tensor, as transformers: its float32 arithmetic
    factor = config.rope_scaling["factor"]
    base = config.rope_theta * ((factor * seq_len / limit) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim)


def rope_attention_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by (so q.k by its square): YaRN's attention factor, else 1."""
    if rope_type(config) != "yarn":
        return 1.0
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]

    def mscale_of(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
    return mscale_of(factor)


def rotary_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype,
                   attention_factor: float = 1.0):
    """cos and sin (B, S, 1, head_dim) for the given positions, computed in fp32 (and scaled by
    `attention_factor` there, as transformers does, before the cast)."""
    freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)   # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]               # [B, S, 1, D]
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)
