"""Layouts and options a data-parallel backend cannot honour fail before any work, with a message
naming the fix; the backend presets validate."""
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from longctx.train.config import REPO_ROOT, ConfigError, register_configs, validate

CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


def compose_config(overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.dp=2", "parallel.sp=1"], 4, r"parallel.dp \(2\) x parallel.sp \(1\) = 2 must equal the number of processes \(4\)"),
    (["parallel.dp=2", "parallel.sp=2", "parallel.sp_method=ring"], 8, r"= 4 must equal the number of processes \(8\)"),
    (["parallel.dp_backend=fsdp", "parallel.zero_stage=3"], 4, "zero_stage=3 needs parallel.dp_backend=deepspeed, not fsdp: FSDP2 always shards"),
    (["parallel.dp_backend=ddp", "parallel.zero_stage=3"], 2, "zero_stage=3 needs parallel.dp_backend=deepspeed, not ddp"),
    (["parallel.dp_backend=deepspeed"], 2, "DeepSpeed needs a ZeRO stage, set parallel.zero_stage=1, 2 or 3"),
    (["parallel.dp_backend=deepspeed", "parallel.zero_stage=4"], 2, "parallel.zero_stage=4"),
    (["parallel.dp_backend=deepspeed", "parallel.zero_stage=2", "train.on_nonfinite=skip"], 2, "cannot skip a step"),
    (["parallel.cpu_offload=true"], 2, "cpu_offload=true needs parallel.dp_backend=fsdp or deepspeed"),
    (["train.precision=bf16_pure"], 2, "bf16_pure keeps fp32 master weights"),
])
def test_impossible_layouts_fail_before_training(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides), world)


@pytest.mark.parametrize("overrides", [["parallel=fsdp"], ["parallel=deepspeed", "parallel.zero_stage=3"],
                                       ["parallel=fsdp", "train.precision=bf16_pure", "parallel.sp=2",
                                        "parallel.sp_method=ring"]])
def test_backend_presets_validate(overrides):
    dims = validate(compose_config(overrides), 4)
    assert dims.dp * dims.sp == 4
