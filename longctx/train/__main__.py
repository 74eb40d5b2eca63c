"""Train a model: python -m longctx.train [key=value ...]

    python -m longctx.train experiment=llama3.2-1b_sharegpt_32k train.steps=200
    python -m longctx.launch --nproc_per_node 8 -m longctx.train experiment=llama3-8b_sharegpt_512k
    python -m longctx.train run_dir=runs/mine train.resume=auto        # go on where a run stopped
    python -m longctx.train -m optim.lr=1e-3,3e-3                      # a sweep, one folder per job

Settings are Hydra overrides of configs/config.yaml (groups: model, data, parallel, optim, train,
experiment); `--cfg job` prints the composed config, `--hydra-help` Hydra's own options.
Ctrl-C (or SIGTERM) saves a checkpoint at the end of the step and stops; a second Ctrl-C stops at
once. A mistake in the settings is one line naming the key and the fix, and exit status 1.
"""
import contextlib
import os
from pathlib import Path

# Long sequences allocate and free tensors of many sizes (a layer's recompute, the loss chunks):
# growable segments keep the caching allocator from stranding GBs between them (at 512K tokens on
# an H100 a step ran out of memory with 10.8 GiB reserved but unallocated). Read when CUDA first
# allocates, so set before anything does; a value the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from longctx.data import DataError

from longctx.cli import show_help_and_exit

from .config import REPO_ROOT, ConfigError, register_configs
from .console import exit_with_launcher
from .errors import one_line_errors, refuse_bad_overrides

CONFIG_DIR = str(Path(REPO_ROOT) / "configs")
register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg) -> None:
    from .train import end_distributed, train
    with one_line_errors():
        try:
            config = OmegaConf.to_object(cfg)   # model shape checks run here
        except ValueError as error:
            raise ConfigError(str(error)) from error
        job_folder = None
        if config.run_dir is None and HydraConfig.get().mode == RunMode.MULTIRUN:
            job_folder = config.run_dir = HydraConfig.get().runtime.output_dir   # <sweep>/<number>-<overrides>
        try:
            train(config)
        except (ConfigError, DataError):
            if job_folder is not None:   # Hydra made the job's folder; a job that never started leaves none
                remove_unstarted_job(Path(job_folder))
            raise
        finally:
            end_distributed(wait=False)   # on an error too: no process group left to the interpreter's exit


def remove_unstarted_job(job_folder: Path) -> None:
    """The job's folder, if empty, and the sweep's, if no other job has one there (only Hydra's
    multirun.yaml): nothing of a started run is removed."""
    with contextlib.suppress(OSError):
        job_folder.rmdir()
        sweep = job_folder.parent
        if {p.name for p in sweep.iterdir()} <= {"multirun.yaml"}:
            (sweep / "multirun.yaml").unlink(missing_ok=True)
            sweep.rmdir()


if __name__ == "__main__":
    show_help_and_exit(__doc__)
    exit_with_launcher()
    refuse_bad_overrides()
    main()
