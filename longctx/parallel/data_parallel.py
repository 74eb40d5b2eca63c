"""Data parallelism over the whole dp x sp world: DDP, FSDP2 and DeepSpeed ZeRO 1/2/3.

Parameters are replicated across the sequence-parallel group, so every backend reduces (or
shards) over all dp x sp ranks, and every backend averages gradients over that world: the train
step scales its loss (a sum over this rank's tokens) by world_size / global_tokens to get the
gradient of the mean over the global batch.

    model = apply_ddp(model, device)
    apply_fsdp(model, world_mesh(mesh), precision="bf16_pure", reshard_after_forward=True)
    config = deepspeed_config(...)
    with zero3_init(config):                                  # ZeRO-3 only: built partitioned,
        model = Llama(model_config)                           # then materialize(model, device)
    engine = build_deepspeed(model, optimizer, config)

The three differ in who owns the backward and the optimizer step; `gradient_sync`, `backward`,
`optimizer_step` and `full_state_dict` hide that from the train loop.

Choosing one (configs/parallel/*.yaml, any of them combines with parallel.sp and sp_method):
    parallel=default                          DDP: replicated weights, one all-reduce per step
    parallel=fsdp                             FSDP2: everything sharded per decoder layer; the model
                                              is built on the meta device and each rank allocates
                                              only its shards (pretrained weights: rank 0 reads, sends)
    parallel=deepspeed parallel.zero_stage=N  DeepSpeed ZeRO-1/2/3 with a config generated from ours;
                                              ZeRO-3 builds the model under deepspeed.zero.Init, each
                                              parameter partitioned as it is made (pretrained weights:
                                              rank 0 reads, fills one gathered parameter at a time)
    parallel.cpu_offload=true                 FSDP2: parameters, gradients, optimizer on the CPU;
                                              DeepSpeed: the optimizer (ZeRO-3: parameters too)
Checkpoints: DCP (reshardable) for DDP and FSDP2, DeepSpeed's own format for ZeRO; resume with
the backend that saved. Every backend exports a Hugging Face folder at the end.

Launchers: `torchrun --nproc_per_node N -m longctx.train ...` is the reference.
`accelerate launch --multi_gpu --num_processes N -m longctx.train ...` works as a drop-in for
users who launch everything with accelerate (it sets the same environment as torchrun); leave
accelerate's own --use_fsdp / --use_deepspeed / --mixed_precision unset: longctx does not use
accelerate's Accelerator, the backend and precision come from parallel.* and train.precision.
The `deepspeed` launcher is not supported (use torchrun: the engine is built inside longctx).
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

# precision name (train.precision) -> FSDP2 parameter dtype; gradients are always reduced in fp32
FSDP_PARAM_DTYPE = {"fp32": None, "bf16_autocast": torch.bfloat16, "bf16_pure": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# DDP
# ------------------------------------------------------------------------------------------------
def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    # parameters are replicated over dp x sp: the default (world) group reduces them all
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------
# FSDP2
# ------------------------------------------------------------------------------------------------
def world_mesh(mesh):
    """The dp x sp mesh flattened to one dimension: FSDP2 shards over all of it (a 2-D mesh
    would mean HSDP, replicating over dp)."""
    return mesh["dp", "sp"]._flatten("dp_sp")


def fsdp_mixed_precision(precision: str):
    """bf16 compute copies of fp32 sharded (master) parameters, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if precision not in FSDP_PARAM_DTYPE:
        raise ValueError(f"train.precision={precision!r}: FSDP2 knows {', '.join(FSDP_PARAM_DTYPE)}")
    return MixedPrecisionPolicy(param_dtype=FSDP_PARAM_DTYPE[precision], reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh, precision: str = "fp32", reshard_after_forward: bool = True,
               cpu_offload: bool = False) -> nn.Module:
    """fully_shard each decoder layer (its own all-gather / reduce-scatter group, freed after use
    unless `reshard_after_forward` is False), then the root (embeddings, final norm, head; a tied
    head shares the embedding's shard), which stays gathered from its forward to its backward.

    The model may be on the meta device: shard first, then `materialize` it, so that no rank ever
    holds the whole model. Returns the model, now an FSDPModule, for symmetry with the others.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
    settings = dict(mesh=mesh, mp_policy=fsdp_mixed_precision(precision),
                    # pinned host memory needs a GPU (without one, offloading is only a CPU run)
                    offload_policy=(CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload
                                    else OffloadPolicy()))
    layers = model.layers
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again at once by the backward: keep them gathered
        last = i == len(layers) - 1
        fully_shard(layer, reshard_after_forward=reshard_after_forward and not last, **settings)
    # the root (embeddings, final norm, head) is gathered for the whole forward and read again at
    # once by the backward: resharding in between saves no memory, costs an all-gather, and left
    # the backward on freed storage when FSDP2's pre-backward hook missed the output (torch < 2.14)
    fully_shard(model, reshard_after_forward=False, **settings)
    return model


def materialize(model: nn.Module, device: torch.device, full_state: Optional[dict] = None,
                cpu_offload: bool = False, strict: bool = True) -> None:
    """Initialise a model that no rank holds whole: random initialisation, then, if given, the
    weights of a full state dict that only rank 0 holds (the others pass None); each rank receives
    its shards from rank 0, tensor by tensor. A model built on the meta device and sharded (FSDP2)
    gets real storage first; one built under `zero3_init` has its partitions already. strict=False:
    parameters the state does not hold (LoRA adapters) keep their initialisation."""
    if is_partitioned(model):
        init_partitioned(model)
    else:
        _allocate_and_init(model, device, cpu_offload)
    if _any_rank(full_state is not None, device):
        load_full_state(model, full_state, strict)


def _allocate_and_init(model: nn.Module, device: torch.device, cpu_offload: bool) -> None:
    param_device = torch.device("cpu") if cpu_offload else device
    model.to_empty(device=param_device)
    with torch.no_grad():
        if param_device.type == "cuda":
            # DTensor's RNG tracker draws each shard's part of one full-tensor random stream
            model.init_weights()
        else:
            # for CPU shards it has none: every rank would draw the same numbers into its shard
            # (rows repeated across ranks), so each rank draws its own
            rank = dist.get_rank() if dist.is_initialized() else 0
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch.initial_seed() + rank)
                model.init_weights()
    if cpu_offload and device.type != "cpu":
        # FSDP2 offloads parameters only: buffers (rotary frequencies) live where the compute is
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(device)


def load_full_state(model: nn.Module, full_state: Optional[dict], strict: bool = True) -> None:
    """Load a full state dict that rank 0 holds (the others pass None) into a sharded, partitioned
    or replicated model; every rank receives its part from rank 0, tensor by tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = dict(full_state or {})
    if tied:
        state.pop("lm_head.weight", None)
    if is_partitioned(model):
        import deepspeed
        with torch.no_grad():
            for name, param in model.named_parameters():   # a tied head once, as the embedding
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if dist.get_rank() == 0:
                        param.copy_(state[name])
        return
    set_model_state_dict(model, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=strict and not tied))


def _any_rank(flag: bool, device: torch.device) -> bool:
    """`device`: where the process group's backend reduces (NCCL takes CUDA tensors only)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ------------------------------------------------------------------------------------------------
# DeepSpeed
# ------------------------------------------------------------------------------------------------
def deepspeed_config(zero_stage: int, micro_batch: int, grad_accum: int, precision: str, grad_clip: float,
                     cpu_offload: bool = False) -> dict:
    """The DeepSpeed config implied by ours. The optimizer and the learning-rate schedule stay
    ours (a torch AdamW and a LambdaLR handed to the engine), so that every backend trains alike."""
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage={zero_stage}: DeepSpeed ZeRO stages are 1, 2 and 3")
    zero = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    data_types = {"grad_accum_dtype": "fp32"}
    if zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=1e5,
                    # zero3_init would otherwise swap torch.nn.functional.linear process-wide for its own
                    memory_efficient_linear=False)
        # zero3_init makes every float tensor in the model's dtype: the buffers (rotary frequencies,
        # decay rates) come back to fp32, as the engine keeps them for a model built without it
        data_types["keep_in_fp32_modules"] = ["*"]
    if cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # bf16_pure: a bf16 module with fp32 master weights in the ZeRO optimizer; bf16_autocast keeps
        # fp32 parameters and the train step's autocast
        "bf16": {"enabled": precision == "bf16_pure"},
        "data_types": data_types,
        "zero_allow_untested_optimizer": True,   # our torch AdamW
        "zero_force_ds_cpu_optimizer": False,    # ... also with the optimizer offloaded to the CPU
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """The DeepSpeed engine over the default (dp x sp) group; it wraps `optimizer` in place."""
    engine, _, _, _ = _deepspeed().initialize(model=model, optimizer=optimizer, config=config)
    return engine


def zero3_init(config: dict):
    """The context to build a model in for ZeRO-3 (`config` the engine's): each module's parameters
    are partitioned over the dp x sp ranks as soon as the module is made, so no rank ever holds the
    whole model. The model's `init_weights`, which its constructor runs once the layers are made,
    meets only empty partitions: `materialize` it afterwards."""
    return _deepspeed().zero.Init(config_dict_or_path=config)


def is_partitioned(model: nn.Module) -> bool:
    """Built under `zero3_init` (DeepSpeed's own test, as its engine makes it)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def init_partitioned(model: nn.Module) -> None:
    """The model's own `init_weights` on ZeRO-3 partitions: its walk over `model.modules()` finds
    each module's parameters gathered in turn and keeps rank 0's draws, one module at a time (zero.Init
    gathers for a parent's initialisation only through `Module.apply`). Every rank draws the same
    numbers, and the empty partitions drew none, so a seeded run initialises as one process does."""
    import deepspeed
    every_module = model.modules

    def one_at_a_time():
        for module in every_module():
            with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
                yield module
    model.modules = one_at_a_time
    try:
        model.init_weights()
    finally:
        del model.modules


def _deepspeed():
    import deepspeed
    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)   # its per-stage memory reports drown the training log
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
    return deepspeed


def is_deepspeed(model) -> bool:
    engine = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)   # never import it just to ask
    return engine is not None and isinstance(model, engine)


# ------------------------------------------------------------------------------------------------
# one train step, whatever the backend
# ------------------------------------------------------------------------------------------------
def gradient_sync(model, last: bool):
    """Reduce gradients only with the last micro-batch of a step (the others accumulate locally)."""
    if is_deepspeed(model):
        model.set_gradient_accumulation_boundary(last)
        return nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):          # FSDP2
        return _fsdp_sync(model, last)
    if hasattr(model, "no_sync") and not last:              # DDP
        return model.no_sync()
    return nullcontext()


@contextmanager
def _fsdp_sync(model, last):
    model.set_requires_gradient_sync(last)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def backward(model, loss: torch.Tensor) -> None:
    if is_deepspeed(model):
        # the loss is already normalised by the global token count: no division by grad_accum
        model.backward(loss, scale_wrt_gas=False)
    else:
        loss.backward()


def optimizer_step(model, optimizer, max_norm: float) -> tuple[torch.Tensor, bool]:
    """Clip to `max_norm` (inf: only measure), step, zero the gradients. Returns the gradient norm
    before clipping and whether it was finite. A non-finite step is skipped under DDP and FSDP2;
    DeepSpeed's engine steps before we see its norm (config validation refuses on_nonfinite=skip)."""
    if is_deepspeed(model):
        model.step()   # clips to its gradient_clipping, steps, zeroes the gradients
        norm = model.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm))
        return norm, bool(torch.isfinite(norm))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):                          # FSDP2: a DTensor
        norm = norm.full_tensor()
    finite = bool(torch.isfinite(norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach(), finite


def unwrap(model) -> nn.Module:
    """The plain model under a DDP wrapper or DeepSpeed engine (FSDP2 shards it in place)."""
    return model.module if hasattr(model, "module") else model


def full_state_dict(model) -> Optional[dict]:
    """The whole model's parameters on rank 0's CPU (None elsewhere): copies, never views of the
    live parameters. A collective: call it on every rank. ZeRO-3 gathers one parameter at a time,
    so no rank holds more than the result."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if is_deepspeed(model) and model.zero_optimization_stage() == 3:
        import deepspeed
        state = {}
        # state_dict's names: without the prefix of checkpoint wrappers, a tied head under its own name
        for name, param in model.module.state_dict(keep_vars=True).items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    state[name] = param.detach().to("cpu", copy=True)
        return state if rank == 0 else None
    if is_deepspeed(model):   # ZeRO-1/2: the module holds whole parameters
        state = model.module.state_dict() if rank == 0 else None
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    # on a CPU device (or with offloaded parameters) the tensors above may be the parameters themselves
    on_cpu = any(p.device.type == "cpu" for p in unwrap(model).parameters())
    return {k: v.detach().clone() if on_cpu else v.detach().cpu() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------
# the registry: one record per backend, read by the trainer, the planner, the config checks
# ------------------------------------------------------------------------------------------------
# parallel.* options that only some backends read, and their defaults: set for a backend that does
# not read it, a config error (parallel.reshard_after_forward, FSDP2's, is ignored by the others)
BACKEND_OPTIONS = {"zero_stage": 0, "cpu_offload": False}


def _no_check(cfg) -> None:
    return None


@dataclass(frozen=True)
class DataParallelBackend:
    """How one data-parallel backend reduces, shards and builds. Everything else (the trainer's
    build order, the memory planner, the config checks, `longctx.check`) reads these fields and never
    compares the backend's name.

    - `apply(model, mesh, cfg, device)`: the model to train, given the plain (checkpoint-wrapped,
      LoRA'd) model under torch.distributed (DDP wraps it, FSDP2 shards it in place, DeepSpeed
      leaves it to its engine, which takes the optimizer: `engine_config`);
    - `reads`: the `parallel.*` options besides dp_backend it takes; another backend given one of
      them set is a config error, with the backend's `hints[key]` if it has one;
    - `shards(parallel)`: which of "parameters", "gradients", "optimizer" are split over the ranks;
    - `build(parallel)`: "whole" (each rank builds the model), "meta" (built on the meta device,
      sharded, then materialised: FSDP2), "partitioned" (partitioned as it is built: ZeRO-3);
    - `engine_config(cfg)`: the config of an engine that wraps model and optimizer (DeepSpeed), or None;
    - `reduces_gradients`: False for `none`, which only one process may run;
    - `keeps_fp32_masters`: its mixed precision keeps fp32 masters of bf16 weights (train.precision=bf16_pure);
    - `gradient_copies`: gradients held per parameter beside the parameters (DDP: its buckets too);
    - `early_gradients`: its gradient buffers exist from the backward's start (DDP's and DeepSpeed's
      buckets), rather than made layer by layer;
    - `takes_checkpoint_groups`: built and tested with train.checkpoint_group > 1;
    - `host_offload(parallel, params, world_size)`: {part: bytes} it keeps in host memory;
    - `check(cfg)`: its own option checks, raising ValueError with one line.
    """
    name: str
    summary: str
    apply: Callable
    reads: tuple = ()
    hints: dict = field(default_factory=dict)
    shards: Callable = lambda parallel: frozenset()
    build: Callable = lambda parallel: "whole"
    engine_config: Optional[Callable] = None
    reduces_gradients: bool = True
    keeps_fp32_masters: bool = False
    gradient_copies: int = 1
    early_gradients: bool = False
    takes_checkpoint_groups: bool = True
    host_offload: Callable = lambda parallel, params, world_size: {}
    check: Callable = _no_check


_BACKENDS: dict[str, DataParallelBackend] = {}


def register_backend(backend: DataParallelBackend) -> DataParallelBackend:
    _BACKENDS[backend.name] = backend
    return backend


def backends() -> dict[str, DataParallelBackend]:
    return dict(_BACKENDS)


def get_backend(name: str) -> DataParallelBackend:
    if name not in _BACKENDS:
        raise ValueError(f"parallel.dp_backend={name!r}: choose one of {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


def _apply_fsdp(model, mesh, cfg, device):
    p = cfg.parallel
    return apply_fsdp(model, world_mesh(mesh), precision=cfg.train.precision,
                      reshard_after_forward=p.reshard_after_forward, cpu_offload=p.cpu_offload)


def _check_deepspeed(cfg) -> None:
    if cfg.parallel.zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage={cfg.parallel.zero_stage}: DeepSpeed needs a ZeRO stage, set "
                         "parallel.zero_stage=1, 2 or 3")
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("parallel.dp_backend=deepspeed but DeepSpeed is not installed: pip install deepspeed "
                         "(DS_BUILD_OPS=0 is enough), or use parallel.dp_backend=fsdp")
    if cfg.train.on_nonfinite == "skip":
        raise ValueError("train.on_nonfinite=skip: the DeepSpeed engine steps before the gradient norm is "
                         "known, so it cannot skip a step; use train.on_nonfinite=stop or parallel.dp_backend=fsdp")


def _deepspeed_engine_config(cfg) -> dict:
    t, p = cfg.train, cfg.parallel
    return deepspeed_config(p.zero_stage, t.micro_batch, t.grad_accum, t.precision, cfg.optim.grad_clip,
                            cpu_offload=p.cpu_offload)


def _zero_shards(parallel) -> frozenset:
    return frozenset(["optimizer", "gradients", "parameters"][:parallel.zero_stage])   # ZeRO-1, 2, 3


register_backend(DataParallelBackend(
    name="none", summary="one process, nothing to reduce (what a single-process run uses)",
    apply=lambda model, mesh, cfg, device: model, reduces_gradients=False, early_gradients=False))
register_backend(DataParallelBackend(
    name="ddp", summary="DDP: replicated weights, one all-reduce of the gradients per step",
    apply=lambda model, mesh, cfg, device: apply_ddp(model, device), gradient_copies=2, early_gradients=True,
    hints={"zero_stage": "DDP replicates everything (no ZeRO sharding); use parallel.dp_backend=deepspeed or "
                         "fsdp to shard"}))
register_backend(DataParallelBackend(
    name="fsdp", summary="FSDP2: parameters, gradients and optimizer sharded per decoder layer over dp x sp",
    apply=_apply_fsdp, reads=("cpu_offload", "reshard_after_forward"),
    shards=lambda parallel: frozenset({"parameters", "gradients", "optimizer"}), build=lambda parallel: "meta",
    keeps_fp32_masters=True, takes_checkpoint_groups=False,
    host_offload=lambda p, params, n: {"FSDP2 offload (fp32 params, grads, moments)": params * 16 / n} if p.cpu_offload else {},
    hints={"zero_stage": "FSDP2 always shards parameters, gradients and optimizer state (ZeRO-3; "
                         "parallel.reshard_after_forward=false keeps them gathered between forward and backward)"}))
register_backend(DataParallelBackend(
    name="deepspeed", summary="DeepSpeed ZeRO-1/2/3 (parallel.zero_stage), its engine built around our AdamW",
    apply=lambda model, mesh, cfg, device: model, reads=("zero_stage", "cpu_offload"), shards=_zero_shards,
    build=lambda parallel: "partitioned" if parallel.zero_stage == 3 else "whole",
    engine_config=_deepspeed_engine_config, keeps_fp32_masters=True, early_gradients=True,
    takes_checkpoint_groups=False, check=_check_deepspeed,
    host_offload=lambda p, params, n: {"ZeRO offload (fp32 masters, moments, grads)": params * 16 / n} if p.cpu_offload else {}))


def check_backend_options(cfg) -> None:
    """The backend's own checks, and no `parallel.*` option set that the chosen backend does not read
    (one line naming the backends that do)."""
    p = cfg.parallel
    backend = get_backend(p.dp_backend)
    backend.check(cfg)
    for key, default in BACKEND_OPTIONS.items():
        value = getattr(p, key)
        if key in backend.reads or value == default:
            continue
        readers = " or ".join(name for name, b in _BACKENDS.items() if key in b.reads)
        hint = backend.hints.get(key)
        shown = str(value).lower() if isinstance(value, bool) else value
        raise ValueError(f"parallel.{key}={shown} needs parallel.dp_backend={readers}, not {p.dp_backend}"
                         + (f": {hint}" if hint else "") + f"; or drop parallel.{key}")
