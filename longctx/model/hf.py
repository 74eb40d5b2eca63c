"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 (Qwen2.5) and Qwen3 (`families.py`).

A checkpoint folder is `config.json` plus safetensors weights (one file, or shards listed in
`model.safetensors.index.json`). Our parameter names are Hugging Face's without the `model.`
prefix (the `lm_head` is top level in both), so conversion is a rename; unknown, missing or
mis-shaped keys raise an error that names them.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig
from .families import FAMILIES
from .llama import Llama


def hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def our_key(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def load_hf_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    from transformers import AutoConfig
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face checkpoint folder: no config.json in it")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{folder}: model_type {model_type!r} is not supported; longctx loads "
                         f"{', '.join(FAMILIES)} checkpoints (model/families.py)")
    try:
        return ModelConfig.from_hf(AutoConfig.from_pretrained(folder), **overrides)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from None


def load_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names (loaded on the CPU)."""
    from safetensors.torch import load_file
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                                "(save the checkpoint with safe_serialization=True)")
    state = {}
    for name in files:
        state.update({our_key(k): v for k, v in load_file(folder / name).items()})
    return state


def check_state_dict(model: Llama, state: dict[str, torch.Tensor]) -> None:
    """Raise if the checkpoint's keys or shapes do not match the model."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(state) & set(expected) if state[k].shape != expected[k])
    problems = []
    if missing:
        problems.append(f"missing keys {[hf_key(k) for k in missing][:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {[hf_key(k) for k in unexpected][:10]}{' ...' if len(unexpected) > 10 else ''}")
    if wrong:
        problems.append(f"mismatched shapes {wrong[:10]}")
    if problems:
        raise ValueError("checkpoint does not match the model config: " + "; ".join(problems))


def load_hf(path: str | os.PathLike, attention: str = "auto", dtype: Optional[torch.dtype] = None,
            device: Optional[torch.device | str] = None, **overrides) -> Llama:
    """A longctx `Llama` with the weights of a Hugging Face LLaMA checkpoint folder."""
    config = load_hf_config(path, attention=attention, **overrides)
    with torch.device("meta"):
        model = Llama(config)
    state = load_hf_state_dict(path)
    check_state_dict(model, state)
    model.to_empty(device=device or "cpu")
    model.tie_weights()
    model.init_weights()  # buffers (rotary) and anything the checkpoint does not hold
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    if dtype is not None:
        model.to(dtype)
    return model


def write_folder(path: str | os.PathLike, fill) -> Path:
    """`fill(tmp)` writes a folder's files into a temporary sibling, which then replaces `path` whole
    (readable as the umask says): a crash leaves the old folder or none, never half of one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        readable_as_umask_says(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def readable_as_umask_says(folder: Path) -> None:
    """The modes a plain mkdir and open would have given: mkdtemp makes its folder 0700 (and writers
    through temporary files make 0600 files), which would hide an export from the other users of a
    shared cluster whatever the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def save_hf(model: Llama, path: str | os.PathLike, state: Optional[dict[str, torch.Tensor]] = None,
            max_shard_size: str = "5GB", tokenizer=None, stop_token_ids: Optional[list[int]] = None) -> None:
    """Write a folder that transformers loads unchanged as the model's family (`LlamaForCausalLM`,
    `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`: model.config.family).

    `state` defaults to the model's own state dict; a sharded (FSDP/ZeRO) caller passes the
    gathered full state. With a `tokenizer` its files go in too (so that `AutoTokenizer` and
    `pipeline` work on the folder), and generation_config.json stops at `stop_token_ids` (default:
    the config's eos). Written to a temporary folder and renamed, so a crash leaves no half
    checkpoint under `path`.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig
    config = model.config.to_hf()
    generation = GenerationConfig.from_model_config(config)
    if stop_token_ids:
        generation.eos_token_id = stop_token_ids if len(stop_token_ids) > 1 else stop_token_ids[0]
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {hf_key(k): v.detach().cpu().contiguous() for k, v in state.items()}
    def fill(tmp: Path) -> None:
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)

    write_folder(path, fill)
