"""`model.attention` is checked with the config: a name that is no backend fails in one line naming
the choices, before any run folder; under a sequence-parallel method it must name the backend the
method runs on (the method's mixer is no longer written into it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.train.config import REPO_ROOT, ConfigError, register_configs, validate


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "configs"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=overrides))


def test_an_unknown_backend_is_one_line_before_the_run_folder(tmp_path: Path):
    cmd = [sys.executable, "-m", "longctx.train", "model.attention=fastest", f"run_dir={tmp_path / 'run'}",
           "train.device=cpu", "train.steps=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.attention='fastest' is not the attention backend: choose one of auto, "
                           "torch, triton, cudnn, flash, sdpa"), last
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["auto", "torch", "triton", "cudnn", "flash", "sdpa"])
def test_every_backend_name_and_alias_passes(name):
    validate(compose([f"model.attention={name}"]), 1)


def test_under_a_method_attention_names_the_backend_not_a_mixer():
    validate(compose(["parallel.sp=2", "parallel.sp_method=ring", "model.attention=torch"]), 2)
    with pytest.raises(ConfigError, match="model.attention='ring' is not the backend the sequence-parallel "
                                          "method runs its attention on: choose one of auto, ") as error:
        validate(compose(["parallel.sp=2", "parallel.sp_method=ring", "model.attention=ring"]), 2)
    assert "\n" not in str(error.value)
