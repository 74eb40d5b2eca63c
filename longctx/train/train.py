"""The training loop: config -> data -> model -> parallelism -> steps -> checkpoints.

Launched as `python -m longctx.train key=value ...` or `torchrun --nproc_per_node N -m longctx.train ...`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from contextlib import nullcontext
from datetime import datetime, timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from . import plan
from longctx.data import build_loader
from longctx.data.sharegpt import resolve_path
from longctx.data.template import export_tokenizer, stop_token_ids
from longctx.model import Llama, ModelConfig, load_hf, save_hf
from longctx.model.config import IMPLEMENTATION_FIELDS
from longctx.model.hf import check_state_dict, load_hf_config, load_hf_state_dict
from longctx.model.attention import with_host_bounds
from longctx.model.llama import shift_labels
from longctx.model.lora import model_state_names, plain_state, save_adapter
from longctx.ops.cross_entropy import IGNORE_INDEX
from longctx.parallel import data_parallel
from longctx.parallel.data_parallel import backward, gradient_sync, optimizer_step
from longctx.parallel.parallelize import parallelize_llama

from .checkpoint import Checkpointer, rng_state, set_rng_state
from .comm import CommProfiler
from .config import (Config, ConfigError, ROPE_OVERRIDES, check_tokenizer_fits, model_fields, resolve_auto,
                     rope_overrides, validate)
from .console import StopSignal, closing_summary, interrupted_exit, quiet_libraries
from .metrics import MetricsLogger, peak_tflops, training_flops
from .offload_adamw import OffloadedAdamW
from .errors import RunError
from .run_folder import (RunLock, check_resume_settings, check_run_dir_usable, clean_stale_saves, math_settings,
                         refuse_used_run_dir, write_config)
from .schedule import check_schedule_change, follow_config_schedule, lr_factor


def init_distributed(device_choice: str) -> torch.device:
    cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        # data preparation on rank 0 may take long: the others wait in a collective meanwhile
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2),
                                device_id=device if cuda else None)
        _OWN_GROUP.append(True)
    return device


_OWN_GROUP: list = []   # non-empty once init_distributed made the process group (end_distributed ends only that)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def decide_run_dir(cfg: Config) -> tuple[Path, RunLock | None]:
    """Rank 0 decides (ranks started a second apart must not make two folders) and locks the folder
    for the run's lifetime (its lock, returned, is None on the other ranks); the others receive the
    folder, or the one-line error when another run holds it.

    Without `run_dir` a new folder runs/<time> is made, never an existing one (two runs started in
    the same second, as the jobs of a sweep can be, would otherwise resume each other)."""
    choice, lock = [cfg.run_dir, None], None
    if rank() == 0:
        if choice[0] is None:
            stamp, suffix = os.path.join("runs", datetime.now().strftime("%Y%m%d-%H%M%S")), 0
            while True:
                choice[0] = stamp + (f"-{suffix}" if suffix else "")
                try:
                    os.makedirs(choice[0])
                    break
                except FileExistsError:
                    suffix += 1
        Path(choice[0]).mkdir(parents=True, exist_ok=True)
        lock = RunLock(choice[0])
        try:
            lock.acquire()
        except ConfigError as error:
            lock, choice[1] = None, str(error)
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[1] is not None:
        raise ConfigError(choice[1])
    return Path(choice[0]), lock


def build_model(cfg: Config, device: torch.device, on_meta: bool = False, zero3_config: dict | None = None) -> Llama:
    """The plain model with its weights, or one no rank ever holds whole: only its shape (on_meta),
    for FSDP2 to shard before `materialize` allocates each rank's shards; or, with the DeepSpeed
    config of ZeRO-3, partitioned over the ranks module by module as it is built, then given its
    weights. bf16 copies of the weights are the data-parallel backend's business (FSDP2's policy,
    DeepSpeed's bf16 mode), which keep fp32 masters."""
    m = cfg.model
    # the implementation knobs are the run's, also over a pretrained folder (whose config.json wins for the
    # rest, except the rope settings when set)
    overrides = {k: getattr(m, k) for k in IMPLEMENTATION_FIELDS}
    if m.pretrained:
        overrides.update(rope_overrides(m))
        if overrides.keys() & set(ROPE_OVERRIDES) and rank() == 0:
            print("model.pretrained: " + ", ".join(f"{k}={overrides[k]}" for k in ROPE_OVERRIDES if k in overrides)
                  + " over the checkpoint's config.json", flush=True)
    if m.pretrained and not on_meta and zero3_config is None:
        return load_hf(m.pretrained, device=device, **overrides)
    config = load_hf_config(m.pretrained, **overrides) if m.pretrained else ModelConfig(**model_fields(m))
    if zero3_config is not None:
        with data_parallel.zero3_init(zero3_config):
            model = Llama(config)
        materialize(model, cfg, device)
        return model
    with torch.device("meta" if on_meta else device):
        return Llama(config)


def materialize(model, cfg: Config, device: torch.device) -> None:
    """Initialise a model that no rank holds whole (sharded on the meta device, or partitioned):
    random weights, or the pretrained ones read by rank 0 alone and sent to each rank's shards (a
    whole 8B model never sits on one GPU)."""
    state = None
    if cfg.model.pretrained and rank() == 0:
        state = load_hf_state_dict(cfg.model.pretrained)
        with torch.device("meta"):   # the shapes to check against (ZeRO-3's partitions show none)
            check_state_dict(Llama(model.config), state)
        # LoRA adapters already in place (FSDP2 shards them with the base): the base weights
        # under the adapted names; the adapters keep their initialisation
        state = model_state_names(state, model)
    data_parallel.materialize(model, device, state, cpu_offload=cfg.parallel.cpu_offload, strict=not cfg.lora.enabled)


def build_train_model(cfg: Config, dims, mesh, device):
    """Model, parallelism and optimizer, in the order each backend needs: FSDP2 shards a meta
    model before it is allocated; ZeRO-3 partitions the model as it is built (with the engine's
    config); DeepSpeed's engine wraps the optimizer."""
    backend = data_parallel.get_backend(dims.dp_backend)
    # one process without a process group runs the plain model, whatever the config names
    build = backend.build(cfg.parallel) if dist.is_initialized() else "whole"
    engine_config = backend.engine_config(cfg) if dist.is_initialized() and backend.engine_config else None
    model = build_model(cfg, device, on_meta=build == "meta",
                        zero3_config=engine_config if build == "partitioned" else None)
    train_model = parallelize_llama(model, dims, mesh, cfg, device)
    if build == "meta":
        materialize(train_model, cfg, device)
    optimizer, scheduler = build_optimizer(train_model, cfg)
    if engine_config is not None:
        train_model = data_parallel.build_deepspeed(train_model, optimizer, engine_config)
    return model, train_model, optimizer, scheduler


def frozen_base(cfg: Config, dims) -> dict | None:
    """What rebuilds a LoRA run's frozen base, which its checkpoints do not hold (None: nothing is
    frozen): the pretrained folder, or the seed and layout of a random initialisation."""
    if not cfg.lora.enabled:
        return None
    if cfg.model.pretrained:
        return {"pretrained": cfg.model.pretrained}
    return {"seed": cfg.train.seed, "dp_backend": dims.dp_backend, "world_size": dims.world_size}


def lr_lambda(cfg):
    return lr_factor(cfg.optim, cfg.train.steps)


def build_optimizer(model, cfg):
    o = cfg.optim

    def is_matrix(p):   # a ZeRO-3 partition is flat: the parameter's shape is its ds_shape
        return len(getattr(p, "ds_shape", p.shape)) >= 2
    decay = [p for p in model.parameters() if p.requires_grad and is_matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not is_matrix(p)]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = OffloadedAdamW if o.offload else torch.optim.AdamW
    optimizer = adamw(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def shard_batch(batch: dict, dims, device) -> dict:
    """Shift labels on the whole sequence, then give this rank its share of ids, labels and
    positions (one permutation for all three). cu_seqlens keeps describing the whole sequence."""
    labels = shift_labels(batch["labels"])
    local = {"input_ids": batch["input_ids"], "labels": labels, "position_ids": batch["position_ids"]}
    local = {k: dims.split(v, dim=1) for k, v in local.items()}
    local = {k: v.to(device, non_blocking=True) for k, v in local.items()}
    # the documents' bounds stay known on the host: the model's max_seqlen and the ring and LASP
    # plans would otherwise read them back from the GPU mid-step
    local["cu_seqlens"] = with_host_bounds(batch["cu_seqlens"], device)
    return local


def data_tokens(batches: list[dict], dims, device) -> int:
    """The step's tokens of data over all data-parallel ranks, padding left out (what tok/s counts).
    The ranks of one sequence-parallel group hold the same sequences: the sum over the world counts
    each of them world_size / dp times."""
    local = torch.tensor(sum(int(b["num_tokens"]) for b in batches), dtype=torch.int64, device=device)
    return int(all_reduce(local)) // (dims.world_size // dims.dp)


def peak_memory_gib(device) -> float:
    """Peak GPU memory allocated in this step, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def on_any_rank(device, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any rank: every rank must save or stop at the same step
    (one collective for all the flags)."""
    values = torch.tensor([float(flag) for flag in flags], device=device)
    return [bool(v) for v in all_reduce(values, dist.ReduceOp.MAX).tolist()]


def train(cfg: Config) -> Path:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    quiet_libraries()                              # before validate, which may import DeepSpeed
    dims = validate(cfg, world_size)               # every config error surfaces here, before any work
    resolved = resolve_auto(cfg, dims)             # every "auto" made concrete, once: config.yaml says what ran
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = init_distributed(cfg.train.device)
    mesh = dims.build_mesh(device.type)
    t = cfg.train
    check_before_data(cfg)
    # data and tokenizer are checked before the run folder exists: a run that cannot start leaves none
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    loader = build_loader(cfg.data, seq_len=t.seq_len, micro_batch=t.micro_batch, dp_rank=dp_rank,
                          dp_size=dims.dp, pad_multiple=dims.seq_divisor, seed=t.seed, grad_accum=t.grad_accum)
    check_tokenizer_fits(cfg, loader.max_token_id)
    made_here = cfg.run_dir is None or not Path(cfg.run_dir).exists()   # by this run: removed if it never starts
    run_dir, lock = decide_run_dir(cfg)
    if rank() == 0:   # said once the run is sure to start (a refused one says its one line only)
        notes = resolved + ([cfg.optim_defaults_note] if getattr(cfg, "optim_defaults_note", None) else [])
        if notes:
            print("\n".join(notes), flush=True)
    stop = None
    try:
        stop = StopSignal(is_main=rank() == 0)
        run(cfg, world_size, dims, device, mesh, run_dir, loader, stop)
    except ConfigError:
        if made_here and lock is not None:   # the folder of a run that never started: nothing of it is kept
            lock.release()
            lock = None
            remove_if_unused(run_dir)
        raise
    finally:
        if stop is not None:
            stop.restore()
        if lock is not None:
            lock.release()
    end_distributed()
    if stop.signum == signal.SIGINT:   # a Ctrl-C'd run is not a finished one, for the shell and scripts
        raise SystemExit(interrupted_exit(stop.signum))
    return run_dir


def check_before_data(cfg: Config) -> None:
    """What the run folder and train.resume would refuse, found before the data is prepared (rank 0
    looks; every rank raises its one line): an unwritable run_dir, a used one with train.resume=none,
    a train.resume that names no checkpoint."""
    problem = [None]
    if rank() == 0:
        try:
            check_run_dir_usable(cfg.run_dir)
            if cfg.run_dir is not None and cfg.train.resume == "none":
                refuse_used_run_dir(Path(cfg.run_dir))
            resume = cfg.train.resume
            if resume not in ("auto", "none") and not (Path(resume) / "manifest.json").is_file():
                what = "no such folder" if not Path(resume).exists() else "not a checkpoint (no manifest.json)"
                raise ConfigError(f"train.resume={resume}: {what}; name a checkpoint folder "
                                  "(<run_dir>/checkpoints/step_N), or use train.resume=auto or none")
        except ConfigError as error:
            problem[0] = str(error)
    if dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ConfigError(problem[0])


def remove_if_unused(run_dir: Path) -> None:
    """A folder this run made and never wrote to (only its lock files): removed."""
    if rank() != 0:
        return
    leftovers = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if leftovers <= {".lock", ".lock.owner"}:
        for name in leftovers:
            (run_dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def end_distributed(wait: bool = True) -> None:
    """Every rank past its last collective (`wait`), then the process group down before the
    interpreter ends: left to the interpreter's exit, its threads are destroyed in no particular
    order and now and then abort the process ("terminate called without an active exception")."""
    if dist.is_initialized() and _OWN_GROUP:   # a group a caller made (a test's) is the caller's to end
        if wait:
            dist.barrier()
        dist.destroy_process_group()
        _OWN_GROUP.clear()


def run(cfg: Config, world_size: int, dims, device: torch.device, mesh, run_dir: Path, loader,
        stop: StopSignal) -> Path:
    """The run in its locked folder: resume point, model, steps, checkpoints."""
    is_main, t = rank() == 0, cfg.train
    autocast = precision_context(t, device)
    if device.type == "cuda" and is_main:   # the memory plan of the resolved settings, before any GPU work
        print(plan.report(cfg, world_size, torch.cuda.get_device_properties(device).total_memory / 2**30))
    torch.manual_seed(t.seed)

    # where to resume, checked (files against their manifest, settings against the saved ones)
    # before any heavy work
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep)
    if is_main:   # the lock is held: a .tmp here is the leftover of a save that died
        clean_stale_saves(checkpointer.folder)
    resume_from = checkpointer.resume_point(t.resume)
    settings = math_settings(cfg, dims.dp)
    start = 0
    if resume_from is not None:
        saved = checkpointer.read_meta(resume_from)
        check_resume_settings(saved["settings"], settings, resume_from, force=t.resume_force)
        check_schedule_change(saved, cfg, resume_from, force=t.resume_force, say=is_main)
        if saved.get("frozen_base") != frozen_base(cfg, dims):
            raise ConfigError(f"{resume_from} was saved over the frozen base {saved.get('frozen_base')}, which "
                              f"checkpoints do not store, and this run builds {frozen_base(cfg, dims)} (None: full "
                              "finetuning): resume with the lora.enabled, model.pretrained, train.seed and layout it was saved with")
        start = saved["step"]
    if is_main:
        write_config(run_dir, cfg, start)

    model, train_model, optimizer, scheduler = build_train_model(cfg, dims, mesh, device)
    model_config = model.config

    if resume_from is not None:
        shared, mine = checkpointer.load(resume_from, train_model, optimizer)
        scheduler.load_state_dict(shared["scheduler"])
        follow_config_schedule(scheduler, cfg.optim.lr)
        # the global data position: any number of ranks resumes it; a forced resume over other data,
        # seq_len or seed starts this run's data from its beginning
        if not loader.load_state_dict(shared["loader"], strict=not t.resume_force) and is_main:
            print("train.resume_force=true: the data, seq_len or seed changed, so the data starts from its "
                  "beginning", flush=True)
        if mine is not None:   # saved by as many ranks: each goes on with its own RNG streams
            set_rng_state(mine["rng"])
        if is_main:
            print(f"resumed from {resume_from} at step {start}", flush=True)
    elif is_main:
        print(f"no checkpoint in {checkpointer.folder}: starting at step 1" if t.resume == "auto"
              else "train.resume=none: starting at step 1", flush=True)

    def save(step) -> Path:
        return checkpointer.save(step, train_model, optimizer,
                                 shared={"scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                                         "settings": settings, "frozen_base": frozen_base(cfg, dims),
                                         "train.steps": t.steps},
                                 per_rank={"rng": rng_state()})

    peak = peak_tflops(device)
    logger = (MetricsLogger(run_dir, cfg.logging, t.steps, start, OmegaConf.to_container(OmegaConf.structured(cfg)))
              if is_main else None)
    comm = CommProfiler(cfg.logging.comm_every, device)
    stop.last_saved = start or None
    data = iter(loader)
    train_model.train()
    step = saved_at = start
    saved_time = time.monotonic()
    checkpoint, export_dir, final_loss, loop_start = None, None, None, time.perf_counter()
    tokens_trained = 0
    preempted = False
    for step in range(start + 1, t.steps + 1):
        step_start = time.perf_counter()
        comm.start(step)                               # profiles one step in logging.comm_every
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batches = [next(data) for _ in range(t.grad_accum)]
        # MFU counts attention within the packed documents; rank 0's batches stand for each dp rank's
        step_flops = dims.dp * sum(training_flops(model_config, b["cu_seqlens"]) for b in batches)
        micro_batches = [shard_batch(b, dims, device) for b in batches]
        step_tokens = data_tokens(batches, dims, device)
        tokens_trained += step_tokens
        loss = forward_backward(train_model, micro_batches, dims.world_size, autocast)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm, finite = optimizer_step(train_model, optimizer, max_norm)   # skips a non-finite step
        finite = finite and bool(torch.isfinite(loss))
        if not finite and t.on_nonfinite == "stop":
            saved = f"the last checkpoint is step {stop.last_saved}" if stop.last_saved else "no checkpoint was saved"
            raise RunError(f"step {step}: loss {loss.item()} / grad norm {grad_norm.item()} is not finite ({saved}); "
                           "lower optim.lr or raise optim.warmup_steps, or set train.on_nonfinite=skip to skip such steps")
        lr = scheduler.get_last_lr()[0]                # the rate this step's update used
        scheduler.step()
        step_s = time.perf_counter() - step_start
        comm_metrics = comm.stop(step_s)               # comm_wait_s, comm_frac on a profiled step
        if is_main:
            tok_s = step_tokens / step_s
            metrics = {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                       "tok_s": tok_s, "tok_s_per_gpu": tok_s / dims.world_size, "step_s": step_s,
                       "skipped": not finite,
                       "peak_gib": peak_memory_gib(device),
                       "mfu": step_flops / (step_s * dims.world_size * peak * 1e12) if peak else None,
                       **comm_metrics}
            logger.log(step, metrics)
            final_loss = metrics["loss"]
        minutes = cfg.checkpoint.every_minutes
        preempted, time_due, out_of_time = on_any_rank(
            device, stop.requested, minutes > 0 and time.monotonic() - saved_time >= minutes * 60,
            t.max_minutes > 0 and time.perf_counter() - loop_start >= t.max_minutes * 60)
        if out_of_time and not preempted:   # a time budget ends the run as its last step would
            if is_main and step < t.steps:
                print(f"train.max_minutes={t.max_minutes:g}: stopping after step {step} of {t.steps}", flush=True)
            break
        if preempted or time_due or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            checkpoint = save(step)
            saved_at, saved_time = step, time.monotonic()
            stop.last_saved = step
        if preempted:
            if is_main:
                print(f"{stop.name or 'SIGTERM'}: saved a checkpoint at step {step} in {run_dir}; resume with "
                      f"run_dir={run_dir} train.resume=auto", flush=True)
            break
    if not preempted:   # the steps are done (or train.max_minutes is): save and export as at the end
        if cfg.checkpoint.at_end and saved_at != step:
            checkpoint = save(step)
        if cfg.checkpoint.export_hf and model_config.layer_types is None:
            export_dir = export(train_model, model, run_dir, cfg)
    if logger is not None:
        logger.close()
        print(closing_summary(start + 1, step, tokens_trained, time.perf_counter() - loop_start,
                              final_loss, checkpoint, export_dir), flush=True)
    return run_dir


def precision_context(t, device):
    """The forward's autocast context for train.precision (bf16_pure: the backend's bf16 weights, no
    autocast); `auto`, which `resolve_auto` makes concrete before this, reads as it resolves."""
    precision = t.precision if t.precision != "auto" else "bf16_autocast" if device.type == "cuda" else "fp32"
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16_autocast" else nullcontext()


def forward_backward(train_model, micro_batches: list[dict], world_size: int, autocast,
                     reduce=all_reduce) -> torch.Tensor:
    """Forward and backward of one step's micro-batches; returns the loss of the global batch.

    The loss is the sum over this rank's valid tokens divided by the global count, so that
    micro-batches and ranks with different numbers of valid tokens (even none) weigh right.
    `reduce` sums over the ranks (identity: one process alone, as `longctx.check`'s reference).
    """
    local_tokens = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches).float()
    global_tokens = reduce(local_tokens.clone()).clamp(min=1)
    loss_sum = torch.zeros((), device=local_tokens.device)
    for i, mb in enumerate(micro_batches):
        with gradient_sync(train_model, last=i == len(micro_batches) - 1), autocast:
            out = train_model(mb["input_ids"], position_ids=mb["position_ids"], cu_seqlens=mb["cu_seqlens"],
                              labels=mb["labels"], labels_shifted=True, loss_reduction="sum")
            # data-parallel backends average gradients over the world (dp x sp): scale back to a sum
            backward(train_model, out.loss * (world_size / global_tokens))
        loss_sum += out.loss.detach().float()
    return reduce(loss_sum) / global_tokens


def export(train_model, model, run_dir: Path, cfg: Config) -> Path:
    """Gather the full state (a collective) and write a Hugging Face folder `hf/` from rank 0, with the
    tokenizer and chat template the model was trained with; with LoRA also peft's adapter folder
    `adapter/`, and `hf/` holds the base with the adapters merged (lora.merge_on_export) or the base
    alone. Returns the `hf/` folder."""
    state = data_parallel.full_state_dict(train_model)
    folder = run_dir / "hf"
    if rank() != 0:
        return folder
    lora = cfg.lora
    if lora.enabled:
        save_adapter(run_dir / "adapter", state, model.config, lora.rank, lora.alpha, lora.dropout,
                     lora.target_modules, lora.trainable, base_model=cfg.model.pretrained)
        state = plain_state(state, lora.alpha / lora.rank if lora.merge_on_export else None)
        print(f"exported the LoRA adapter (peft) to {run_dir / 'adapter'}")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_path(cfg.data.tokenizer_path, "data.tokenizer")))
    tokenizer = export_tokenizer(tokenizer, cfg.data.chat_template)
    save_hf(model, folder, state=state, tokenizer=tokenizer, stop_token_ids=stop_token_ids(tokenizer))
    return folder
