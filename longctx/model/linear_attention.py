"""The linear-attention token mixer: lightning attention with a per-head decay (TransNormerLLM).

    q, k = silu(x W_q), silu(x W_k)           (B, S, H, D), (B, S, Hkv, D): sized as softmax attention
    v = x W_v                                 (B, S, Hkv, D)
    o = lightning(q, k, v, decay)             causal, S_t = exp(-decay_h) S_{t-1} + k_t^T v_t, o_t = q_t S_t
    out = W_o (RMSNorm(o) * sigmoid(x W_g))   the output norm and gate

The decay is fixed per head, as in TransNormerLLM and Lightning Attention: decay_h = 2^(-8 (h + 1) / H)
(ALiBi's slopes), from about 0.7 down to 1/256 per token, so heads see from a few to some thousand
tokens back. It is a buffer, not a parameter (LASP and the kernel treat it as a constant), and
stays fp32 when the model is cast to bf16. No rotary
embedding: the decay already orders the tokens, so `position_ids` is accepted and unused.

The attention function is picked by name (`config.linear_attention`): `lightning` (one device,
registered here) or a sequence-parallel one that `longctx.parallel` registers and points the layer at.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.ops.linear import lightning_attn_func

from .attention import get_linear_attention, register_linear_attention
from .config import ModelConfig
from .layers import MixerProjections, RMSNorm


@register_linear_attention("lightning")
def lightning_attention(q, k, v, decay, *, cu_seqlens=None):
    """Lightning attention on one device; packed documents of a batch > 1 are folded into one row."""
    batch, seqlen = q.shape[:2]
    if cu_seqlens is not None and batch != 1:
        flat = [x.reshape(1, batch * seqlen, *x.shape[2:]) for x in (q, k, v)]
        return lightning_attention(*flat, decay, cu_seqlens=cu_seqlens).reshape(batch, seqlen, *q.shape[2:3], v.shape[-1])
    out, _ = lightning_attn_func(q, k, v, decay, cu_seqlens=cu_seqlens)
    return out


def head_decays(num_heads: int) -> torch.Tensor:
    """The fixed per-head decay rates (H,) fp32: 2^(-8 (h + 1) / H)."""
    return torch.exp2(-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float32) / num_heads)


class LinearAttention(MixerProjections):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        h, d = config.hidden_size, config.head_dim
        self.g_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.norm = RMSNorm(self.num_heads * d, config.rms_norm_eps)
        self.register_buffer("decay", head_decays(self.num_heads), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # the decay stays fp32 when the model is cast (bf16 would round the rates by up to 0.4%)
        super()._apply(fn, *args, **kwargs)
        if self.decay.dtype != torch.float32:
            self.decay = head_decays(self.num_heads).to(self.decay.device)
        return self

    @torch.no_grad()
    def init_weights(self):
        """Recompute the decay buffer (after `to_empty` from the meta device)."""
        self.decay.copy_(head_decays(self.num_heads))

    gated_output = True   # output() gates with the mixer's input

    def project(self, x, cos=None, sin=None, position_ids=None):
        q, k, v = self.heads(x)   # with qk_norm, the feature map applies to the normalised heads
        return F.silu(q), F.silu(k), v

    def mix(self, q, k, v, cu_seqlens=None, max_seqlen=None):
        mixer = get_linear_attention(self.sequence_mixer or self.config.linear_attention)
        out = mixer(q, k, v, self.decay, cu_seqlens=cu_seqlens, **self.mixer_kwargs())
        return out.flatten(2)

    def output(self, out, x):
        return self.o_proj(self.norm(out) * torch.sigmoid(self.g_proj(x)))
