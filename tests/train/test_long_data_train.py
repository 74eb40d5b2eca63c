"""The trainer on the new data options: long examples in one-span rows train (finite, falling loss
over a few steps), the step gets one attention span per row, and a run resumes only with the data
layout it was saved with."""
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from longctx.data import DataError
from longctx.train.config import REPO_ROOT, ConfigError, register_configs
from longctx.train.train import train

CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "train.seq_len=1024",
         "logging.progress_bar=false", "train.threads=1", "train.device=cpu", "checkpoint.export_hf=false"]
LONG = ["data.attention_span=row", "data.long_examples.ratio=0.5", "data.long_examples.min_tokens=512",
        "data.long_examples.tasks=[kv_lookup,multi_hop]"]


def compose_config(overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def test_long_examples_in_row_spans_train_and_resume_only_alike(tmp_path, monkeypatch):
    import longctx.train.train as train_module
    spans = []
    real = train_module.shard_batch
    monkeypatch.setattr(train_module, "shard_batch",
                        lambda batch, dims, device: spans.append(batch["cu_seqlens"].tolist()) or real(batch, dims, device))
    run_dir = tmp_path / "run"
    train(compose_config(SMALL + LONG + [f"run_dir={run_dir}", "train.steps=4", "checkpoint.every=2"]))
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["loss"] == r["loss"] and r["loss"] < 20 for r in records)
    # one span of data per row (then padding spans, if any)
    assert spans and all(cu[0] == 0 and cu[-1] == 1024 and cu[1] > 512 for cu in spans)
    # resuming under another long-example ratio cannot give the same rows: refused in one line
    other = compose_config(SMALL + LONG[:1] + ["data.long_examples.ratio=0.25", "data.long_examples.min_tokens=512",
                                               f"run_dir={run_dir}", "train.steps=6"])
    with pytest.raises((ConfigError, DataError), match="long_examples"):
        train(other)


def test_long_example_lengths_are_checked_against_seq_len_before_any_work():
    from longctx.train.config import validate
    cfg = compose_config(SMALL + ["data.long_examples.ratio=0.5", "data.long_examples.max_tokens=4096"])
    with pytest.raises(ConfigError, match=r"max_tokens=4096 is longer than train.seq_len=1024"):
        validate(cfg, 1)
