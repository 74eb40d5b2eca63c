"""The pieces both kinds of token mixer are built from: RMSNorm and the q, k, v, o projections.

Their own module, so that `llama.py` (the decoder, softmax attention) and `linear_attention.py`
(the linear mixer) both import them and neither imports the other's layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from longctx.ops.rms_norm import rms_norm

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # statistics in fp32; the output in the input's dtype (under autocast the fp32 weight
        # must not promote the bf16 residual stream back to fp32); only x and a scale per row
        # are kept for the backward
        return rms_norm(x, self.weight, self.eps)


class MixerProjections(nn.Module):
    """The query, key, value and output projections of a token mixer, sized for grouped-query
    attention (K and V have num_key_value_heads heads), named as in Hugging Face: with the family's
    biases (`attention_bias` on q, k, v; `attention_output_bias` on o) and, with `qk_norm`, the
    per-head RMSNorms `q_norm` and `k_norm` (Qwen3), which `heads` applies.

    A mixer runs in three steps (selective checkpointing keeps only what `mix` saves):
    `project(x, cos, sin, position_ids)` -> q, k, v; `mix(q, k, v, cu_seqlens, max_seqlen)` -> out;
    `output(out, x)`, where x (the mixer's input) is read only if `gated_output`.

    `mixer_group`: None, or the process group(s) a sequence-parallel mixer runs over, passed to
    it as `group=`; `sequence_mixer`: None, or the name of that method's mixer for this layer
    (both set by `longctx.parallel`'s apply_sequence_parallel; the config keeps the user's choice)."""

    gated_output = False
    mixer_group = None
    sequence_mixer = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.attention_output_bias)
        # one weight per head dim, shared by the heads: the same on any subset of heads, so a method
        # that splits heads over ranks (Ulysses) may normalise before or after its all-to-all
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None

    def heads(self, x):
        """q (B, S, H, D) and k, v (B, S, Hkv, D) of x (B, S, hidden); q and k normalised per head with
        qk_norm. q and k are fresh tensors the caller may overwrite (the rotary embedding does)."""
        batch, seqlen, _ = x.shape
        d = self.config.head_dim
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, d)
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, d)
        return q, k, v

    def mixer_kwargs(self) -> dict:
        return {} if self.mixer_group is None else {"group": self.mixer_group}

    def forward(self, x, cos=None, sin=None, position_ids=None, cu_seqlens=None, max_seqlen=None):
        return self.output(self.mix(*self.project(x, cos, sin, position_ids), cu_seqlens, max_seqlen), x)
