"""The LLaMA-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Parameter names follow Hugging Face's `LlamaForCausalLM` without its `model.` prefix, so that
checkpoint conversion (`hf.py`) is a rename. The token mixer of each layer is picked by name from
the registry in `attention.py`; the model never imports parallel code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from longctx.ops.cross_entropy import IGNORE_INDEX, chunked_cross_entropy
from longctx.ops.rotary import apply_rotary
from longctx.ops.swiglu import silu_mul

from longctx.ops.attention import backends as seam

from .attention import document_bounds, get_attention, is_registered, softmax_attention
from .config import ModelConfig
from .layers import MixerProjections, RMSNorm
from .linear_attention import LinearAttention
from .rotary import rope_attention_factor, rope_inv_freq, rope_type, rotary_cos_sin


@dataclass
class CausalLMOutput:
    logits: Optional[torch.Tensor] = None   # (B, S, V) when no labels are given
    loss: Optional[torch.Tensor] = None     # with labels: mean (or sum) over labels != -100


# Code that walks a module's output with pytree finds the tensors inside: FSDP2 before torch 2.14
# hooks its pre-backward all-gather onto the tensors `tree_flatten` yields, and an unregistered
# dataclass is a leaf to it.
pytree.register_dataclass(CausalLMOutput)

class Attention(MixerProjections):
    """Grouped-query softmax attention with rotary embeddings (q and k rotated in `project`, after the
    per-head q/k norm of Qwen3 where the config has one)."""

    def project(self, x, cos, sin, position_ids=None):
        q, k, v = self.heads(x)   # q and k normalised per head first (Qwen3), as transformers does
        q, k = apply_rotary(q, k, cos, sin)   # in place: the projections' outputs are not kept unrotated
        return q, k, v

    def mix(self, q, k, v, cu_seqlens, max_seqlen):
        scale = self.config.head_dim ** -0.5
        name = self.config.attention
        if self.sequence_mixer is not None:   # a sequence-parallel method's mixer, on the user's backend
            out = get_attention(self.sequence_mixer)(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                                     softmax_scale=scale, backend=name, **self.mixer_kwargs())
        elif is_registered(name):             # a mixer registered under this name (tests' spies)
            out = get_attention(name)(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, softmax_scale=scale,
                                      **self.mixer_kwargs())
        else:                                 # a backend of the seam (longctx.ops.attention.backends)
            out = softmax_attention(q, k, v, backend=name, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                    softmax_scale=scale)
        return out.flatten(2)

    def output(self, out, x):
        return self.o_proj(out)


def resolve_attention(name: str, q: torch.Tensor, k: torch.Tensor | None = None, causal: bool = True,
                      varlen: bool = False) -> str:
    """The backend `name` runs for queries like q (..., H, D) (and keys like k): "auto" and the
    aliases resolved by the seam (`longctx.ops.attention.backends.select`); a registered mixer's
    name as it is. A q that is not (..., H, D) floating point (a device probe, token ids) is taken
    as bf16 heads of 128 on its device."""
    if is_registered(name):
        return name
    if q.dim() < 3 or not q.is_floating_point():
        return seam.select(name, device=q.device, dtype=torch.bfloat16, head_dim=128, causal=causal,
                           varlen=varlen).name
    return seam.select_for(name, q, q if k is None else k, causal=causal, varlen=varlen).name


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).

    With `config.mlp_chunk_size` > 0 it runs blockwise over the sequence (as in Blockwise
    Parallel Transformers): each chunk is recomputed in the backward, so the seq x intermediate
    tensors exist one chunk at a time in both passes, for a third more MLP forward FLOPs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.chunk_size = config.mlp_chunk_size
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def swiglu(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))

    def forward(self, x):
        seqlen = x.shape[1]
        if self.chunk_size <= 0 or seqlen <= self.chunk_size:
            return self.swiglu(x)
        chunks = [checkpoint(self.swiglu, piece, use_reentrant=False)
                  for piece in x.split(self.chunk_size, dim=1)]
        return torch.cat(chunks, dim=1)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.self_attn = LinearAttention(config) if config.layer_type(index) == "linear" else Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # selective activation checkpointing (set by longctx.parallel's apply_activation_checkpointing):
        # everything but the token mixer is recomputed in the backward; the mixer's own saved
        # tensors (q, k, v, its output and log-sum-exp), expensive to recompute, are kept
        self.recompute_around_mixer = False

    def before_mixer(self, x, cos, sin, position_ids):
        return self.self_attn.project(self.input_layernorm(x), cos, sin, position_ids)

    def after_mixer(self, x, out):
        gate_input = self.input_layernorm(x) if self.self_attn.gated_output else None
        x = x + self.self_attn.output(out, gate_input)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, cos, sin, position_ids, cu_seqlens, max_seqlen):
        if not self.recompute_around_mixer or not torch.is_grad_enabled():
            q, k, v = self.before_mixer(x, cos, sin, position_ids)
            return self.after_mixer(x, self.self_attn.mix(q, k, v, cu_seqlens, max_seqlen))
        q, k, v = checkpoint(self.before_mixer, x, cos, sin, position_ids, use_reentrant=False)
        out = self.self_attn.mix(q, k, v, cu_seqlens, max_seqlen)
        return checkpoint(self.after_mixer, x, out, use_reentrant=False)


def longest_document(cu_seqlens: torch.Tensor) -> int:
    """The longest document of cu_seqlens (a GPU tensor not made by with_host_bounds is read back)."""
    bounds = document_bounds(cu_seqlens)
    return max((b - a for a, b in zip(bounds, bounds[1:])), default=0)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Position ids (B, S) restarting at 0 at every document start of the flattened sequence."""
    total = shape[0] * shape[1]
    index = torch.arange(total, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].long()
    doc = torch.searchsorted(starts, index, right=True) - 1
    return (index - starts[doc]).view(shape)


class Llama(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # grouped activation checkpointing (set by longctx.parallel): modules that each run a group of
        # consecutive layers, outside the registered tree so that the parameters keep their names
        self.layer_groups = None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.init_weights()

    def tie_weights(self):
        """Share the output and input embeddings if configured (again after `to_empty`, which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self):
        """Random initialisation (also used to materialise a model built on the meta device)."""
        self.inv_freq.copy_(rope_inv_freq(self.config))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.config.initializer_range)
                if getattr(module, "bias", None) is not None:   # q/k/v biases (Qwen2) start at 0, as in transformers
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif module is not self and hasattr(module, "init_weights"):
                module.init_weights()
        for module in self.modules():
            # LoRA adapters (peft, longctx.model.lora), drawn above as the plain linears they are:
            # peft's own initialisation, B zero, so that the adapted model starts as the base
            if hasattr(module, "reset_lora_parameters"):
                for adapter in module.lora_A:
                    module.reset_lora_parameters(adapter, True)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos and sin (B, S, 1, head_dim) of the positions under the configured rope scaling. Dynamic
        NTK's frequencies follow the largest position of this forward (of the whole sequence when a
        sequence-parallel method split it: the ranks agree on it)."""
        inv_freq = self.inv_freq
        if rope_type(self.config) == "dynamic":
            length = position_ids.max() + 1
            dims = getattr(self, "sequence_dims", None)
            group = getattr(dims, "sp_group", None) if dims is not None and dims.method is not None else None
            if group is not None and torch.distributed.is_initialized():
                torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX, group=group)
            if int(length) > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, length)
        return rotary_cos_sin(inv_freq, position_ids, dtype, rope_attention_factor(self.config))

    def hidden_states(self, input_ids, position_ids=None, cu_seqlens=None):
        """The final-norm hidden states (B, S, hidden). A GPU `cu_seqlens` is read back once to
        size the attention grid, unless it was moved there by `attention.with_host_bounds`."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, input_ids.shape)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        elif position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must have input_ids' shape "
                             f"{tuple(input_ids.shape)}")
        if cu_seqlens is not None and cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
        max_seqlen = None if cu_seqlens is None else longest_document(cu_seqlens)
        x = self.embed_tokens(input_ids)
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in the autocast dtype, as in a bf16 model: half the memory and
            # traffic of fp32 for the norms, residual adds and checkpointed layer inputs
            x = x.to(torch.get_autocast_dtype(x.device.type))
        cos, sin = self.rotary(position_ids, x.dtype)
        for run in self.layer_groups or self.layers:
            x = run(x, cos, sin, position_ids, cu_seqlens, max_seqlen)
        return self.norm(x)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, labels=None, *,
                labels_shifted: bool = False, loss_reduction: str = "mean") -> CausalLMOutput:
        """Logits without labels; the loss with labels (aligned with input_ids and shifted here,
        as in transformers, unless `labels_shifted`). `loss_reduction="sum"` returns the sum over
        valid tokens, for a caller that divides by a global token count."""
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(hidden))
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
        if not labels_shifted:
            labels = shift_labels(labels)
        loss = chunked_cross_entropy(hidden, self.lm_head.weight, labels,
                                     chunk_size=self.config.loss_chunk_size, reduction=loss_reduction)
        return CausalLMOutput(loss=loss)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Token t is scored against labels[t + 1]; the last position gets IGNORE_INDEX."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
