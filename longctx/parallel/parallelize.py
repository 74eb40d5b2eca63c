"""Apply parallelism to a plain model, as small functions in a fixed order."""
from __future__ import annotations

import torch.distributed as dist
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from .data_parallel import apply_ddp, apply_fsdp, world_mesh
from .mesh import ParallelDims
from .sequence import set_sequence_group


def apply_sequence_parallel(model, dims: ParallelDims, mesh, device, lasp_variant: str = "ring") -> None:
    """Point the model's token mixers at the sequence-parallel methods over the mesh's sp group."""
    if dims.sp_method == "none":
        return
    group = mesh["sp"].get_group()
    set_sequence_group(group)
    if dims.sp_method == "ring":
        from . import ring
        ring.init_ring(group, device)  # communicators made and warmed up now, not in the first layer
        model.config.attention = "ring"
    elif dims.sp_method == "lasp":
        from . import lasp
        model.config.linear_attention = "lasp" if lasp_variant == "ring" else "lasp_allgather"
        model.config.attention = lasp.CONTIGUOUS_SOFTMAX_ATTENTION


def apply_activation_checkpointing(model, mode: str, offload: bool = False) -> None:
    """Recompute activations in the backward instead of storing them.

    full: each decoder layer keeps only its input. selective: only the MLP (with its seq x
    intermediate tensors, cheap to recompute) is recomputed; attention keeps its output and
    log-sum-exp, which cost a second attention pass to recompute at long context. offload (with
    full): the layer inputs that full checkpointing keeps go to (pinned) CPU memory in the forward
    and come back in the backward.
    """
    if mode == "none":
        return
    if mode == "selective":
        for layer in model.layers:
            layer.mlp = checkpoint_wrapper(layer.mlp, preserve_rng_state=False)
        return
    for i, layer in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
        if offload:  # the checkpoint saves the layer's inputs through the saved-tensor hooks
            offload_saved_tensors(model.layers[i])


def offload_saved_tensors(module) -> None:
    """What `module`'s forward saves for the backward is kept in CPU memory (pinned on CUDA)
    until the backward needs it. Hooks, not a wrapper, so parameter names do not change."""
    contexts = []

    def enter(mod, args):
        contexts.append(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
        contexts[-1].__enter__()

    def leave(mod, args, output):
        contexts.pop().__exit__(None, None, None)
    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def parallelize_llama(model, dims: ParallelDims, mesh, cfg, device):
    """Order matters: sequence methods and checkpointing change the plain model before a
    data-parallel backend takes it (FSDP2 shards the checkpoint-wrapped layers).

    DDP returns a wrapper; FSDP2 shards the model in place (it may still be on the meta device:
    `data_parallel.materialize` it afterwards); DeepSpeed needs the optimizer, so the caller builds
    its engine afterwards with `data_parallel.build_deepspeed`.
    """
    apply_sequence_parallel(model, dims, mesh, device, cfg.parallel.lasp_variant)
    apply_activation_checkpointing(model, cfg.train.activation_checkpoint, cfg.train.activation_offload)
    if not dist.is_initialized() or dims.dp_backend in ("none", "deepspeed"):
        return model
    if dims.dp_backend == "ddp":
        return apply_ddp(model, device)
    if dims.dp_backend == "fsdp":
        p = cfg.parallel
        return apply_fsdp(model, world_mesh(mesh), precision=cfg.train.precision,
                          reshard_after_forward=p.reshard_after_forward, cpu_offload=p.cpu_offload)
    raise ValueError(f"parallel.dp_backend={dims.dp_backend!r} is unknown")
