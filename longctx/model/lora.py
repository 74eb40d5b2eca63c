"""LoRA adapters through peft on the plain model, and their export in peft's and Hugging Face's formats.

    apply_lora(model, rank=16, alpha=32, dropout=0.0, target_modules=LORA_TARGETS, trainable=("norm",))

injects peft's LoRA layers into the named projections of every decoder layer (peft's
`inject_adapter_in_model`: the model stays a longctx `Llama`, its `q_proj` now a peft `lora.Linear`
holding `base_layer`, `lora_A.default` and `lora_B.default`) and freezes every other parameter but
those of the modules named in `trainable`. It runs on the plain model, before checkpoint wrappers
and data-parallel backends, so that those see the adapters as ordinary submodules and parameters.

The state dict's names change with it (`...q_proj.weight` becomes `...q_proj.base_layer.weight`,
beside `...q_proj.lora_A.default.weight`); `plain_state` gives the state under the plain names,
with the adapters merged into the weights or left out, and `save_adapter` writes peft's adapter
folder under Hugging Face's module names, which `peft.PeftModel.from_pretrained` loads onto the
transformers model of the family (`LlamaForCausalLM`, `Qwen2ForCausalLM`, ...).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .config import ModelConfig
from .hf import hf_key

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"   # peft's adapter name: in the state dict's keys, not in peft's saved files
_ADAPTER_KEYS = (f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}.")


def lora_targets(model: nn.Module) -> list[str]:
    """The names `target_modules` may use: the linear projections inside the decoder layers. (The
    head is read through its weight by the chunked loss, so an adapter on it would never run.)"""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.layers.named_modules()
                   if isinstance(module, nn.Linear)})


def _matches(name: str, entries: Sequence[str]) -> bool:
    # peft's rule for modules_to_save, so that the adapter reloads the modules trained here
    return any(name.endswith(entry) for entry in entries)


def trainable_modules(model: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Qualified names of the modules holding parameters of their own that `trainable` selects."""
    return [name for name, module in model.named_modules()
            if name and _matches(name, trainable) and any(True for _ in module.parameters(recurse=False))]


def _check_names(model: nn.Module, target_modules: Sequence[str], trainable: Sequence[str]) -> None:
    valid = lora_targets(model)
    unknown = [t for t in target_modules if t not in valid]
    if not target_modules or unknown:
        raise ValueError(f"lora.target_modules={list(target_modules)}: {unknown or 'empty'} is not a projection "
                         f"of this model; choose among {valid}")
    for entry in trainable:
        if not trainable_modules(model, [entry]):
            owners = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if name and any(True for _ in module.parameters(recurse=False))} - set(valid))
            raise ValueError(f"lora.trainable: {entry!r} names no module of this model; choose among {owners}")


def check_lora(config: ModelConfig, rank: int, alpha: float, dropout: float,
               target_modules: Sequence[str], trainable: Sequence[str] = ()) -> None:
    """Raise ValueError (one line naming the lora.* key) for settings `apply_lora` cannot honour.
    Builds the model on the meta device only, so it costs no memory at any size."""
    if rank < 1:
        raise ValueError(f"lora.rank={rank} must be at least 1 (8 to 64 is usual)")
    if alpha <= 0:
        raise ValueError(f"lora.alpha={alpha} must be positive (the update is scaled by alpha / rank)")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora.dropout={dropout} must be in [0, 1)")
    from .llama import Llama
    with torch.device("meta"):
        model = Llama(config)
    _check_names(model, target_modules, trainable)


def lora_config(rank: int, alpha: float, dropout: float = 0.0, target_modules: Sequence[str] = LORA_TARGETS,
                trainable: Sequence[str] = (), **extra):
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      modules_to_save=list(trainable) or None, **extra)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               target_modules: Sequence[str] = LORA_TARGETS, trainable: Sequence[str] = (),
               seed: Optional[int] = None) -> nn.Module:
    """Inject LoRA adapters in place (A drawn as peft draws it, B zero: training starts from the
    base model) and leave only them and the `trainable` modules requiring gradients. Works on a
    model on the meta device too (the adapters are made there; `Llama.init_weights` fills them).

    With `seed`, A comes from the host generator seeded so, and the global one is left as it was:
    the same adapters whatever drew before (each data-parallel backend builds the base its own way)."""
    from peft import inject_adapter_in_model
    _check_names(model, target_modules, trainable)
    # peft makes the adapters on the host and then moves them to the base layer's device
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        # the modules trained in full stay ours, unwrapped: only the adapter file names them for peft
        inject_adapter_in_model(lora_config(rank, alpha, dropout, target_modules), model, adapter_name=ADAPTER)
    for name in trainable_modules(model, trainable):
        model.get_submodule(name).requires_grad_(True)
    return model


def is_adapter_key(key: str) -> bool:
    return any(part in key for part in _ADAPTER_KEYS)


def plain_state(state: dict[str, torch.Tensor], merge_scale: Optional[float]) -> dict[str, torch.Tensor]:
    """A state dict of a model with adapters under the plain model's names: each adapted weight W
    becomes W + merge_scale * B @ A (computed in fp32), or stays W with `merge_scale=None`. Done on
    the gathered state, so that merging at 8B needs no second copy of the model."""
    out = {}
    for key, value in state.items():
        if is_adapter_key(key):
            continue
        # only the weight takes B @ A: a projection's bias (Qwen2's q, k, v) is the base's, renamed
        if key.endswith(".base_layer.weight") and merge_scale is not None:
            prefix = key[:key.index(".base_layer.")]
            a, b = state[f"{prefix}.lora_A.{ADAPTER}.weight"], state[f"{prefix}.lora_B.{ADAPTER}.weight"]
            value = (value.float() + merge_scale * (b.float() @ a.float())).to(value.dtype)
        out[key.replace(".base_layer.", ".")] = value
    return out


def model_state_names(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain model's state (a Hugging Face checkpoint's) under the names of `model`, whose
    projections may carry adapters (`q_proj.weight` -> `q_proj.base_layer.weight`)."""
    renamed = {key.replace(".base_layer.", "."): key for key in model.state_dict() if ".base_layer." in key}
    return {renamed.get(key, key): value for key, value in state.items()}


def save_adapter(folder: str | os.PathLike, state: dict[str, torch.Tensor], config: ModelConfig, rank: int,
                 alpha: float, dropout: float = 0.0, target_modules: Sequence[str] = LORA_TARGETS,
                 trainable: Sequence[str] = (), base_model: Optional[str] = None) -> None:
    """Write peft's adapter folder (adapter_config.json, adapter_model.safetensors) from a gathered
    state dict: the adapters and the `trainable` modules' weights, under Hugging Face LLaMA's names
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), which
    `PeftModel.from_pretrained(LlamaForCausalLM..., folder)` loads."""
    from safetensors.torch import save_file
    trainable = list(trainable)
    if config.tie_word_embeddings and _matches("embed_tokens", trainable) and not _matches("lm_head", trainable):
        trainable.append("lm_head")   # peft's copy of a tied embedding would leave transformers' head untrained
    tensors = {}
    for key, value in state.items():
        module = key.rsplit(".", 1)[0]
        if is_adapter_key(key):
            key = key.replace(f".{ADAPTER}.", ".")
        elif not _matches(module, trainable):
            continue
        # a copy: a tied head and embedding are one tensor, which safetensors refuses to write twice
        tensors["base_model.model." + hf_key(key)] = value.detach().to("cpu", copy=True).contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora_config(rank, alpha, dropout, target_modules, trainable, task_type="CAUSAL_LM",
                base_model_name_or_path=base_model).save_pretrained(folder)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
