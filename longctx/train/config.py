"""The typed schema of a training run, registered with Hydra, and its checks.

The YAML files under `configs/` fill these dataclasses; OmegaConf rejects unknown keys and wrong
types, and `validate` checks what needs more than a type, before any model or GPU work.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from longctx.data import DataConfig
from longctx.data.sharegpt import PROJECT_ROOT, sharegpt_v3_path
from longctx.model import ModelConfig
from longctx.model.lora import LORA_TARGETS
from longctx.parallel.data_parallel import get_backend

if TYPE_CHECKING:
    from longctx.parallel.mesh import ParallelDims


@dataclass
class ModelSection(ModelConfig):
    """A model shape (every field of longctx.model.ModelConfig), or a pretrained HF folder."""
    name: str = "tiny"
    pretrained: Optional[str] = None       # a Hugging Face folder (llama, mistral, qwen2, qwen3); its config.json wins
                                           # over the shape (except the rope settings below when set), and
                                           # its tokenizer is data.tokenizer's default
    # None: ModelConfig's default for a new model, the checkpoint's value for a pretrained one; set,
    # they replace the checkpoint's (extending its context: rope_scaling={rope_type: yarn, factor: 8},
    # original_max_position_embeddings defaulting to the checkpoint's max_position_embeddings)
    rope_theta: Optional[float] = None
    # typed Any: OmegaConf can neither merge a command-line {rope_type: yarn, ...} into a None-valued
    # Dict node nor add keys to an empty one; {rope_type: default} removes a checkpoint's scaling
    rope_scaling: Any = None
    max_position_embeddings: Optional[int] = None

    def __post_init__(self):
        if self.pretrained is None:
            return super().__post_init__()
        # the rope settings are checked over the checkpoint's config (model_shape), which fills in
        # what they leave out (YaRN's original length)
        scaling, self.rope_scaling = self.rope_scaling, None
        super().__post_init__()
        self.rope_scaling = scaling


def _model_section() -> ModelSection:
    """The schema's model section with head_dim left unset: the dataclass resolves it on creation from
    its own defaults (256 / 8 = 32), which would stick over a YAML or override that changes the hidden
    size or heads; unset, the composed section resolves it from theirs."""
    section = ModelSection()
    section.head_dim = None
    return section


@dataclass
class ParallelSection:
    dp_backend: str = "ddp"                # none | ddp | fsdp | deepspeed
    dp: int = -1                           # -1: world size / sp
    sp: int = 1
    sp_method: str = "none"                # none | ring | lasp | lasp_allgather | ulysses | usp (longctx/parallel/registry.py)
    ulysses: int = 1                       # usp only: ranks of a Ulysses group (sp = ulysses x ring)
    lasp_variant: Optional[str] = None     # replaced by parallel.sp_method=lasp_allgather; set: an error saying so
    zero_stage: int = 0                    # deepspeed only, and required there: 1 | 2 | 3
    reshard_after_forward: bool = True     # fsdp only (false: parameters stay gathered after the forward, as ZeRO-2)
    cpu_offload: bool = False              # fsdp: params+grads+optimizer; deepspeed: optimizer (stage 3: params too)


# optim.lr and optim.warmup_steps left unset (null) are chosen by what the run starts from: a model
# initialised from scratch (the tiny one learns at 3e-3), or loaded weights, which a from-scratch lr
# wrecks (SmolLM2-135M at 3e-3: loss 1.16 -> 2.17 in four steps), finetuned as usual at 2e-5
# (2e-4 for LoRA adapters) with a few percent of the steps as warmup.
SCRATCH_LR, SCRATCH_WARMUP = 3e-3, 5
FINETUNE_LR, LORA_FINETUNE_LR, FINETUNE_WARMUP_FRACTION = 2e-5, 2e-4, 0.03


@dataclass
class OptimSection:
    lr: Optional[float] = None             # None: 3e-3 from scratch; 2e-5 with model.pretrained (2e-4 with LoRA)
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: Optional[int] = None     # None: 5 from scratch; 3 % of train.steps (at least 1) with model.pretrained
    schedule: str = "cosine"               # cosine | linear | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0                 # 0 disables clipping (the norm is still logged)
    offload: bool = False                  # fp32 masters and AdamW moments in host memory, stepped on the
                                           # CPU (train/offload_adamw.py); bf16 weights and gradients on the GPU


@dataclass
class TrainSection:
    seq_len: int = 1024
    micro_batch: int = 1
    grad_accum: int = 1
    steps: int = 40
    precision: str = "auto"                # auto (bf16_autocast on CUDA, fp32 on CPU) | bf16_autocast | bf16_pure | fp32
    activation_checkpoint: str = "none"    # none | full | selective (recompute all but the token mixer) |
                                           # auto (on a GPU: the least recompute the memory plan fits)
    selective_layers: int = 0              # with full: the first k layers selective instead (their token mixers'
                                           # outputs kept, not recomputed); auto sets it from the memory plan
    activation_offload: bool = False       # with full: the kept layer inputs wait in CPU memory
    checkpoint_group: int = 1              # with full: one stored input per k layers (parallel/checkpoint_group.py)
    seed: int = 0
    device: str = "auto"                   # auto | cpu | cuda
    on_nonfinite: str = "stop"             # stop | skip: what a NaN/inf loss or gradient norm does
    resume: str = "auto"                   # auto (newest intact checkpoint of run_dir, if any) | none | a folder
    resume_force: bool = False             # resume even if model, data, optimizer, seq_len, seed, precision or
                                           # global batch differ from the checkpoint's
    threads: int = 0                       # CPU threads per process (0: torch's default)
    max_minutes: float = 0.0               # end the run (checkpoint, export) after the step that reaches this
                                           # many minutes of steps (0: no limit; the lr schedule stays train.steps')


@dataclass
class CheckpointSection:
    every: int = 0                         # save every k steps (0: only at the end)
    every_minutes: float = 30.0            # and when this long has passed since the last save (0: never)
    keep: int = 2                          # keep the last n
    at_end: bool = True
    export_hf: bool = True                 # write a Hugging Face folder at the end


@dataclass
class LoraSection:
    """LoRA adapters (peft) on the decoder layers' projections; everything else is frozen."""
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0                    # the update is (alpha / rank) * B @ A
    dropout: float = 0.0                   # on the adapters' input
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))
    trainable: List[str] = field(default_factory=list)   # modules trained in full (peft's modules_to_save),
                                           # matched as peft matches them: names ending so (norm: every norm)
    merge_on_export: bool = True           # hf/ holds base + adapters merged (false: the base, beside adapter/)


@dataclass
class LoggingSection:
    every: int = 1
    wandb: str = "disabled"                # disabled | offline | online
    project: str = "longctx"
    progress_bar: bool = True
    comm_every: int = 10                   # profile every k-th step for its communication wait (0: never)


@dataclass
class Config:
    model: ModelSection = field(default_factory=_model_section)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    lora: LoraSection = field(default_factory=LoraSection)
    run_dir: Optional[str] = None          # None: runs/<timestamp>, chosen by rank 0
    experiment: Optional[str] = None       # set by experiment presets, for logs

    def __post_init__(self):
        self.optim_defaults_note = resolve_optim_defaults(self)


def resolve_optim_defaults(cfg: Config) -> Optional[str]:
    """Fill optim.lr and optim.warmup_steps the user left unset (see FINETUNE_LR); returns the line
    that says so when finetuning defaults were taken (printed once by the trainer), else None."""
    o, pretrained = cfg.optim, cfg.model.pretrained is not None
    chosen = []
    if o.lr is None:
        o.lr = (LORA_FINETUNE_LR if cfg.lora.enabled else FINETUNE_LR) if pretrained else SCRATCH_LR
        chosen.append(f"optim.lr={o.lr:g}")
    if o.warmup_steps is None:
        o.warmup_steps = max(1, round(FINETUNE_WARMUP_FRACTION * cfg.train.steps)) if pretrained else SCRATCH_WARMUP
        chosen.append(f"optim.warmup_steps={o.warmup_steps}")
    if not (pretrained and chosen):
        return None
    return (f"optim: finetuning defaults for the weights of model.pretrained: {', '.join(chosen)}, then "
            f"{o.schedule} to {o.min_lr_ratio:g} x lr (set optim.lr / optim.warmup_steps to choose)")


class ConfigError(ValueError):
    """A config that cannot run; its message names the key and the fix."""


REPO_ROOT = str(PROJECT_ROOT)   # the checkout, or the copy of configs/ and data/ inside an installed wheel


def command_line_overrides(argv: list[str]) -> list:
    """The overrides of a command line as Hydra parses them (Hydra's `Override` objects); raises
    HydraException on a syntax error."""
    from hydra._internal.utils import get_args_parser   # the parser hydra.main uses on argv
    from hydra.core.override_parser.overrides_parser import OverridesParser
    args, _ = get_args_parser().parse_known_args(argv)
    return OverridesParser.create().parse_overrides(args.overrides)


def sweep_job_folder(number, task_overrides, max_length: int = 150) -> str:
    """A sweep job's run folder name: its number, then the values it takes of the swept keys
    (`3-optim.lr=0.003,train.seed=1`), cut to a length any file system takes; the number alone
    keeps names unique, and the run's config.yaml holds everything."""
    swept = {o.key_or_group for o in command_line_overrides(sys.argv[1:]) if o.is_sweep_override()}
    chosen = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") in swept]
    name = f"{number}-{','.join(chosen)}".replace("/", "_")
    return name if len(name) <= max_length else name[:max_length - 3] + "..."


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("sharegpt_v3_path"):
        OmegaConf.register_new_resolver("sharegpt_v3_path", sharegpt_v3_path)
    if not OmegaConf.has_resolver("sweep_job_folder"):
        OmegaConf.register_new_resolver("sweep_job_folder", sweep_job_folder)
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", required)


def required(key: str, what: str):
    """`${required:model.pretrained,<what it is>}`: a setting a preset cannot run without (a `???` in
    a preset would not replace the schema's default when merged: the run would start without it)."""
    raise ValueError(f"{key} is not set: this preset needs {what} ({key}=<...>)")


def _choice(value: str, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: choose one of {', '.join(allowed)}")


def _in_range(key: str, value: float, low: float, high: float = math.inf, low_open: bool = False,
              high_open: bool = False) -> None:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        bounds = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf else
                  f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
        raise ValueError(f"{key}={value} must be {bounds}")


def _check_ranges(cfg: Config) -> None:
    """Numbers that type checks let through but the optimizer, scheduler or loop cannot use."""
    o = cfg.optim
    _in_range("optim.lr", o.lr, 0, low_open=True)
    if len(o.betas) != 2:
        raise ValueError(f"optim.betas={list(o.betas)} must be two numbers, e.g. optim.betas=[0.9,0.95]")
    for i, beta in enumerate(o.betas):
        _in_range(f"optim.betas[{i}]", beta, 0, 1, high_open=True)
    _in_range("optim.eps", o.eps, 0, low_open=True)
    _in_range("optim.weight_decay", o.weight_decay, 0)
    _in_range("optim.warmup_steps", o.warmup_steps, 0)
    _in_range("optim.min_lr_ratio", o.min_lr_ratio, 0, 1)
    _in_range("optim.grad_clip", o.grad_clip, 0)
    for key in ("seq_len", "micro_batch", "grad_accum", "steps"):
        _in_range(f"train.{key}", getattr(cfg.train, key), 1)
    _in_range("train.threads", cfg.train.threads, 0)
    _in_range("train.max_minutes", cfg.train.max_minutes, 0)
    _in_range("checkpoint.every", cfg.checkpoint.every, 0)
    _in_range("checkpoint.keep", cfg.checkpoint.keep, 0)
    _in_range("checkpoint.every_minutes", cfg.checkpoint.every_minutes, 0)
    _in_range("logging.every", cfg.logging.every, 1)
    _in_range("logging.comm_every", cfg.logging.comm_every, 0)


def resolve_tokenizer(cfg: Config) -> None:
    """data.tokenizer left unset (null) follows the model: model.pretrained's own tokenizer (and with it
    its chat template) where its folder holds one, else the repository's Llama-3 tokenizer."""
    from longctx.data.config import DEFAULT_TOKENIZER, holds_tokenizer
    if cfg.data.tokenizer is None:
        pretrained = cfg.model.pretrained
        cfg.data.tokenizer = pretrained if pretrained and holds_tokenizer(pretrained) else DEFAULT_TOKENIZER


def check_tokenizer_fits(cfg: Config, max_token_id: int) -> None:
    """The model must have an embedding row for every token id the data holds (else an IndexError
    on a CPU, a device assert on a GPU, at the first step). Ids the tokenizer has but the data never
    uses (the shipped Llama-3 tokenizer's <|image|>, 128256) do no harm."""
    m = cfg.model
    if m.pretrained:
        from longctx.model.hf import load_hf_config
        vocab_size = load_hf_config(m.pretrained).vocab_size
        if max_token_id >= vocab_size:
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} gives token id {max_token_id} but "
                              f"model.pretrained={m.pretrained} has {vocab_size} embeddings: use the "
                              f"tokenizer the model was trained with (data.tokenizer={m.pretrained})")
    elif max_token_id >= m.vocab_size:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} gives token id {max_token_id} but "
                          f"model.vocab_size={m.vocab_size}: set model.vocab_size={max_token_id + 1} "
                          f"or more, or use a smaller tokenizer")


def validate(cfg: Config, world_size: int) -> "ParallelDims":
    """Check what types cannot, before any model or GPU work; return the parallel layout.

    Raises ConfigError with one line that names the key and the fix.
    """
    try:
        return _validate(cfg, world_size)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error


def _validate(cfg: Config, world_size: int) -> "ParallelDims":
    from longctx.parallel.mesh import ParallelDims
    t = cfg.train
    _choice(t.precision, ("auto", "bf16_autocast", "bf16_pure", "fp32"), "train.precision")
    _choice(t.activation_checkpoint, ("none", "full", "selective", "auto"), "train.activation_checkpoint")
    if t.activation_offload and t.activation_checkpoint != "full":
        raise ValueError("train.activation_offload=true moves the layer inputs that full checkpointing keeps: "
                         "set train.activation_checkpoint=full")
    _choice(t.on_nonfinite, ("stop", "skip"), "train.on_nonfinite")
    _choice(t.device, ("auto", "cpu", "cuda"), "train.device")
    _choice(cfg.optim.schedule, ("cosine", "linear", "constant"), "optim.schedule")
    if cfg.parallel.lasp_variant is not None:
        raise ValueError(f"parallel.lasp_variant={cfg.parallel.lasp_variant} is gone: the variant is the method now, "
                         "set parallel.sp_method=lasp (state passed rank to rank) or lasp_allgather (LASP-2) "
                         "and drop parallel.lasp_variant")
    _choice(cfg.logging.wandb, ("disabled", "offline", "online"), "logging.wandb")
    _check_ranges(cfg)
    if t.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    p = cfg.parallel
    dims = ParallelDims.from_sizes(world_size, dp=p.dp, sp=p.sp, sp_method=p.sp_method, ulysses=p.ulysses,
                                   dp_backend=p.dp_backend if world_size > 1 else "none")
    from longctx.model.attention import check_attention
    check_attention(cfg.model.attention, sequence_parallel=dims.method is not None)
    if world_size > 1 and not dp_backend(cfg).reduces_gradients:
        raise ValueError(f"{world_size} processes need a data-parallel backend to reduce gradients: "
                         f"set parallel.dp_backend to one of ddp, fsdp, deepspeed")
    if t.seq_len % dims.seq_divisor:
        raise ValueError(f"train.seq_len={t.seq_len} is not a multiple of {dims.seq_divisor}, which "
                         f"{dims.sp_method} over sp={dims.sp} needs; use "
                         f"train.seq_len={(t.seq_len // dims.seq_divisor + 1) * dims.seq_divisor}")
    _check_data_parallel(cfg, dims)
    if dims.method is not None and dims.method.needs_kernel:
        import torch
        from longctx.ops.dispatch import INTERPRETED
        if not (t.device != "cpu" and torch.cuda.is_available()) and not INTERPRETED:
            raise ValueError(f"parallel.sp_method={dims.sp_method} runs Triton kernels only: train on CUDA GPUs "
                             "(train.device=auto or cuda), or set TRITON_INTERPRET=1 on a CPU (slow; tests)")
    m = cfg.model
    if m.pretrained is not None and not os.path.isfile(os.path.join(m.pretrained, "config.json")):
        raise ValueError(f"model.pretrained={m.pretrained}: no Hugging Face config.json there")
    resolve_tokenizer(cfg)
    shape = model_shape(cfg)   # the model's real shape: a pretrained folder's config.json wins
    if cfg.checkpoint.export_hf and shape.layer_types is None:
        # found now, not at the end of the run: what the family's checkpoint cannot state
        from longctx.model.families import get_family
        get_family(shape.family).check_exportable(shape)
    _check_checkpoint_group(cfg, shape.num_hidden_layers)
    _check_selective_layers(cfg, shape.num_hidden_layers)
    if dims.method is not None:   # the method's head constraints and layer kinds
        from longctx.parallel.registry import check_model
        check_model(dims.method, dims, shape)
    _check_optimizer_offload(cfg)
    if t.precision == "bf16_pure" and not get_backend(dims.dp_backend).keeps_fp32_masters and not cfg.optim.offload:
        raise ValueError("train.precision=bf16_pure keeps fp32 master weights through FSDP2's or "
                         "DeepSpeed's mixed precision, or on the host with optim.offload=true: set "
                         "parallel.dp_backend=fsdp or deepspeed, or optim.offload=true, or use "
                         "train.precision=bf16_autocast")
    if cfg.lora.enabled:
        _check_lora(cfg, shape)
    cfg.data.validate()
    if cfg.data.long_examples.ratio > 0:   # a long example is one row: its lengths against train.seq_len
        cfg.data.long_examples.length_range(t.seq_len)
    return dims


def resolve_auto(cfg: Config, dims: "ParallelDims", gpu_gib: Optional[float] = None) -> list[str]:
    """Make every automatic setting concrete, once, right after `validate` and before anything reads
    them: the run's config.yaml then records what ran, and nothing later changes the config.

    - train.device=auto: cuda where a GPU is visible, else cpu;
    - train.precision=auto: bf16_autocast on CUDA, fp32 on a CPU;
    - train.activation_checkpoint=auto: on CUDA the least recompute the memory plan fits in the
      GPU's memory (`gpu_gib`, default: this process's GPU) and its share of the host's, possibly
      full with train.selective_layers=k (longctx/train/plan.py); on a CPU none (nothing to plan);
    - parallel.dp_backend: the backend that runs, `dims.dp_backend` (none on one process).
    Returns one line per setting it changed, for the log.
    """
    import torch
    from longctx.train import plan
    t, p, changed = cfg.train, cfg.parallel, []

    def note(key: str, before, after, why: str = "") -> None:
        if before != after:
            changed.append(f"{key}={before} -> {after}{f' ({why})' if why else ''}")
    cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    note("train.device", t.device, device)
    t.device = device
    precision = ("bf16_autocast" if cuda else "fp32") if t.precision == "auto" else t.precision
    note("train.precision", t.precision, precision)
    t.precision = precision
    note("parallel.dp_backend", p.dp_backend, dims.dp_backend, f"{dims.world_size} process(es)")
    p.dp_backend = dims.dp_backend
    if t.activation_checkpoint == "auto":
        if cuda:
            if gpu_gib is None:
                index = int(os.environ.get("LOCAL_RANK", 0))
                gpu_gib = torch.cuda.get_device_properties(index).total_memory / 2**30
            # the host's memory, shared by this node's processes, bounds what activation offload may take
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / per_node
            changed.append(plan.resolve_checkpointing(cfg, dims.world_size, gpu_gib, host_gib).strip())
        else:
            t.activation_checkpoint = "none"
            changed.append("train.activation_checkpoint=auto -> none (a CPU: no device memory to plan for)")
    return changed


def dp_backend(cfg: Config):
    """The record of cfg's parallel.dp_backend (longctx/parallel/data_parallel.py's registry)."""
    return get_backend(cfg.parallel.dp_backend)


def _check_checkpoint_group(cfg: Config, layers: int) -> None:
    t = cfg.train
    if t.checkpoint_group < 1:
        raise ValueError(f"train.checkpoint_group={t.checkpoint_group} must be at least 1 (1: one stored input per layer)")
    if t.checkpoint_group > 1 and t.activation_checkpoint != "full":
        raise ValueError(f"train.checkpoint_group={t.checkpoint_group} groups the layers of full checkpointing: "
                         "set train.activation_checkpoint=full")
    if t.checkpoint_group > layers:
        raise ValueError(f"train.checkpoint_group={t.checkpoint_group} is larger than the model's {layers} layers: "
                         f"use at most train.checkpoint_group={layers}")
    if t.checkpoint_group > 1 and not dp_backend(cfg).takes_checkpoint_groups:
        raise ValueError(f"train.checkpoint_group={t.checkpoint_group} is built and tested with "
                         f"parallel.dp_backend none or ddp, not {cfg.parallel.dp_backend}: drop train.checkpoint_group")


def _check_selective_layers(cfg: Config, layers: int) -> None:
    """train.selective_layers mixes selective layers into full checkpointing (what `auto` resolves to
    when some but not all layers' mixer outputs fit); grouped or offloaded inputs are full-only."""
    t, k = cfg.train, cfg.train.selective_layers
    if k == 0:
        return
    if not 0 < k <= layers:
        raise ValueError(f"train.selective_layers={k} must be in [0, {layers}] (the model's layers)")
    if t.activation_checkpoint != "full":
        raise ValueError(f"train.selective_layers={k} makes k layers of full checkpointing selective: set "
                         f"train.activation_checkpoint=full (or auto), or drop train.selective_layers")
    if t.checkpoint_group > 1 or t.activation_offload:
        raise ValueError(f"train.selective_layers={k} mixes selective layers into per-layer full checkpointing: "
                         "drop train.checkpoint_group and train.activation_offload, or train.selective_layers")


def _check_optimizer_offload(cfg: Config) -> None:
    if not cfg.optim.offload:
        return
    backend = cfg.parallel.dp_backend
    if "optimizer" in dp_backend(cfg).shards(cfg.parallel):
        raise ValueError(f"optim.offload=true steps a whole copy of the model per rank (dp_backend none or ddp); "
                         f"with parallel.dp_backend={backend} use parallel.cpu_offload=true instead")
    if cfg.train.precision != "bf16_pure":
        raise ValueError(f"optim.offload=true keeps bf16 weights on the device and fp32 masters on the host: "
                         f"set train.precision=bf16_pure (not {cfg.train.precision})")


def _check_data_parallel(cfg: Config, dims) -> None:
    """Backend options that the chosen backend cannot honour (its record's checks and `reads`)."""
    from longctx.parallel.data_parallel import check_backend_options
    check_backend_options(cfg)


def _check_lora(cfg: Config, shape: ModelConfig) -> None:
    from longctx.model.lora import check_lora
    check_lora(shape, **{k: v for k, v in dataclasses.asdict(cfg.lora).items() if k not in ("enabled", "merge_on_export")})


def model_shape(cfg: Config) -> ModelConfig:
    """The model's shape: a pretrained folder's config.json, or the model section's fields."""
    from longctx.model.hf import load_hf_config
    m = cfg.model
    return load_hf_config(m.pretrained, **rope_overrides(m)) if m.pretrained else ModelConfig(**model_fields(m))


ROPE_OVERRIDES = ("rope_theta", "rope_scaling", "max_position_embeddings")


def rope_overrides(section: ModelSection) -> dict:
    """The rope settings given for a pretrained model (those left None keep the checkpoint's)."""
    return {k: getattr(section, k) for k in ROPE_OVERRIDES if getattr(section, k) not in (None, {})}


def model_fields(section: ModelSection) -> dict:
    fields = dataclasses.asdict(section)
    fields.pop("name"), fields.pop("pretrained")
    for key in ROPE_OVERRIDES:   # unset: ModelConfig's default
        if fields[key] in (None, {}):
            fields.pop(key)
    return fields
