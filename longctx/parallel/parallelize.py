"""Apply parallelism to a plain model, as small functions in a fixed order."""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from .mesh import ParallelDims
from .sequence import set_sequence_group


def apply_sequence_parallel(model, dims: ParallelDims, mesh) -> None:
    """Point the model's token mixers at the sequence-parallel methods over the mesh's sp group."""
    if dims.sp_method == "none":
        return
    set_sequence_group(mesh["sp"].get_group())
    if dims.sp_method == "ring":
        from . import ring  # noqa: F401  (registers the "ring" mixer)
        model.config.attention = "ring"
    elif dims.sp_method == "lasp":
        from . import lasp
        model.config.linear_attention = "lasp"
        model.config.attention = lasp.CONTIGUOUS_SOFTMAX_ATTENTION


def apply_activation_checkpointing(model, mode: str) -> None:
    """Recompute each decoder layer in the backward instead of storing its activations."""
    if mode == "none":
        return
    for i, layer in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_ddp(model, device):
    from torch.nn.parallel import DistributedDataParallel
    # parameters are replicated over dp x sp: the default (world) group reduces them all
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def parallelize_llama(model, dims: ParallelDims, mesh, cfg, device):
    """Order matters: sequence methods and checkpointing change the plain model before a
    data-parallel wrapper takes it."""
    apply_sequence_parallel(model, dims, mesh)
    apply_activation_checkpointing(model, cfg.train.activation_checkpoint)
    if dims.dp_backend == "ddp" and dist.is_initialized():
        return apply_ddp(model, device)
    if dims.dp_backend in ("fsdp", "deepspeed"):
        raise NotImplementedError(f"parallel.dp_backend={dims.dp_backend} is not available yet (issue 9); "
                                  "use parallel.dp_backend=ddp")
    return model
