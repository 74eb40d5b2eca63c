"""The model families longctx loads and writes: one record per Hugging Face `model_type`.

Llama, Mistral, Qwen2 (Qwen2.5) and Qwen3 are one decoder (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU) that differs in a few fields of `ModelConfig`:

    family    q/k/v bias         o bias             q/k norm   head_dim       sliding window
    llama     attention_bias     attention_bias     -          explicit       -
    mistral   -                  -                  -          explicit       sliding_window (v0.1)
    qwen2     always             -                  -          hidden/heads   use_sliding_window, max_window_layers
    qwen3     attention_bias     attention_bias     always     explicit       use_sliding_window, max_window_layers

Each record says how its config.json states those fields (read by `ModelConfig.from_hf`, written by
`ModelConfig.to_hf` into the family's own config class, so that transformers loads the export as
that family) and which settings its architecture fixes. The weights need no per-family renaming:
the extra tensors (q/k/v biases, `self_attn.q_norm`, `self_attn.k_norm`) carry Hugging Face's
names in the model as built from the config, and `hf.check_state_dict` checks them like the rest.

A sliding window in effect (Mistral v0.1's 4096 within 32K positions, Qwen2 with
`use_sliding_window`) is kept in `ModelConfig.sliding_window`, which refuses it: longctx trains full
causal attention. A window as long as the context, or switched off, is not in effect and loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# settings of a config.json that change the computation, with the only value longctx implements
_COMMON_UNSUPPORTED = {"hidden_act": "silu", "mlp_bias": False, "pretraining_tp": 1}


@dataclass(frozen=True)
class Family:
    name: str                          # ModelConfig.family, and the config.json's model_type
    config_class: str                  # the transformers config class to_hf writes
    architecture: str                  # the transformers model class that loads the export
    bias_key: Optional[str]            # config.json key that switches q/k/v AND o biases on (None: fixed)
    fixed: dict = field(default_factory=dict)   # ModelConfig fields the architecture fixes
    explicit_head_dim: bool = True     # the config class has a head_dim field (else hidden / heads)
    sliding: str = "none"              # how config.json states a window: none | mistral | qwen2

    def read(self, hf: dict) -> dict:
        """The ModelConfig fields of this family's differences, from a config.json's dict."""
        bad = {k: hf[k] for k, ok in _COMMON_UNSUPPORTED.items() if hf.get(k) not in (ok, None)}
        if bad:
            raise ValueError(f"{self.name} config settings {bad} are not implemented by longctx "
                             f"(it implements {({k: _COMMON_UNSUPPORTED[k] for k in bad})})")
        fields = dict(self.fixed)
        if self.bias_key is not None:
            bias = bool(hf.get(self.bias_key) or False)
            fields.update(attention_bias=bias, attention_output_bias=bias)
        fields["sliding_window"] = self.window_in_effect(hf)
        return fields

    def window_in_effect(self, hf: dict) -> Optional[int]:
        """The sliding window some layer attends within, or None when every layer sees the whole
        context (no window, switched off, or at least as long as max_position_embeddings)."""
        window = hf.get("sliding_window")
        if self.sliding == "none" or window is None:
            return None
        if self.sliding == "qwen2":
            layers = hf.get("layer_types")   # transformers >= 4.54 lists each layer's kind
            if layers is not None:
                windowed = "sliding_attention" in layers
            else:
                windowed = bool(hf.get("use_sliding_window")) and \
                    (hf.get("max_window_layers") or 0) < hf["num_hidden_layers"]
            if not hf.get("use_sliding_window") or not windowed:
                return None
        return window if window < hf.get("max_position_embeddings", window + 1) else None

    def problem(self, config) -> Optional[str]:
        """Why this family's checkpoint cannot state the ModelConfig `config` (None: it can)."""
        for name, value in self.fixed.items():
            if getattr(config, name) != value:
                return f"{self.name} checkpoints have {name}={value}, not model.{name}={getattr(config, name)}"
        if self.bias_key is not None and config.attention_bias != config.attention_output_bias:
            return (f"{self.name} switches the q/k/v and output biases together ({self.bias_key}), not "
                    f"model.attention_bias={config.attention_bias} with "
                    f"model.attention_output_bias={config.attention_output_bias}")
        if self.bias_key is None and "attention_bias" not in self.fixed and \
                (config.attention_bias or config.attention_output_bias):
            return f"{self.name} has no attention biases"
        if not config.qk_norm == self.fixed.get("qk_norm", False):
            return f"{self.name} has no q/k norm"
        if not self.explicit_head_dim and config.head_dim != config.hidden_size // config.num_attention_heads:
            return (f"{self.name} checkpoints have head_dim = hidden_size / num_attention_heads "
                    f"({config.hidden_size // config.num_attention_heads}), not model.head_dim={config.head_dim}")
        return None

    def check_exportable(self, config) -> None:
        """Raise a one-line ValueError for a ModelConfig this family's checkpoint cannot state."""
        why = self.problem(config)
        if why is not None:
            fits = [f.name for f in FAMILIES.values() if f.problem(config) is None]
            hint = f"set model.family={' or '.join(fits)}" if fits else "no supported family has this combination"
            raise ValueError(f"model.family={self.name} cannot be exported as a Hugging Face checkpoint: "
                             f"{why}; {hint}")

    def write(self, config) -> dict:
        """The family's own config.json fields beside the common ones (after check_exportable)."""
        out: dict[str, Any] = {}
        if self.bias_key is not None:
            out[self.bias_key] = config.attention_bias
        if self.explicit_head_dim:
            out["head_dim"] = config.head_dim
        if self.name == "llama":
            out["mlp_bias"] = False
        if self.sliding == "mistral":
            out["sliding_window"] = None
        elif self.sliding == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
        return out


FAMILIES = {f.name: f for f in (
    Family("llama", "LlamaConfig", "LlamaForCausalLM", bias_key="attention_bias"),
    Family("mistral", "MistralConfig", "MistralForCausalLM", bias_key=None, sliding="mistral"),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", bias_key=None,
           fixed={"attention_bias": True, "attention_output_bias": False}, explicit_head_dim=False,
           sliding="qwen2"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", bias_key="attention_bias", fixed={"qk_norm": True},
           sliding="qwen2"),
)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not a supported family: longctx loads and writes "
                         f"{', '.join(FAMILIES)} checkpoints")
    return FAMILIES[name]
