"""The LLaMA-style model's shape, and its conversion to and from a Hugging Face config of its family
(Llama, Mistral, Qwen2, Qwen3: `families.py` holds what differs between them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .families import get_family

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

# the fields a Hugging Face config states as they are in every family (the families' differences and
# the rope settings are converted apart)
HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
             "initializer_range", "bos_token_id", "eos_token_id")
# the knobs that choose an implementation or a chunking, not the model: no checkpoint states them, a
# pretrained folder's config.json does not set them, and a resumed run may change them
IMPLEMENTATION_FIELDS = ("attention", "linear_attention", "loss_chunk_size", "mlp_chunk_size")


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
    # what the families vary (model/families.py): the checkpoint format, biases, q/k norm, window
    family: str = "llama"                   # llama | mistral | qwen2 | qwen3: the Hugging Face config it exports as
    attention_bias: bool = False            # biases on the q, k and v projections (Qwen2)
    attention_output_bias: bool = False     # a bias on the output projection (Llama/Qwen3 attention_bias=true)
    qk_norm: bool = False                   # RMSNorm over each head of q and k before the rotary embedding (Qwen3)
    sliding_window: Optional[int] = None    # refused when set: longctx trains full causal attention

    def __post_init__(self):
        get_family(self.family)
        if self.sliding_window is not None:
            raise ValueError(f"model.sliding_window={self.sliding_window} ({self.family}: a window smaller than the "
                             f"context): longctx trains full causal attention only; set model.sliding_window=null "
                             f"to train this model with full attention")
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
        attn += (q + 2 * kv) * self.attention_bias + h * self.attention_output_bias
        attn += 2 * self.head_dim * self.qk_norm
        linear = attn + h * q + q             # a linear layer adds its gate and output norm
        mlp = 3 * h * self.intermediate_size
        layers = sum((linear if self.layer_type(i) == "linear" else attn) + mlp + 2 * h
                     for i in range(self.num_hidden_layers))
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers + h + (emb if embeddings else 0)

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> "ModelConfig":
        """From a transformers config of a supported family (or its dict); unsupported settings raise."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        family = get_family(d.get("model_type", "llama"))
        differences = family.read(d)
        if differences["sliding_window"] is not None:
            raise ValueError(
                f"this {family.name} checkpoint attends within a sliding window of {differences['sliding_window']} "
                f"tokens (max_position_embeddings {d.get('max_position_embeddings')}): longctx trains full causal "
                f"attention only; to train it with full attention set sliding_window to null (Qwen2/Qwen3: "
                f"use_sliding_window to false) in its config.json")
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        rope_params = d.get("rope_parameters")  # transformers >= 5 keeps theta and scaling here
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            kind = rope_params.get("rope_type", "default")
            rope_scaling = None if kind == "default" else {k: v for k, v in rope_params.items() if k != "rope_theta"}
        names = HF_FIELDS
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        kwargs.update(rope_scaling=rope_scaling, rope_theta=rope_theta if rope_theta is not None else 10000.0)
        kwargs.update(differences, family=family.name)
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
        """The transformers config of the model's family (`LlamaConfig`, `Qwen2Config`, ...) with the rope
        settings as trained; a ValueError (one line) for what that family cannot state."""
        import transformers
        if self.layer_types is not None and "linear" in self.layer_types:
            raise ValueError("a model with linear-attention layers has no transformers equivalent; "
                             "save it with longctx's own checkpoint instead")
        family = get_family(self.family)
        family.check_exportable(self)
        d = {k: getattr(self, k) for k in HF_FIELDS + ("rope_theta",)}
        d.update(family.write(self))
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
            kind = rope.pop("type", None)
            rope["rope_type"] = self.rope_scaling.get("rope_type", kind or "default")
            rope["rope_theta"] = self.rope_theta
        d["rope_scaling"] = rope if self.rope_scaling else None
        config = getattr(transformers, family.config_class)(**d, architectures=[family.architecture])
        if hasattr(config, "rope_parameters"):
            config.rope_parameters = rope
        return config
