"""Sharded checkpoints that survive kills and corruption, with torch.distributed.checkpoint (DCP).

Layout of `<run_dir>/checkpoints/`:
    step_00000020/    model and optimizer: DCP shards and .metadata (DDP, FSDP2), or DeepSpeed's
                      own files (its ZeRO partitions); meta.pt: step, world size and what the
                      trainer shares (scheduler, the global data position, the run's config);
                      rank<r>.pt: rank r's own state (RNG); manifest.json, written last: every
                      other file's size and checksum (integrity.py)
    latest            the name of the newest checkpoint, for people and scripts

A save writes step_N.tmp/, has every rank hash and fsync a share of its files, writes the
manifest, syncs and renames the folder to step_N, replaces `latest`, then prunes. No complete
checkpoint is ever deleted before its replacement is in place: a step_N already there (from the
history a resume went back on) is renamed step_N.replaced first and removed by the prune, and a
pruned checkpoint is renamed step_N.deleting before its files go, so a folder named step_N is
never half written nor half deleted.

Resuming does not trust `latest`: `resume_point("auto")` scans the step folders newest first and
takes the first whose files all match its manifest, warning about each one it skips. Everything
is read without running code from the files (integrity.safe_load, and DCP's metadata through a
restricted unpickler).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from longctx.parallel.data_parallel import is_deepspeed

from .integrity import (CheckpointError, check_file, files_to_hash, fsync_folder, hash_file, read_dcp_metadata,
                        read_manifest, safe_load, write_manifest)
from .run_folder import format_bytes

# Fault injection for tests: LONGCTX_CHECKPOINT_KILL_AT=<point>@<step> ends the process with
# os._exit at that point of the save of that step, as a SIGKILL or a power cut would.
KILL_AT = "LONGCTX_CHECKPOINT_KILL_AT"
KILLED_EXIT = 86
SAVE_POINTS = (
    "model",      # model and optimizer files written (DCP or DeepSpeed)
    "rank",       # this rank's rank<r>.pt written
    "meta",       # meta.pt written (rank 0)
    "manifest",   # manifest.json written and the folder synced, not yet renamed
    "displaced",  # an existing step_N renamed step_N.replaced, the new one not yet in place
    "renamed",    # step_N.tmp renamed step_N, `latest` not yet updated
    "pointer",    # `latest` updated, nothing pruned yet
    "pruning",    # the first pruned checkpoint renamed step_M.deleting, its files not yet removed
)
STEP_FOLDER = re.compile(r"step_(\d+)(\.replaced)?")


def _reached(point: str, step: int) -> None:
    if os.environ.get(KILL_AT) == f"{point}@{step}":
        sys.stdout.flush()
        os._exit(KILLED_EXIT)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _gather(value) -> list:
    """Every rank's value, on every rank."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def rng_state() -> dict:
    """The RNG states as tensors and plain types, so that a weights_only load reads them."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": state["numpy"]["state"]["key"].numpy().astype(np.uint32)}
    np.random.set_state(numpy_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _first_line(error: BaseException) -> str:
    """The one line a failed write is reported by: the OSError inside DCP's or torch's wrappers."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror}" + (f": {seen.filename}" if seen.filename else "")
        seen = seen.__cause__ or seen.__context__
    failures = getattr(error, "failures", None)   # DCP's CheckpointException: rank -> (exception, traceback)
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                return _first_line(inner)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _state_bytes(state) -> int:
    """Bytes of the tensors this rank holds in a (nested) state dict; a DTensor counts its local shard."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


class _SafeReader(dcp.FileSystemReader):
    """DCP's reader, but its pickled .metadata is read by an unpickler that runs no code."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_dcp_metadata(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _deepspeed_load(engine, path: Path):
    """DeepSpeed's engine reads each of its files through its checkpoint engine, with
    weights_only=False: for this load those reads go through safe_load, which admits the plain-data
    classes of DeepSpeed that its ZeRO optimizer files hold (loss scalers, the ZeRO stage, fragment
    addresses), and nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reader = engine.checkpoint_engine
    reader.load = lambda file, map_location=None: safe_load(Path(file), map_location)
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False,
                                               load_module_strict=not has_frozen(engine))
    finally:
        del reader.load   # the instance attribute: the class's own method shows again
    return loaded


def has_frozen(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _options(model) -> StateDictOptions:
    """Frozen parameters (a LoRA run's base) are not saved: the run rebuilds them as it built them
    the first time (model.pretrained, or the random initialisation of train.seed), rather than
    writing the whole base again into every checkpoint."""
    return StateDictOptions(ignore_frozen_params=True, strict=not has_frozen(model))


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _plain_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _model_state(model, optimizer) -> tuple[dict, dict]:
    """DCP's state dicts of a model and optimizer, less every frozen parameter. DCP's
    ignore_frozen_params drops them by their first name only: a tied lm_head (the embedding's
    weight under a second name) stayed in a LoRA checkpoint, which then held all of it."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(model))
    if has_frozen(model):
        frozen = {_plain_name(name) for name, p in model.named_parameters(remove_duplicate=False)
                  if not p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if _plain_name(k) not in frozen}
    return model_state, optim_state


class Checkpointer:
    def __init__(self, folder: str | os.PathLike, keep: int = 2):
        self.folder = Path(folder)
        self.keep = keep                          # <= 0 keeps them all
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._verified: set[Path] = set()

    # ---- saving -------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, shared: dict, per_rank: dict) -> Path:
        """Collective: every rank calls it. `shared` is written once (rank 0's), `per_rank` by each
        rank; both must hold only tensors and plain types (they are loaded with weights_only).

        The free space is checked first (CheckpointError, one line, nothing written when it is
        short); a save that fails while writing removes its .tmp and raises one line too. Either
        way the checkpoints already in place are untouched."""
        final = self.folder / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        model_state = optim_state = None
        if not is_deepspeed(model):
            model_state, optim_state = _model_state(model, optimizer)
        self._check_space(step, model, model_state, optim_state, per_rank)
        problem = None
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
                tmp.mkdir(parents=True)
            _barrier()
            if is_deepspeed(model):
                model.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False,
                                      exclude_frozen_parameters=has_frozen(model))
            else:
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
            _reached("model", step)
            torch.save(per_rank, tmp / f"rank{self.rank}.pt")
            _reached("rank", step)
            if self.rank == 0:
                torch.save({"step": step, "world_size": self.world_size, **shared}, tmp / "meta.pt")
                _reached("meta", step)
        except Exception as error:   # a full disk shows as OSError, DCP's CheckpointException, or
            problem = _first_line(error)   # torch.save's "unexpected pos": each rank reports, all decide
        problems = [p for p in _gather(problem) if p]
        if problems:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            _barrier()
            raise CheckpointError(self._failed_save_line(step, final, problems[0]))
        _barrier()
        # hashed right after writing, while the page cache holds the bytes; each rank a share
        names = files_to_hash(tmp)
        mine = {name: hash_file(tmp / name, sync=True) for name in names[self.rank::self.world_size]}
        entries = {name: entry for part in _gather(mine) for name, entry in part.items()}
        if self.rank == 0:
            write_manifest(tmp, step, entries)
            fsync_folder(tmp)
            _reached("manifest", step)
            self._put_in_place(tmp, final, step)
        _barrier()
        return final

    def _newest_in_place(self) -> Optional[Path]:
        return next((path for _, path in self.step_folders() if not path.suffix), None)

    def _check_space(self, step: int, model, model_state, optim_state, per_rank: dict) -> None:
        """Collective: refuse the save (one line, nothing written) when the folder's disk has less
        free space than the checkpoint needs: the size of the newest one in place, or before the
        first, what the ranks' states add up to. The new checkpoint is complete before an old one
        is pruned, so all of it must fit beside them."""
        if is_deepspeed(model):   # full sizes: weights, fp32 master copy and Adam's two moments
            mine = sum(getattr(p, "ds_numel", p.numel()) * 16 for p in model.parameters() if p.requires_grad)
            mine = mine if self.rank == 0 else 0
        else:
            mine = _state_bytes(model_state) + _state_bytes(optim_state)
        mine += _state_bytes(per_rank)
        estimate = sum(_gather(mine))
        problem = [None]
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            newest = self._newest_in_place()
            need = folder_bytes(newest) if newest is not None else estimate
            leftover = self.folder / f"step_{step:08d}.tmp"   # removed before this save writes
            free = shutil.disk_usage(self.folder).free + (folder_bytes(leftover) if leftover.is_dir() else 0)
            if free < need:
                problem[0] = (f"no space for checkpoint step_{step:08d} in {self.folder}: it needs about "
                              f"{format_bytes(need)}, {format_bytes(free)} is free ({format_bytes(need - free)} missing); "
                              f"{self._what_to_do()}")
        if dist.is_initialized():
            dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            raise CheckpointError(problem[0])

    def _what_to_do(self) -> str:
        newest = self._newest_in_place() if self.rank == 0 else None
        kept = f"{newest.name} is intact" if newest is not None else "no checkpoint was saved yet"
        return (f"{kept}; free space there (or lower checkpoint.keep), then resume with "
                f"run_dir={self.folder.parent} train.resume=auto")

    def _failed_save_line(self, step: int, final: Path, problem: str) -> str:
        free = shutil.disk_usage(self.folder).free
        return (f"saving checkpoint {final.name} in {self.folder} failed ({problem}); {format_bytes(free)} is free there, "
                f"its unfinished files are removed; {self._what_to_do()}")

    def _put_in_place(self, tmp: Path, final: Path, step: int) -> None:
        if final.exists():   # the same step of a history that a resume went back on
            displaced = final.with_name(final.name + ".replaced")
            shutil.rmtree(displaced, ignore_errors=True)
            os.replace(final, displaced)
            _reached("displaced", step)
        os.replace(tmp, final)
        fsync_folder(self.folder)
        _reached("renamed", step)
        pointer = self.folder / "latest.tmp"
        with open(pointer, "w") as f:
            f.write(final.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, self.folder / "latest")
        fsync_folder(self.folder)
        _reached("pointer", step)
        self._prune(step)

    def _prune(self, step: int) -> None:
        """Keep the `keep` newest checkpoints up to `step`. Newer ones belong to the history that the
        resume went back on; leftovers of killed saves and prunes (.tmp, .replaced, .deleting) go too."""
        in_place = [path for s, path in self.step_folders() if s <= step and not path.suffix]
        kept = set(in_place[:self.keep] if self.keep > 0 else in_place)
        for path in sorted(self.folder.glob("step_*")):
            if not path.is_dir() or path in kept:
                continue
            if not path.suffix:   # out of the step_N names first: never a half-deleted step_N
                trash = path.with_name(path.name + ".deleting")
                os.replace(path, trash)
                _reached("pruning", step)
                path = trash
            shutil.rmtree(path, ignore_errors=True)

    # ---- finding and checking -----------------------------------------------------------------
    def step_folders(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoint folder, complete or not, newest first; a step_N before
        the step_N.replaced that a kill may have left beside it."""
        found = [(int(m.group(1)), m.group(2) is not None, p) for p in self.folder.glob("step_*")
                 if p.is_dir() and (m := STEP_FOLDER.fullmatch(p.name))]
        return [(step, path) for step, _, path in sorted(found, key=lambda f: (-f[0], f[1]))]

    def verify(self, path: Path) -> Optional[str]:
        """Collective: what is wrong with a checkpoint folder (naming the file), or None when every
        file matches its manifest. The ranks check a share of the files each."""
        path = Path(path)
        try:
            entries = read_manifest(path)
            if "meta.pt" not in entries:
                raise CheckpointError(f"{path / 'manifest.json'} does not list meta.pt")
        except CheckpointError as error:
            return str(error)
        names = sorted(entries)
        mine = [check_file(path, name, *entries[name]) for name in names[self.rank::self.world_size]]
        problems = [p for part in _gather(mine) for p in part if p]
        if problems:
            return problems[0]
        self._verified.add(path.resolve())
        return None

    def resume_point(self, resume: str) -> Optional[Path]:
        """Collective: the checkpoint to resume from for `train.resume`: None for `none`, or for `auto`
        in a folder without checkpoints; the newest verified one for `auto` (each newer one that
        fails is skipped with a warning naming the bad file); a named folder only if it verifies.
        Raises CheckpointError (one line) when checkpoints exist but none verifies."""
        if resume == "none":
            return None
        if resume != "auto":
            problem = self.verify(Path(resume))
            if problem:
                raise CheckpointError(f"train.resume={resume}: {problem}; name an intact checkpoint or use "
                                      "train.resume=auto")
            return Path(resume)
        found = [path for _, path in self.step_folders()]
        problems = []
        for path in found:
            problem = self.verify(path)
            if problem is None:
                return path
            problems.append(problem)
            if self.rank == 0:
                print(f"warning: {problem}: not resuming from {path}, trying an older checkpoint",
                      file=sys.stderr, flush=True)
        if found:
            raise CheckpointError(f"none of the {len(found)} checkpoints in {self.folder} is intact (newest: "
                                  f"{problems[0]}); restore one, or start over with train.resume=none")
        return None

    # ---- loading ------------------------------------------------------------------------------
    def read_meta(self, path: str | os.PathLike) -> dict:
        """The shared part (step, world size, what the trainer stored), without loading anything else."""
        return safe_load(Path(path) / "meta.pt")

    def load(self, path: str | os.PathLike, model, optimizer) -> tuple[dict, Optional[dict]]:
        """Collective: load model and optimizer in place (resharded to this run's ranks); return (shared,
        this rank's per-rank state), the latter None when the checkpoint was saved by another number
        of ranks. A folder not verified yet in this process is verified first."""
        path = Path(path)
        if path.resolve() not in self._verified and (problem := self.verify(path)):
            raise CheckpointError(f"{problem}: not loading {path}")
        if is_deepspeed(model):
            if not any(path.glob("*model_states.pt")):
                raise CheckpointError(f"{path} holds no DeepSpeed checkpoint: it was saved by another "
                                      "parallel.dp_backend; resume with that backend")
            loaded = _deepspeed_load(model, path)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {path}")
        else:
            if not (path / ".metadata").is_file():
                raise CheckpointError(f"{path} holds no DCP checkpoint: it was saved by parallel.dp_backend="
                                      "deepspeed; resume with that backend")
            read_dcp_metadata(path / ".metadata")   # refused here in one line, not wrapped in DCP's errors
            model_state, optim_state = _model_state(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            try:
                dcp.load(state, storage_reader=_SafeReader(path))
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                               options=_options(model))
            except (RuntimeError, ValueError, KeyError) as error:   # DCP's CheckpointException is a RuntimeError
                raise CheckpointError(f"{path} does not fit this model ({_first_line(error)}): resume with the "
                                      "shape and LoRA settings it was saved with, or start over with "
                                      "train.resume=none in another run_dir") from error
        shared = self.read_meta(path)
        same_ranks = shared.get("world_size") == self.world_size
        return shared, safe_load(path / f"rank{self.rank}.pt") if same_ranks else None
