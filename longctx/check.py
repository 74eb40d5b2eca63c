"""Parity check of a parallel layout: one training step of your config against one device.

    torchrun --nproc_per_node 4 -m longctx.check experiment=... train.seq_len=8192 [key=value ...]

Takes the first global batch of your data, runs one optimizer step through the configured layout
(data-parallel backend, sequence parallelism, precision, checkpointing), and the same step on
rank 0 alone with the plain model (no sequence split, no data-parallel wrapper, the configured
attention kernels) from the same weights; prints the loss, the gradient norm and the parameters
after the step of both, their relative differences and a verdict. A loss that moves when sequence
parallelism is switched on is the most reported bug of long-context trainers: this proves yours
does not. Exit status 1 when a difference exceeds the tolerance of the precision.

The reference needs the model, its gradients and optimizer state, and the whole global batch on
one device: pick a train.seq_len that fits (the layout logic does not depend on the length).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from longctx.cli import show_help_and_exit
from longctx.parallel.data_parallel import get_backend
from longctx.train.config import REPO_ROOT, Config, ConfigError, register_configs, resolve_auto, validate
from longctx.train.console import exit_with_launcher, quiet_libraries
from longctx.train.errors import one_line_errors, refuse_bad_overrides

# relative differences a correct layout stays under (float32 round-off, or bf16's) for the loss and
# the gradient norm, and for the parameters' change in the step (Adam's first step is about
# lr * sign(gradient), so round-off flips the update of tiny gradients: a looser bound)
TOLERANCE = {"fp32": 1e-4, "bf16_autocast": 3e-2, "bf16_pure": 3e-2}
UPDATE_TOLERANCE = {"fp32": 1e-2, "bf16_autocast": 0.3, "bf16_pure": 0.3}


def check(cfg: Config) -> dict:
    """Run the check (a collective: every rank calls it); rank 0 returns the report, others {}."""
    from longctx.data import build_loader
    from longctx.parallel import data_parallel
    from longctx.train import train as T

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    quiet_libraries()
    dims = validate(cfg, world_size)
    resolve_auto(cfg, dims)
    device = T.init_distributed(cfg.train.device)
    mesh = dims.build_mesh(device.type)
    t = cfg.train
    autocast = T.precision_context(t, device)
    is_main = T.rank() == 0
    torch.manual_seed(t.seed)

    model, train_model, optimizer, _ = T.build_train_model(cfg, dims, mesh, device)
    start_state = data_parallel.full_state_dict(train_model)        # rank 0 only
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    loader = build_loader(cfg.data, seq_len=t.seq_len, micro_batch=t.micro_batch, dp_rank=dp_rank,
                          dp_size=dims.dp, pad_multiple=dims.seq_divisor, seed=t.seed)
    data = iter(loader)
    micro_batches = [T.shard_batch(next(data), dims, device) for _ in range(t.grad_accum)]
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    train_model.train()
    loss = T.forward_backward(train_model, micro_batches, dims.world_size, autocast)
    grad_norm, _ = data_parallel.optimizer_step(train_model, optimizer, max_norm)
    end_state = data_parallel.full_state_dict(train_model)

    report = {}
    if is_main:
        reference = _reference_step(cfg, dims, start_state, device, autocast, max_norm)
        report = _compare(cfg, dims, loss.item(), float(grad_norm), start_state, end_state, reference)
    if dist.is_initialized():
        dist.barrier()   # the others wait while rank 0 runs the reference
    return report


def _reference_step(cfg: Config, dims, start_state: dict, device, autocast, max_norm) -> dict:
    """One process, one device: the plain model, the whole global batch, the same step."""
    from longctx.data import build_loader
    from longctx.parallel import data_parallel
    from longctx.parallel.mesh import ParallelDims
    from longctx.train import train as T
    t = cfg.train
    model = T.build_model(cfg, device)
    if cfg.lora.enabled:   # the same adapters on the plain model: start_state holds their values
        from longctx.model.lora import apply_lora
        lora = cfg.lora
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules, lora.trainable)
    _load(model, start_state)
    optimizer, _ = T.build_optimizer(model, cfg)
    # the same sequences: all dp ranks' rows of each micro-batch, packed with the same divisor
    loader = build_loader(cfg.data, seq_len=t.seq_len, micro_batch=t.micro_batch * dims.dp, dp_rank=0,
                          dp_size=1, pad_multiple=dims.seq_divisor, seed=t.seed)
    data = iter(loader)
    one = ParallelDims(world_size=1, dp=1, sp=1, dp_backend="none")
    micro_batches = [T.shard_batch(next(data), one, device) for _ in range(t.grad_accum)]
    loss = T.forward_backward(model, micro_batches, 1, autocast, reduce=lambda x: x).item()
    grad_norm, _ = data_parallel.optimizer_step(model, optimizer, max_norm)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"loss": loss, "grad_norm": float(grad_norm), "state": state}


def _load(model, state: dict) -> None:
    state = dict(state)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict({k: v.to(next(model.parameters()).dtype) for k, v in state.items()},
                          strict=not model.config.tie_word_embeddings)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _compare(cfg: Config, dims, loss: float, grad_norm: float, start: dict, state: dict, reference: dict) -> dict:
    """Loss and gradient norm, and each parameter's change in the step (parallel vs one device)."""
    ref_state = reference["state"]
    ignore = {"lm_head.weight"} if cfg.model.tie_word_embeddings else set()
    names = sorted((set(state) & set(ref_state)) - ignore)
    missing = sorted((set(ref_state) ^ set(state)) - ignore)
    diff_sq = norm_sq = 0.0
    worst = ("", 0.0)
    for name in names:
        base = start[name].double()
        a, b = state[name].double() - base, ref_state[name].double() - base
        d, n = (a - b).norm().item(), b.norm().item()
        diff_sq, norm_sq = diff_sq + d * d, norm_sq + n * n
        if n and d / n > worst[1]:
            worst = (name, d / n)
    tolerance = TOLERANCE[cfg.train.precision]
    result = {
        "layout": f"dp={dims.dp} x sp={dims.sp}", "sp_method": dims.sp_method, "dp_backend": dims.dp_backend,
        "zero_stage": cfg.parallel.zero_stage if "zero_stage" in get_backend(dims.dp_backend).reads else None,
        "precision": cfg.train.precision, "seq_len": cfg.train.seq_len,
        "sequences": cfg.train.micro_batch * cfg.train.grad_accum * dims.dp,
        "loss": loss, "reference_loss": reference["loss"], "loss_rel_diff": _relative(loss, reference["loss"]),
        "grad_norm": grad_norm, "reference_grad_norm": reference["grad_norm"],
        "grad_norm_rel_diff": _relative(grad_norm, reference["grad_norm"]),
        "update_rel_diff": (diff_sq / max(norm_sq, 1e-30)) ** 0.5, "worst_param": worst[0],
        "worst_param_rel_diff": worst[1], "missing_params": missing, "tolerance": tolerance,
        "update_tolerance": UPDATE_TOLERANCE[cfg.train.precision],
    }
    result["ok"] = (not missing and result["loss_rel_diff"] <= tolerance and result["grad_norm_rel_diff"] <= tolerance
                    and result["update_rel_diff"] <= result["update_tolerance"])
    return result


def format_report(r: dict) -> str:
    backend = r["dp_backend"] + (f" ZeRO-{r['zero_stage']}" if r["zero_stage"] else "")
    lines = [f"parity check: {r['layout']} ({r['sp_method']}), {backend}, {r['precision']}, one step of "
             f"{r['sequences']} sequences x {r['seq_len']} tokens, against one device",
             f"{'':12}{'parallel':>16}{'one device':>16}{'rel. diff':>12}",
             f"{'loss':12}{r['loss']:16.8f}{r['reference_loss']:16.8f}{r['loss_rel_diff']:12.2e}",
             f"{'grad norm':12}{r['grad_norm']:16.8f}{r['reference_grad_norm']:16.8f}{r['grad_norm_rel_diff']:12.2e}",
             f"{'update':12}{'':32}{r['update_rel_diff']:12.2e}  (the step's parameter change; worst "
             f"{r['worst_param']}: {r['worst_param_rel_diff']:.2e})"]
    if r["missing_params"]:
        lines.append(f"parameters in one model only: {r['missing_params'][:10]}")
    verdict = "PASS" if r["ok"] else "FAIL"
    lines.append(f"{verdict}: tolerance {r['tolerance']:.0e} (update {r['update_tolerance']:.0e}) for {r['precision']}"
                 + ("" if r["ok"] else "; the layout does not train like one device: please report it"))
    return "\n".join(lines)


register_configs()


@hydra.main(config_path=str(Path(REPO_ROOT) / "configs"), config_name="config", version_base="1.3")
def main(cfg) -> None:
    from longctx.train import train as T
    try:
        with one_line_errors():   # the trainer's handling of a user's mistake: one line, no traceback
            try:
                config = OmegaConf.to_object(cfg)   # model shape checks run here
            except ValueError as error:
                raise ConfigError(str(error)) from error
            report = check(config)
        if report:
            print(format_report(report), flush=True)
        # on the run's device: NCCL reduces CUDA tensors only (init_distributed is idempotent)
        failed = T.on_any_rank(T.init_distributed(config.train.device), not report.get("ok", True))[0]
        T.end_distributed()
    finally:
        T.end_distributed(wait=False)   # a rank leaving on an error: its process group down all the same
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    show_help_and_exit(__doc__)
    exit_with_launcher()
    refuse_bad_overrides()   # unknown keys, with or without +, as the trainer refuses them
    main()
