"""A run folder's lifetime: one run at a time in it, its config files, and what a resume may not change.

    lock = RunLock(run_dir); lock.acquire()   # ConfigError when another live run holds the folder
    ...
    lock.release()

The lock is an flock (filelock's FileLock): the operating system drops it when its process dies,
however it dies, so a killed run never leaves the folder locked. Beside it, `.lock.owner` says who
holds it; found there by the next run, it is the trace of a run that died holding the lock, and
that run says it takes the lock over.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist
from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from longctx.model.config import IMPLEMENTATION_FIELDS

from .config import Config, ConfigError

# settings that choose implementations, places or output, not what a step computes
_NOT_MATH = {"model.name", *(f"model.{name}" for name in IMPLEMENTATION_FIELDS), "data.num_proc",
             "data.cache_dir", "data.prepare_timeout_s", "data.verbose", "lora.merge_on_export"}


class RunLock:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._lock = FileLock(str(self.folder / ".lock"))
        self._owner = self.folder / ".lock.owner"

    def acquire(self) -> None:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(f"run_dir={self.folder} is in use by another run ({self._holder()}); wait for it "
                              "to finish, or choose another run_dir") from None
        if self._owner.is_file():
            print(f"{self.folder}: taking over the lock of {self._holder()}, which ended without releasing it",
                  flush=True)
        self._owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}))

    def release(self) -> None:
        self._owner.unlink(missing_ok=True)
        self._lock.release()

    def _holder(self) -> str:
        try:
            owner = json.loads(self._owner.read_text())
            return f"process {owner['pid']} on {owner['host']}, since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that left no record"


def write_config(run_dir: Path, cfg: Config, start: int) -> Path:
    """config.yaml for the run that made the folder, never overwritten; a resumed (or restarted) run
    writes config.resume-<step>.yaml beside it."""
    path = Path(run_dir) / "config.yaml"
    if path.exists():
        path = path.with_name(f"config.resume-{start}.yaml")
    OmegaConf.save(OmegaConf.structured(cfg), path)
    return path


def math_settings(cfg: Config, dp: int) -> dict:
    """The settings that change what training computes, flat and plain (stored in each checkpoint):
    model, data, optimizer, LoRA, seq_len, seed, precision, and the global batch, which is what the
    parallel layout changes in the math (the number of processes itself may change on resume)."""
    settings = {}
    for section in ("model", "data", "optim", "lora"):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            if f"{section}.{key}" not in _NOT_MATH:
                settings[f"{section}.{key}"] = value
    t = cfg.train
    settings.update({"train.seq_len": t.seq_len, "train.seed": t.seed, "train.precision": t.precision,
                     "global batch (parallel.dp x train.micro_batch x train.grad_accum)":
                         dp * t.micro_batch * t.grad_accum})
    return json.loads(json.dumps(settings))   # tuples and the like as the plain types a checkpoint loads back


def check_resume_settings(saved: dict, current: dict, checkpoint: Path, force: bool) -> None:
    """Stop (one line) when the run resumes a checkpoint made with other math settings, unless forced."""
    # a setting newer than the checkpoint (model.family, ...) counts as its default there
    defaults = {k: v for k, v in math_settings(Config(), 1).items() if k not in saved}
    saved = {**defaults, **saved}
    changed = [f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(saved) | set(current))
               if saved.get(key) != current.get(key)]
    if not changed:
        return
    if not force:
        raise ConfigError(f"{checkpoint} was saved with other settings: {'; '.join(changed)}; resume with the "
                          "saved ones, choose another run_dir, or set train.resume_force=true")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warning: train.resume_force=true: resuming {checkpoint} with changed settings: "
              f"{'; '.join(changed)}", flush=True)
