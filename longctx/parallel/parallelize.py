"""Apply parallelism to a plain model, as small functions in a fixed order."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from longctx.model.lora import apply_lora

from .checkpoint_group import group_layers
from .data_parallel import get_backend
from .mesh import ParallelDims
from .offload import ActivationOffloader
from .registry import check_model


def apply_sequence_parallel(model, dims: ParallelDims) -> None:
    """Point the model's token mixers at the method's mixers, over the groups `dims` holds (made by
    `dims.build_mesh`), and remember the dims on the model (`model.sequence_dims`) for the code
    that feeds it a sequence (evaluation). As torchtitan's apply_cp: the model keeps its modules.
    Each layer names its method mixer (`sequence_mixer`); `model.config.attention` stays the user's
    backend choice, which the method's softmax mixer runs its attention on."""
    method = dims.method
    model.sequence_dims = dims
    if method is None:
        return
    check_model(method, dims, model.config)
    for index, layer in enumerate(model.layers):
        layer.self_attn.sequence_mixer = method.mixer_for(model.config.layer_type(index))
        layer.self_attn.mixer_group = dims.mixer_group


def bf16_parameters(model):
    """Every parameter bf16 in place, LoRA adapters included (optim.offload: the fp32 masters are
    the optimizer's, on the host); buffers such as the rotary frequencies keep fp32."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16)
    return model


def apply_activation_checkpointing(model, mode: str, offload: bool = False, group: int = 1,
                                   preserve_rng_state: bool = False, selective_layers: int = 0):
    """Recompute activations in the backward instead of storing them.

    full: each decoder layer keeps only its input. selective: everything but the token mixer is
    recomputed (norms, projections, rotary, MLP: cheap); the mixer's saved tensors (q, k, v, its
    output and log-sum-exp), which would cost a second attention pass to recompute at long context,
    are kept. selective_layers (with full): the first k layers are selective, the rest full: the
    memory plan keeps the mixer outputs of as many layers as fit (train.activation_checkpoint=auto).
    offload (with full): the layer inputs that full checkpointing keeps go to pinned CPU
    memory on a side stream in the forward and come back one layer ahead of need in the backward
    (`offload.py`); the `ActivationOffloader` is returned (None without offload). group (with
    full): one stored input per `group` layers (`checkpoint_group.py`); offload then moves the
    groups' inputs.
    preserve_rng_state (full): the recomputation draws the forward's random numbers again (LoRA's
    dropout needs it).
    """
    if mode == "none":
        return None
    if mode == "selective":
        selective_layers = len(model.layers)
    elif mode != "full":
        raise ValueError(f"train.activation_checkpoint={mode!r}: choose one of none, full, selective "
                         "(auto is resolved before the model is built)")
    if selective_layers and (offload or group > 1):
        raise ValueError(f"train.selective_layers={selective_layers} mixes selective layers into per-layer full "
                         "checkpointing: drop train.checkpoint_group and train.activation_offload")
    for i, layer in enumerate(model.layers):
        if i < selective_layers:
            layer.recompute_around_mixer = True
        else:
            model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=preserve_rng_state)
    units = group_layers(model, group, preserve_rng_state) if group > 1 else model.layers
    if not offload:
        return None
    offloader = ActivationOffloader()  # the checkpoints save the layer (or group) inputs through its hooks
    offloader.attach(units)
    return offloader


def parallelize_llama(model, dims: ParallelDims, mesh, cfg, device):
    """Order matters: sequence methods, LoRA adapters and checkpointing change the plain model
    before a data-parallel backend takes it (FSDP2 shards the checkpoint-wrapped layers, adapters
    and frozen base together, per layer).

    The data-parallel backend's record applies it (`data_parallel.get_backend`): DDP returns a
    wrapper; FSDP2 shards the model in place (it may still be on the meta device:
    `data_parallel.materialize` it afterwards); DeepSpeed needs the optimizer, so the caller builds
    its engine afterwards from the record's `engine_config` (`data_parallel.build_deepspeed`).
    """
    apply_sequence_parallel(model, dims)
    lora = cfg.lora
    if lora.enabled:   # on the plain layers: checkpoint wrappers and FSDP2 then take the adapters as they are
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules, lora.trainable, seed=cfg.train.seed)
    if cfg.optim.offload:   # after LoRA, so that the adapters are bf16 too; before DDP takes the parameters
        bf16_parameters(model)
    apply_activation_checkpointing(model, cfg.train.activation_checkpoint, cfg.train.activation_offload,
                                   cfg.train.checkpoint_group, preserve_rng_state=lora.enabled and lora.dropout > 0,
                                   selective_layers=cfg.train.selective_layers)
    if not dist.is_initialized():
        return model
    return get_backend(dims.dp_backend).apply(model, mesh, cfg, device)
