"""The LLaMA-style model's shape, and its conversion to and from a Hugging Face `LlamaConfig`."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

# LlamaConfig fields that change the computation and that this model does not implement.
_UNSUPPORTED = {
    "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "hidden_act": "silu",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
# per type: the keys it needs and those it may have (as transformers' rope validation lists them)
ROPE_KEYS = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},   # the original length defaults as below
             {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "dynamic": ({"factor"}, set()),
}


@dataclass
class ModelConfig:
    vocab_size: int = 128256
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None          # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[Dict[str, Any]] = None  # {"rope_type": "linear"|"llama3"|"yarn"|"dynamic", "factor": ..., ...} (model/rotary.py)
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 128000
    eos_token_id: Any = 128001
    attention: str = "auto"                 # softmax token mixer by name (model/attention.py); auto: flash on CUDA, sdpa elsewhere
    linear_attention: str = "lightning"     # linear token mixer, by name
    layer_types: Optional[List[str]] = None  # per layer "softmax" | "linear"; None: all softmax
    loss_chunk_size: int = 4096             # tokens per chunk of the seq x vocab loss
    mlp_chunk_size: int = 0                 # tokens per chunk of a blockwise, recomputed MLP (0: whole)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {"softmax", "linear"}:
                raise ValueError(f"layer_types must list 'softmax' or 'linear' for each of the "
                                 f"{self.num_hidden_layers} layers; got {self.layer_types}")
        if self.rope_scaling:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {kind!r} is not supported; use one of {ROPE_TYPES}")
            required, optional = ROPE_KEYS[kind]
            if kind == "yarn" and "original_max_position_embeddings" not in self.rope_scaling:
                # as transformers reads such a config: the model's own length is the original one
                # (over a pretrained checkpoint, from_hf puts the checkpoint's length here first)
                self.rope_scaling["original_max_position_embeddings"] = self.max_position_embeddings
            given = set(self.rope_scaling) - {"rope_type", "type", "rope_theta"}
            missing, unknown = required - given, given - required - optional
            if missing or unknown:
                raise ValueError(f"rope_scaling {kind}: " + "; ".join(
                    ([f"needs {sorted(missing)}"] if missing else []) + ([f"has unknown keys {sorted(unknown)} "
                                                                           f"(allowed: {sorted(required | optional)})"] if unknown else [])))
            factor = self.rope_scaling.get("factor")
            if factor is not None and not factor >= 1.0:
                raise ValueError(f"rope_scaling factor={factor} must be >= 1 (the context grows by it)")

    def layer_type(self, index: int) -> str:
        return "softmax" if self.layer_types is None else self.layer_types[index]

    def num_parameters(self, embeddings: bool = True) -> int:
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q * 2 + h * kv * 2
        linear = attn + h * q + q             # a linear layer adds its gate and output norm
        mlp = 3 * h * self.intermediate_size
        layers = sum((linear if self.layer_type(i) == "linear" else attn) + mlp + 2 * h
                     for i in range(self.num_hidden_layers))
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers + h + (emb if embeddings else 0)

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> "ModelConfig":
        """From a transformers `LlamaConfig` (or its dict); unsupported settings raise."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        bad = {k: d[k] for k, ok in _UNSUPPORTED.items() if k in d and d[k] not in (ok, None)}
        if bad:
            raise ValueError(f"unsupported LlamaConfig settings {bad}: longctx implements "
                             f"{ {k: v for k, v in _UNSUPPORTED.items() if k in bad} }")
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        rope_params = d.get("rope_parameters")  # transformers >= 5 keeps theta and scaling here
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            kind = rope_params.get("rope_type", "default")
            rope_scaling = None if kind == "default" else {k: v for k, v in rope_params.items() if k != "rope_theta"}
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        kwargs.update(rope_scaling=rope_scaling, rope_theta=rope_theta if rope_theta is not None else 10000.0)
        scaling = overrides.get("rope_scaling")
        if scaling and "original_max_position_embeddings" not in scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in ROPE_KEYS and "original_max_position_embeddings" in ROPE_KEYS[kind][0]:
                # scaling put on a pretrained model stretches what it was trained on: the checkpoint's
                # own length (transformers would take max_position_embeddings, maybe also overridden)
                overrides = {**overrides, "rope_scaling": {**scaling, "original_max_position_embeddings":
                                                           kwargs.get("max_position_embeddings", 8192)}}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self):
        """A transformers `LlamaConfig` with the rope settings as trained."""
        from transformers import LlamaConfig
        mine = {"attention", "linear_attention", "layer_types", "loss_chunk_size", "mlp_chunk_size"}
        d = {k: v for k, v in asdict(self).items() if k not in mine}
        if self.layer_types is not None and "linear" in self.layer_types:
            raise ValueError("a model with linear-attention layers has no transformers LlamaForCausalLM "
                             "equivalent; save it with longctx's own checkpoint instead")
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
            kind = rope.pop("type", None)
            rope["rope_type"] = self.rope_scaling.get("rope_type", kind or "default")
            rope["rope_theta"] = self.rope_theta
        d["rope_scaling"] = rope if self.rope_scaling else None
        config = LlamaConfig(**d, architectures=["LlamaForCausalLM"])
        if hasattr(config, "rope_parameters"):
            config.rope_parameters = rope
        return config
