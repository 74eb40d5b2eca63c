"""The optimizer defaults follow what a run starts from: 3e-3 and 5 warmup steps from scratch, a
finetuning lr (2e-5; 2e-4 for LoRA) and 3 % warmup when model.pretrained loads weights, a value
the user sets always winning; the finetuning choice is printed once and is what the run steps with."""
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from longctx.model import ModelConfig, save_hf
from longctx.model.llama import Llama
from longctx.train.config import REPO_ROOT, register_configs
from longctx.train.train import train

CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


def compose_config(overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained")
    save_hf(Llama(ModelConfig(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)), folder)
    return folder


@pytest.mark.parametrize("overrides, lr, warmup, note", [
    ([], 3e-3, 5, False),
    (["model.pretrained={p}", "train.steps=200"], 2e-5, 6, True),
    (["model.pretrained={p}", "train.steps=10"], 2e-5, 1, True),
    (["model.pretrained={p}", "lora.enabled=true"], 2e-4, 1, True),
    (["model.pretrained={p}", "optim.lr=1e-4", "optim.warmup_steps=7"], 1e-4, 7, False),
    (["model.pretrained={p}", "optim.lr=1e-4", "train.steps=100"], 1e-4, 3, True),
    (["optim.lr=1e-2"], 1e-2, 5, False),
], ids=["scratch", "finetune", "finetune-short", "lora", "user-set", "user-lr-only", "scratch-user-lr"])
def test_defaults_by_start(pretrained, overrides, lr, warmup, note):
    cfg = compose_config([o.format(p=pretrained) for o in overrides])
    assert cfg.optim.lr == pytest.approx(lr) and cfg.optim.warmup_steps == warmup
    assert bool(cfg.optim_defaults_note) == note
    if note:
        assert "finetuning defaults" in cfg.optim_defaults_note and "cosine to 0.1 x lr" in cfg.optim_defaults_note


def test_a_finetuning_run_steps_at_the_default_and_says_so_once(pretrained, tmp_path, capsys):
    cfg = compose_config([f"model.pretrained={pretrained}", f"run_dir={tmp_path}/run", "train.steps=4",
                          "train.seq_len=128", "logging.progress_bar=false", "train.threads=1",
                          "checkpoint.export_hf=false", "checkpoint.at_end=false", "train.device=cpu"])
    train(cfg)
    out = capsys.readouterr().out
    assert out.count("optim: finetuning defaults") == 1
    records = [json.loads(line) for line in (Path(tmp_path) / "run" / "metrics.jsonl").read_text().splitlines()]
    # 4 steps, 3 % warmup -> 1 warmup step at the full 2e-5, then cosine down towards 2e-6
    assert records[0]["lr"] == pytest.approx(2e-5)
    assert all(r["lr"] <= 2e-5 + 1e-12 for r in records) and records[-1]["lr"] < 2e-5
