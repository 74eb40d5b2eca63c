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
    attention (K and V have num_key_value_heads heads), named as in Hugging Face.

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
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def mixer_kwargs(self) -> dict:
        return {} if self.mixer_group is None else {"group": self.mixer_group}

    def forward(self, x, cos=None, sin=None, position_ids=None, cu_seqlens=None, max_seqlen=None):
        return self.output(self.mix(*self.project(x, cos, sin, position_ids), cu_seqlens, max_seqlen), x)
