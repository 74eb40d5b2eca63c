"""A Qwen checkpoint folder as users have it (config.json, weights, tokenizer with its chat template)
through the trainer: data.tokenizer follows model.pretrained, the implementation knobs of the run
apply over the folder's config, and the export is the same family with the template it trained on."""
import json
import os

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from longctx.train.config import REPO_ROOT, register_configs, validate

QWEN3_LIKE = ("{%- for m in messages %}{%- if m['role'] == 'assistant' and loop.last %}"
              "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
              "{%- else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
              "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")


def compose_config(overrides):
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def qwen3_folder(folder):
    """A tiny Qwen3 checkpoint with a ChatML tokenizer (the repository's, with ChatML's tokens added)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "data", "tokenizer"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN3_LIKE
    config = transformers.Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


COMMON = ["train.seq_len=256", "train.steps=2", "train.device=cpu", "train.threads=1", "model.attention=sdpa",
          "logging.progress_bar=false", "optim.warmup_steps=1"]


def test_tokenizer_follows_pretrained_unless_set(tmp_path):
    folder = qwen3_folder(tmp_path / "qwen3")
    cfg = compose_config(COMMON + [f"model.pretrained={folder}"])
    assert cfg.data.tokenizer is None
    validate(cfg, 1)
    assert cfg.data.tokenizer == str(folder)
    chosen = compose_config(COMMON + [f"model.pretrained={folder}", "data.tokenizer=data/tokenizer"])
    validate(chosen, 1)
    assert chosen.data.tokenizer == "data/tokenizer"
    # a folder without a tokenizer (and no model.pretrained) keeps the repository's
    bare = tmp_path / "bare"
    transformers.Qwen3Config(**json.loads((folder / "config.json").read_text())).save_pretrained(bare)
    (bare / "model.safetensors").symlink_to(folder / "model.safetensors")
    for overrides in ([f"model.pretrained={bare}"], []):
        cfg = compose_config(COMMON + overrides)
        validate(cfg, 1)
        assert cfg.data.tokenizer == "data/tokenizer"


def test_the_runs_implementation_knobs_apply_over_a_pretrained_folder(tmp_path):
    from longctx.train.train import build_model
    folder = qwen3_folder(tmp_path / "qwen3")
    cfg = compose_config(COMMON + [f"model.pretrained={folder}", "model.mlp_chunk_size=64",
                                   "model.loss_chunk_size=128"])
    model = build_model(cfg, torch.device("cpu"))
    assert [layer.mlp.chunk_size for layer in model.layers] == [64, 64]   # was dropped: 0
    assert model.config.loss_chunk_size == 128 and model.config.family == "qwen3"


def test_a_qwen3_folder_trains_and_exports_as_qwen3_with_its_template(tmp_path):
    from longctx.data.template import CHATML_CHAT_TEMPLATE
    from longctx.model import load_hf
    from longctx.train.train import train
    folder = qwen3_folder(tmp_path / "qwen3")
    run_dir = train(compose_config(COMMON + [f"model.pretrained={folder}", f"run_dir={tmp_path / 'run'}"]))
    exported = run_dir / "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert isinstance(hf, transformers.Qwen3ForCausalLM) and hf.config.tie_word_embeddings
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    # trained in ChatML (Qwen3's template cannot be located by prefixes): the export says so
    assert tokenizer.chat_template == CHATML_CHAT_TEMPLATE
    generation = json.loads((exported / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    ids = torch.randint(0, len(tokenizer), (1, 19))
    ours = load_hf(exported, attention="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
        before = transformers.AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
    assert not torch.allclose(before, ours(ids).logits)   # it trained


def test_a_config_its_family_cannot_export_fails_before_any_work():
    from longctx.train.config import ConfigError
    cfg = compose_config(COMMON + ["model.qk_norm=true"])
    with pytest.raises(ConfigError, match="model.family=llama cannot be exported .* set model.family=qwen3"):
        validate(cfg, 1)
    validate(compose_config(COMMON + ["model.qk_norm=true", "checkpoint.export_hf=false"]), 1)


def test_the_data_cache_key_of_a_model_folder_reads_no_weights(tmp_path, monkeypatch):
    """data.tokenizer following model.pretrained points the data cache at a folder of gigabytes of
    weights: its key hashes the tokenizer's files alone."""
    from pathlib import Path

    from longctx.data.cache import cache_path
    from longctx.data.config import DataConfig
    folder = qwen3_folder(tmp_path / "qwen3")
    key = cache_path(DataConfig(tokenizer=str(folder)))
    real = Path.read_bytes

    def no_weights(self):
        assert self.suffix != ".safetensors", f"read {self.name}"
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", no_weights)
    assert cache_path(DataConfig(tokenizer=str(folder))) == key
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text().replace(
        "<|im_end|>", "<|im_end|> "))
    assert cache_path(DataConfig(tokenizer=str(folder))) != key   # the tokenizer's own files still count
