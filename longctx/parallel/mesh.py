"""The device mesh: data-parallel x sequence-parallel ranks.

Sequence parallelism is innermost, so that a sequence-parallel group sits on the GPUs of one
node. Parameters are replicated across it: gradient reduction (DDP) and sharding (FSDP2, ZeRO)
span the whole dp x sp world, while batches differ only across dp.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .sequence import sequence_divisor

SP_METHODS = ("none", "ring", "lasp")
DP_BACKENDS = ("none", "ddp", "fsdp", "deepspeed")


@dataclass
class ParallelDims:
    world_size: int
    dp: int
    sp: int
    sp_method: str = "none"
    dp_backend: str = "ddp"

    def __post_init__(self):
        if self.sp_method not in SP_METHODS:
            raise ValueError(f"parallel.sp_method={self.sp_method!r}: choose one of {SP_METHODS}")
        if self.dp_backend not in DP_BACKENDS:
            raise ValueError(f"parallel.dp_backend={self.dp_backend!r}: choose one of {DP_BACKENDS}")
        if self.sp < 1 or self.dp < 1:
            raise ValueError(f"parallel sizes must be positive: dp={self.dp}, sp={self.sp}")
        if self.dp * self.sp != self.world_size:
            raise ValueError(f"parallel.dp ({self.dp}) x parallel.sp ({self.sp}) = {self.dp * self.sp} "
                             f"must equal the number of processes ({self.world_size})")
        if self.sp > 1 and self.sp_method == "none":
            raise ValueError(f"parallel.sp={self.sp} needs a sequence-parallel method: set parallel.sp_method=ring or lasp")
        if self.sp == 1:
            self.sp_method = "none"
        if self.world_size > 1 and self.dp_backend == "none":
            raise ValueError(f"{self.world_size} processes need a data-parallel backend to reduce gradients: "
                             f"set parallel.dp_backend to one of {DP_BACKENDS[1:]}")

    @classmethod
    def from_sizes(cls, world_size: int, dp: int = -1, sp: int = 1, **kwargs) -> "ParallelDims":
        """dp=-1 means whatever sp leaves of the world."""
        if sp < 1 or world_size % sp:
            raise ValueError(f"parallel.sp={sp} must divide the number of processes ({world_size})")
        return cls(world_size=world_size, dp=world_size // sp if dp == -1 else dp, sp=sp, **kwargs)

    @property
    def layout(self) -> str:
        """How a sequence is split across the sp group: ring attention balances causal work with
        the zigzag order; the linear-attention recurrence needs contiguous shares."""
        return "contiguous" if self.sp_method == "lasp" else "zigzag"

    @property
    def seq_divisor(self) -> int:
        """What a sequence length must be a multiple of."""
        return 1 if self.sp == 1 else sequence_divisor(self.sp, self.layout)

    def build_mesh(self, device_type: str) -> Optional["torch.distributed.device_mesh.DeviceMesh"]:
        if not dist.is_initialized():
            return None
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh(device_type, (self.dp, self.sp), mesh_dim_names=("dp", "sp"))
