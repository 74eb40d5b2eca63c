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
import shutil
import socket
import tempfile
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


# settings that change the shape of a saved tensor: no forced resume loads a checkpoint across them
SHAPE_KEYS = {f"model.{key}" for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "head_dim",
                                         "tie_word_embeddings", "layer_types")}
SHAPE_KEYS |= {"lora.enabled", "lora.rank", "lora.target_modules", "lora.trainable"}


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
    writes config.resume-<step>.yaml beside it. Written whole or not at all (a full disk leaves no
    empty file behind, and says so in one line)."""
    path = Path(run_dir) / "config.yaml"
    if path.exists():
        path = path.with_name(f"config.resume-{start}.yaml")
    partial = path.with_name(path.name + ".tmp")
    try:
        OmegaConf.save(OmegaConf.structured(cfg), partial)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {error.strerror or error}; {space_left(path.parent)}") from None
    return path


def space_left(folder: Path) -> str:
    try:
        return f"{format_bytes(shutil.disk_usage(folder).free)} free in {folder}"
    except OSError:
        return f"{folder} cannot be read"


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB' (the sizes one-line messages give)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{int(count)} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def check_run_dir_usable(run_dir) -> None:
    """A run_dir that the run could not write (read-only, not a folder, its nearest existing parent
    unwritable): one line, before the data is prepared. None: runs/<time> in the working folder."""
    folder = Path(run_dir if run_dir is not None else "runs").absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if existing != folder and not existing.is_dir():
        raise ConfigError(f"run_dir={run_dir}: {existing} is a file, not a folder; choose another run_dir")
    if existing == folder and not folder.is_dir():
        raise ConfigError(f"run_dir={run_dir} is a file, not a folder; choose another run_dir")
    try:   # a file made and removed: permissions, a read-only mount, a full disk, as the run would meet them
        probe = tempfile.NamedTemporaryFile(dir=existing, prefix=".longctx-probe-")
        probe.close()
    except OSError as error:
        where = "" if existing == folder else f" (it would be made in {existing})"
        raise ConfigError(f"run_dir={run_dir or 'runs/<time>'} is not writable{where}: {error.strerror}; choose "
                          "a run_dir you can write, or make that folder writable") from None


RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints")


def refuse_used_run_dir(run_dir: Path) -> None:
    """train.resume=none in a folder that holds a run: refused, naming what is there. Starting over
    in it would truncate that run's metrics.jsonl and leave its checkpoints beside the new run's."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    if steps:
        found[found.index("checkpoints")] = f"checkpoints up to {steps[-1]}"
    raise ConfigError(f"run_dir={run_dir} holds a run ({', '.join(found)}) and train.resume=none would "
                      f"start another over it: resume it with train.resume=auto, choose another run_dir, or move "
                      f"it aside (mv {run_dir} {run_dir}.old)")


def clean_stale_saves(folder: Path) -> list[Path]:
    """Remove the .tmp folders of saves that died (the caller holds the run's lock, so none is being
    written), saying which: each may hold as much as a checkpoint, on a disk it helped fill."""
    stale = sorted(p for p in Path(folder).glob("step_*.tmp") if p.is_dir())
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        print(f"removed {len(stale)} unfinished checkpoint(s) of a save that did not complete: "
              f"{', '.join(p.name for p in stale)} in {folder}", flush=True)
    return stale


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
    reshaped = [f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(SHAPE_KEYS)
                if key in saved and saved.get(key) != current.get(key)]
    if reshaped:
        raise ConfigError(f"{checkpoint} holds tensors of another shape ({'; '.join(reshaped)}), which "
                          "train.resume_force cannot load: resume with the saved shape, or start over with "
                          "train.resume=none in another run_dir (model.pretrained= loads weights into a new shape's run)")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warning: train.resume_force=true: resuming {checkpoint} with changed settings: "
              f"{'; '.join(changed)}", flush=True)
