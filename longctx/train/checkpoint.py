"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP).

Layout of `<run_dir>/checkpoints/`:
    step_00000020/        model and optimizer shards (DCP), meta.pt (step, scheduler),
                          rank<r>.pt (this rank's data-loader position and RNG states)
    latest                the name of the newest complete checkpoint, replaced last

A checkpoint is written to `step_N.tmp/` and renamed when every rank has finished, and `latest`
is replaced after that, so a kill at any moment leaves the previous checkpoint loadable.

Model and optimizer go through DCP under DDP and FSDP2 (sharded, reshardable), and through
DeepSpeed's own format under a DeepSpeed engine (its ZeRO partitions, in the same step folder).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from longctx.parallel.data_parallel import is_deepspeed


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def has_frozen(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _options(model) -> StateDictOptions:
    """Frozen parameters (a LoRA run's base) are not saved: the run rebuilds them as it built them
    the first time (model.pretrained, or the random initialisation of train.seed), rather than
    writing the whole base again into every checkpoint."""
    return StateDictOptions(ignore_frozen_params=True, strict=not has_frozen(model))


class Checkpointer:
    def __init__(self, folder: str | os.PathLike, keep: int = 2):
        self.folder = Path(folder)
        self.keep = keep
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def latest(self) -> Optional[Path]:
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        path = self.folder / pointer.read_text().strip()
        return path if (path / "meta.pt").is_file() else None

    def save(self, step: int, model, optimizer, shared: dict, per_rank: dict) -> Path:
        """Collective: every rank calls it. `shared` is written once, `per_rank` by each rank."""
        final = self.folder / f"step_{step:08d}"
        tmp = self.folder / f"step_{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            tmp.mkdir(parents=True)
        _barrier()
        if is_deepspeed(model):
            model.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False,
                                  exclude_frozen_parameters=has_frozen(model))
        else:
            model_state, optim_state = get_state_dict(model, optimizer, options=_options(model))
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        torch.save(per_rank, tmp / f"rank{self.rank}.pt")
        if self.rank == 0:
            torch.save({"step": step, **shared}, tmp / "meta.pt")
        _barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = self.folder / "latest.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.folder / "latest")
            self._prune(final)
        _barrier()
        return final

    def _prune(self, newest: Path) -> None:
        done = sorted(p for p in self.folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-self.keep] if self.keep > 0 else []:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | os.PathLike, model, optimizer) -> tuple[dict, dict]:
        """Load model and optimizer in place; return (shared, this rank's per-rank state)."""
        path = Path(path)
        if not (path / "meta.pt").is_file():
            raise FileNotFoundError(f"{path} is not a complete longctx checkpoint (no meta.pt)")
        if is_deepspeed(model):
            if not any(path.glob("*model_states.pt")):
                raise FileNotFoundError(f"{path} holds no DeepSpeed checkpoint: it was saved by another "
                                        "parallel.dp_backend; resume with that backend")
            loaded, _ = model.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False,
                                              load_module_strict=not has_frozen(model))
            if loaded is None:
                raise FileNotFoundError(f"DeepSpeed could not load {path}")
        else:
            if not (path / ".metadata").is_file():
                raise FileNotFoundError(f"{path} holds no DCP checkpoint: it was saved by parallel.dp_backend="
                                        "deepspeed; resume with that backend")
            model_state, optim_state = get_state_dict(model, optimizer, options=_options(model))
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=_options(model))
        shared = torch.load(path / "meta.pt", weights_only=False)
        rank_file = path / f"rank{self.rank}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(f"{rank_file} is missing: resume with the world size the checkpoint was saved with")
        return shared, torch.load(rank_file, weights_only=False)
