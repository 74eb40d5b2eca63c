"""What makes a checkpoint folder trustworthy: a manifest of checksums, fsync, and loads that run no code.

manifest.json, written last into a checkpoint folder, lists every other file with its size and
its xxh3-64 checksum. xxh3 hashes at memory speed (tens of GB/s a core), and the files are hashed
right after they are written, while the page cache still holds them, so a 15 GB checkpoint costs
seconds; the ranks share the work. A folder whose files do not all match is not loaded.

Every file is read without running code from it: `torch.load(..., weights_only=True)`, and DCP's
pickled `.metadata` through an unpickler that admits only the classes DCP writes there.
"""
from __future__ import annotations

import enum
import json
import os
import pickle
import re
from pathlib import Path

import torch
import xxhash

from .config import ConfigError

MANIFEST = "manifest.json"
_CHUNK = 16 << 20


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def hash_file(path: Path, sync: bool = False) -> tuple[int, str]:
    """Size and xxh3-64 of a file; with sync, also fsync it (a file just written: one pass does both)."""
    digest = xxhash.xxh3_64()
    size, buffer = 0, bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):   # one buffer, reused: no allocation per chunk
            digest.update(view[:count])
            size += count
        if sync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def fsync_folder(path: Path) -> None:
    """A rename or a new file is durable only once its folder is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_to_hash(folder: Path) -> list[str]:
    """Every file of a checkpoint folder, subfolders included (DeepSpeed writes none today), but the manifest."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int, entries: dict[str, tuple[int, str]]) -> None:
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump({"step": step, "files": {name: list(entry) for name, entry in sorted(entries.items())}}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: Path) -> dict[str, tuple[int, str]]:
    """name -> (size, xxh3); raises CheckpointError if the manifest is missing or unreadable."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: name a checkpoint folder (checkpoints/step_N)")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the save did not finish, or an older longctx (before "
                              "manifests) saved it")
    try:
        files = json.loads(path.read_text())["files"]
        return {str(name): (int(size), str(digest)) for name, (size, digest) in files.items()}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is damaged ({type(error).__name__})") from None


def check_file(folder: Path, name: str, size: int, digest: str) -> str | None:
    """What is wrong with one file of the manifest, or None."""
    path = folder / name
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != size:
        return f"{path} has {path.stat().st_size} bytes, the manifest says {size}"
    if hash_file(path)[1] != digest:
        return f"{path} does not match its checksum"
    return None


def safe_load(path: Path, map_location="cpu"):
    """torch.load that runs no code: a file that would (a crafted or foreign pickle) fails with one line."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))   # torch's message is a page long: its gist
        reason = f"it names {named.group(1)}" if named else str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path} holds objects that would run code when loaded ({reason}); it was not "
                              "written by longctx: load only checkpoints you trust") from None


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` (dataclasses and enums of DCP, torch sizes, dtypes and layouts,
    paths) and nothing else."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name)
        allowed = ((module in self._MODULES and isinstance(found, type)
                    and (hasattr(found, "__dataclass_fields__") or issubclass(found, enum.Enum)))
                   or found is torch.Size or isinstance(found, (torch.dtype, torch.layout))
                   or (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                                         ("pathlib", "WindowsPath"), ("collections", "OrderedDict")})
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return found


def read_dcp_metadata(path: Path):
    try:
        with open(path, "rb") as f:
            return MetadataUnpickler(f).load()
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path} holds objects that would run code when loaded ({error}); it was not "
                              "written by longctx: load only checkpoints you trust") from None
