"""The device mesh: data-parallel x sequence-parallel ranks, and the groups built on it.

Sequence parallelism is innermost, so that a sequence-parallel group sits on the GPUs of one
node (or, for USP across nodes, its Ulysses groups do). Parameters are replicated across it:
gradient reduction (DDP) and sharding (FSDP2, ZeRO) span the whole dp x sp world, while batches
differ only across dp. What the sequence-parallel method needs (its layout, divisor, groups) comes
from its record in `registry.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from .data_parallel import get_backend
from .registry import SequenceMethod, get_method, methods


@dataclass
class ParallelDims:
    world_size: int
    dp: int
    sp: int
    sp_method: str = "none"
    dp_backend: str = "ddp"
    ulysses: int = 1                     # usp: ranks of a Ulysses group (sp = ulysses x ring)
    # made by build_mesh: the mesh, the sp group, and what the method's mixers take as `group`
    mesh: Any = field(default=None, init=False, repr=False)
    sp_group: Any = field(default=None, init=False, repr=False)
    mixer_group: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        get_backend(self.dp_backend)   # an unknown name: one line listing the backends
        if self.sp < 1 or self.dp < 1:
            raise ValueError(f"parallel sizes must be positive: dp={self.dp}, sp={self.sp}")
        if self.dp * self.sp != self.world_size:
            raise ValueError(f"parallel.dp ({self.dp}) x parallel.sp ({self.sp}) = {self.dp * self.sp} "
                             f"must equal the number of processes ({self.world_size})")
        if self.sp_method != "none":
            get_method(self.sp_method)   # an unknown name: one line listing the known ones
        if self.sp > 1 and self.sp_method == "none":
            raise ValueError(f"parallel.sp={self.sp} needs a sequence-parallel method: set parallel.sp_method "
                             f"to one of {', '.join(sorted(methods()))}")
        if self.sp == 1:
            self.sp_method = "none"
        if self.ulysses != 1 and (self.method is None or "ulysses" not in self.method.reads):
            readers = sorted(name for name, method in methods().items() if "ulysses" in method.reads)
            raise ValueError(f"parallel.ulysses={self.ulysses} is read by sp_method={' or '.join(readers)} only "
                             f"(now {self.sp_method}): set the method, or drop parallel.ulysses")
        if self.method is not None:
            self.method.check(self, None)

    @classmethod
    def from_sizes(cls, world_size: int, dp: int = -1, sp: int = 1, **kwargs) -> "ParallelDims":
        """dp=-1 means whatever sp leaves of the world."""
        if sp < 1 or world_size % sp:
            raise ValueError(f"parallel.sp={sp} must divide the number of processes ({world_size})")
        return cls(world_size=world_size, dp=world_size // sp if dp == -1 else dp, sp=sp, **kwargs)

    @property
    def method(self) -> Optional[SequenceMethod]:
        """The sequence-parallel method's record, or None without sequence parallelism."""
        return None if self.sp_method == "none" else get_method(self.sp_method)

    @property
    def seq_divisor(self) -> int:
        """What a sequence length must be a multiple of."""
        return 1 if self.method is None else self.method.divisor(self)

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's share of a sequence (the whole of it without sequence parallelism)."""
        return x if self.method is None else self.method.split(x, self, dim)

    def gather(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence from every rank's share (not differentiable)."""
        return local if self.method is None else self.method.gather(local, self, dim)

    def build_mesh(self, device_type: str) -> Optional["torch.distributed.device_mesh.DeviceMesh"]:
        """The (dp, sp) mesh and the method's groups; None (and no groups) on one process."""
        if not dist.is_initialized():
            return None
        from torch.distributed.device_mesh import init_device_mesh
        self.mesh = init_device_mesh(device_type, (self.dp, self.sp), mesh_dim_names=("dp", "sp"))
        self.sp_group = self.mesh["sp"].get_group()
        if self.method is not None:
            self.mixer_group = self.method.groups(self)
        return self.mesh

    def sequence_only(self, group=None) -> "ParallelDims":
        """These dims for a process group that shares one sequence and trains nothing (evaluation):
        `group` (None: the default group) is the sp group."""
        if not dist.is_initialized():
            raise ValueError("sequence parallelism needs torch.distributed initialised (torchrun)")
        whole = group if group is not None else dist.group.WORLD
        self.sp_group = whole
        if self.method is not None:
            self.mixer_group = self.method.groups(self)
        return self


def sequence_dims(sp_method: str, group=None, ulysses: int = 1) -> ParallelDims:
    """The dims and groups of one sequence split over `group` (None: every process) with
    `sp_method`, for evaluation (no data parallelism, no gradients)."""
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    dims = ParallelDims(world_size=size, dp=1, sp=size, sp_method=sp_method if size > 1 else "none",
                        dp_backend="none", ulysses=ulysses if size > 1 else 1)
    return dims.sequence_only(group) if size > 1 else dims
