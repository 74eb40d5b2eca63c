#!/usr/bin/env python
"""A full training step (forward, backward, gradient clipping, AdamW) of a LLaMA shape on one GPU:
longctx against Hugging Face `LlamaForCausalLM` (SDPA) with Liger's kernels (`hf_liger`: RMSNorm,
RoPE, SwiGLU and the fused linear cross entropy, what LLaMA-Factory's `enable_liger_kernel` and
axolotl's Liger plugin switch on) and without them (`hf`), in the same run, at equal activation
checkpointing and precision:

    python scripts/bench_train.py                          # 1B shape, 8K/32K/128K, both precisions
    python scripts/bench_train.py --model 8b --seqlens 65536 131072 --precisions bf16_pure \
        --set parallel.dp_backend=deepspeed --set parallel.zero_stage=2 --set parallel.cpu_offload=true

Each row names both sides' settings (`model`, `checkpoint`, `precision`, `lora`), so a longctx row
and a peer row with the same values compare directly:
- precision `bf16_autocast`: longctx keeps fp32 weights and runs under bf16 autocast (as its trainer
  does on one GPU); HF likewise, fp32 weights under autocast.
- precision `bf16_pure`: longctx computes in bf16 from fp32 master weights (FSDP2's mixed precision,
  here over a one-rank process group: the trainer reaches FSDP2 only under torchrun); HF holds its
  weights, gradients and AdamW states in bf16. `master_weights` says which.
- checkpoint `full`: longctx recomputes each decoder layer (train.activation_checkpoint=full), HF's
  `gradient_checkpointing_enable()`; `none` switches both off; `selective` is longctx's alone.
longctx's rows are built from its Hydra config as the trainer builds them (`build_train_model`),
with the blockwise MLP at 64K tokens and the loss in chunks of 8K; `--set key=value` overrides any
config key for them (last wins), and a config that names parallel.dp_backend=fsdp or deepspeed runs
that backend over a one-rank process group (`dp_backend`, `cpu_offload` in the row). Both sides use
the trainer's AdamW and its gradient clipping, on one sequence of random ids, with expandable
allocator segments as the trainer sets them. Figures: `ms` per step, `tok_s`, `peak_gib` (GPU
allocated), `host_peak_gib` (the process's resident peak during the row), `mfu`; longctx rows also
carry the memory planner's `plan_gib`. A setting that runs out of GPU memory is a row with
`"oom": true`, one that fails otherwise a row with its `error` (the traceback goes to stderr), and
the run goes on.
`--layers-at LEN:N[:offload]` times a longctx model cut to N layers at LEN tokens (full
checkpointing), to check the planner at lengths a whole model step would take minutes at.
`--smoke`: the tiny model with a 2K vocabulary at 64 tokens, one step, on whatever device there is
(on a CPU, Triton's interpreter; only Liger's RoPE and fused cross entropy run there, see
LIGER_KERNELS_INTERPRETED).
Writes bench/results/train_<device>.json (DESIGN.md's format).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext

# as the trainer sets it (longctx/train/__main__.py), for both sides: read when CUDA first allocates
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when Triton kernels are defined: before longctx

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import torch.distributed as dist  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from longctx.train import plan  # noqa: E402
from longctx.model import ModelConfig  # noqa: E402
from longctx.model.llama import resolve_attention, shift_labels  # noqa: E402
from longctx.parallel import data_parallel  # noqa: E402
from longctx.parallel.mesh import ParallelDims  # noqa: E402
from longctx.train import train as trainer  # noqa: E402
from longctx.train.config import REPO_ROOT, Config, ConfigError, model_fields, register_configs, validate  # noqa: E402
from longctx.train.metrics import peak_tflops, training_flops_per_token  # noqa: E402
from benchlib import device_slug, host_peak_gib, reset_host_peak, result_head  # noqa: E402

MODEL_ALIASES = {"1b": "llama3.2-1b", "8b": "llama3-8b"}
PRECISIONS = ("bf16_autocast", "bf16_pure")
HF_WEIGHT_DTYPE = {"bf16_autocast": torch.float32, "bf16_pure": torch.bfloat16}
BENCH_DEFAULTS = ["model.mlp_chunk_size=65536", "model.loss_chunk_size=8192"]
LIGER_KERNELS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")
# Triton's CPU interpreter hands float scalar arguments to a kernel as Python floats, and Liger's
# RMSNorm and SwiGLU kernels call .to() on theirs (eps, gate_multiplier): those two cannot run there
LIGER_KERNELS_INTERPRETED = ("rope", "fused_linear_cross_entropy")


def compose_config(model: str, seq_len: int, precision: str, checkpoint: str, device: str, sets: list) -> Config:
    """The trainer's config for one longctx row; `sets` (the user's --set) come last and win."""
    from hydra import compose, initialize_config_dir
    overrides = [f"model={model}", f"train.seq_len={seq_len}", f"train.precision={precision}",
                 f"train.activation_checkpoint={checkpoint}", f"train.device={device}", *BENCH_DEFAULTS]
    if precision == "bf16_pure":
        overrides.append("parallel.dp_backend=fsdp")
    try:
        with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "configs"), version_base="1.3"):
            cfg = compose("config", overrides=overrides + list(sets))
        return OmegaConf.to_object(cfg)
    except Exception as error:   # Hydra's override and composition errors, the schema's checks
        raise SystemExit(f"error: --set {' '.join(sets) or '(none)'}: {error}".splitlines()[0]) from None


def parallel_dims(cfg: Config) -> ParallelDims:
    """Validate as the trainer does on one process; then a config that names FSDP2 or DeepSpeed
    (bf16_pure needs one; --set parallel.dp_backend=deepspeed parallel.zero_stage=2
    parallel.cpu_offload=true offloads the optimizer) gets that backend over a one-rank process
    group. The trainer builds those only under torchrun, so validation on one process refuses
    bf16_pure: that row's other keys are checked with the precision it accepts."""
    pure = cfg.train.precision == "bf16_pure"
    if pure:
        cfg.train.precision = "bf16_autocast"
    try:
        dims = validate(cfg, 1)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        if pure:
            cfg.train.precision = "bf16_pure"
    if cfg.parallel.dp_backend in ("fsdp", "deepspeed"):
        return ParallelDims(world_size=1, dp=1, sp=1, dp_backend=cfg.parallel.dp_backend)
    if pure:
        raise SystemExit("error: train.precision=bf16_pure needs parallel.dp_backend=fsdp or deepspeed")
    return dims


def one_rank_group(device: torch.device):
    """A process group of this process alone (FSDP2 and DeepSpeed need one; made at the first row
    that uses it, so that a failure is that row's) and its (dp, sp) mesh."""
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)   # as torchrun sets them: DeepSpeed's engine reads LOCAL_RANK
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                world_size=1, rank=0, device_id=device if device.type == "cuda" else None)
    return ParallelDims(world_size=1, dp=1, sp=1).build_mesh(device.type)


def random_batch(vocab_size: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """One sequence of random ids, and the micro-batch the trainer's step takes for it (labels
    shifted, one document: no cu_seqlens, as HF gets none)."""
    ids = torch.randint(0, vocab_size, (1, seq_len), device=device)
    return ids, {"input_ids": ids, "labels": shift_labels(ids), "cu_seqlens": None,
                 "position_ids": torch.arange(seq_len, device=device)[None]}


def autocast_for(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16_autocast" else nullcontext()


def longctx_step(cfg: Config, dims: ParallelDims, device: torch.device):
    """The trainer's model, optimizer and step (forward_backward, then optimizer_step)."""
    mesh = one_rank_group(device) if dims.dp_backend != "none" else None
    _, train_model, optimizer, _ = trainer.build_train_model(cfg, dims, mesh, device)
    _, batch = random_batch(cfg.model.vocab_size, cfg.train.seq_len, device)
    autocast = autocast_for(cfg.train.precision, device)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    def step():
        trainer.forward_backward(train_model, [batch], 1, autocast)
        data_parallel.optimizer_step(train_model, optimizer, max_norm)
    lora = any(not p.requires_grad for p in train_model.parameters())   # adapters train, the rest is frozen
    return step, lora


@contextmanager
def liger_patched(kernels: tuple):
    """transformers' Llama with Liger's kernels while the block runs. apply_liger_kernel_to_llama
    swaps classes and functions in transformers' modeling_llama for every model made afterwards,
    so they are put back on leaving: later `hf` rows get plain Hugging Face."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama
    saved = dict(vars(modeling_llama))
    saved_forward = modeling_llama.LlamaForCausalLM.forward
    apply_liger_kernel_to_llama(**{k: k in kernels for k in LIGER_KERNELS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if getattr(modeling_llama, name) is not value:
                setattr(modeling_llama, name, value)
        modeling_llama.LlamaForCausalLM.forward = saved_forward


def hf_step(cfg: Config, device: torch.device):
    """Hugging Face's model at the row's precision and checkpointing, with the trainer's optimizer
    and clipping (what the transformers Trainer does too: AdamW, max_grad_norm=1)."""
    import transformers
    hf_config = ModelConfig(**model_fields(cfg.model)).to_hf()
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):   # made in its dtype on the GPU: no fp32 copy of a bf16 model on the way
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=HF_WEIGHT_DTYPE[cfg.train.precision])
    if cfg.train.activation_checkpoint == "full":
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    optimizer, _ = trainer.build_optimizer(model, cfg)
    ids, _ = random_batch(cfg.model.vocab_size, cfg.train.seq_len, device)
    autocast = autocast_for(cfg.train.precision, device)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        data_parallel.optimizer_step(model, optimizer, max_norm)
    return step, False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def print_profile(step, top: int) -> None:
    """One more step under the profiler: the kernels, then the PyTorch ops (with the kernels they
    launched), that took the most GPU time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=70), flush=True)
    ops = [e for e in events if e.key.startswith("aten::")]
    ops.sort(key=lambda e: e.device_time_total, reverse=True)
    print(f"{'PyTorch op':<40} {'calls':>6} {'GPU ms':>9}")
    for e in ops[:top]:
        print(f"{e.key:<40} {e.count:>6} {e.device_time_total / 1e3:>9.1f}")


def measure(impl: str, cfg: Config, name: str, device: torch.device, steps: int, warmup: int,
            dims=None, sets=(), profile: int = 0) -> dict:
    t, m = cfg.train, ModelConfig(**model_fields(cfg.model))
    liger = (LIGER_KERNELS if device.type == "cuda" else LIGER_KERNELS_INTERPRETED) if impl == "hf_liger" else ()
    row = {"bench": "train_step", "impl": impl, "model": name, "seqlen": t.seq_len, "gpus": int(device.type == "cuda"),
           "layers": m.num_hidden_layers, "mode": "fwd_bwd_optim", "checkpoint": t.activation_checkpoint,
           "precision": t.precision, "lora": False,
           "master_weights": "bf16" if impl != "longctx" and t.precision == "bf16_pure" else "fp32",
           "offload": t.activation_offload if impl == "longctx" else False,
           "attention": resolve_attention(m.attention, torch.empty(0, device=device)) if impl == "longctx" else "sdpa",
           "mlp_chunk": m.mlp_chunk_size if impl == "longctx" else 0}
    if impl == "longctx":
        row.update(dp_backend=dims.dp_backend, cpu_offload=cfg.parallel.cpu_offload, overrides=" ".join(sets))
    if liger:
        row["liger"] = ",".join(liger)   # rows stay flat (DESIGN.md)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    reset_host_peak()
    step = None
    try:
        with liger_patched(liger) if liger else nullcontext():
            step, row["lora"] = (longctx_step(cfg, dims, device) if impl == "longctx" else hf_step(cfg, device))
            seconds = time_steps(step, steps, warmup, device)
            if profile and device.type == "cuda":
                print_profile(step, profile)
        peak = peak_tflops(device) if device.type == "cuda" else None
        tok_s = t.seq_len / seconds
        row.update(ms=seconds * 1e3, tok_s=tok_s,
                   mfu=tok_s * training_flops_per_token(m, t.seq_len) / (peak * 1e12) if peak else None)
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as error:   # one setting failing ends its row only: the run goes on to the next
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    step = None   # the model, its gradients and optimizer state go before the next row
    gc.collect()
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row["host_peak_gib"] = host_peak_gib()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if impl == "longctx":
        row["plan_gib"] = plan.estimate(cfg, 1).total / 2**30
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def print_ratios(rows: list) -> None:
    """longctx against each peer row with the same shape keys: tokens/s and peak memory ratios."""
    # where the optimizer or the master weights live changes the step too: a row of longctx with its
    # optimizer on the host is not paired with a peer that keeps AdamW on the GPU
    keys = ("model", "seqlen", "layers", "checkpoint", "precision", "lora", "master_weights", "offload", "cpu_offload")
    ours = {tuple(r.get(k, False) for k in keys): r for r in rows if r["impl"] == "longctx" and "tok_s" in r}
    print(f"{'peer':<9} {'tokens':>7} {'precision':<14} {'ckpt':<5} {'tok/s ours':>10} {'peer':>8} {'ratio':>6} "
          f"{'GiB ours':>8} {'peer':>6}")
    for peer in rows:
        mine = ours.get(tuple(peer.get(k, False) for k in keys))
        if peer["impl"] == "longctx" or mine is None:
            continue
        theirs = "oom" if peer.get("oom") else "error" if "error" in peer else f"{peer['tok_s']:.0f}"
        ratio = f"{mine['tok_s'] / peer['tok_s']:.2f}" if "tok_s" in peer else "-"
        print(f"{peer['impl']:<9} {peer['seqlen']:>7} {peer['precision']:<14} {peer['checkpoint']:<5} "
              f"{mine['tok_s']:>10.0f} {theirs:>8} {ratio:>6} {mine['peak_gib'] or 0:>8.1f} {peer['peak_gib'] or 0:>6.1f}")


def main():
    register_configs()
    models = sorted(f[:-5] for f in os.listdir(os.path.join(REPO_ROOT, "configs", "model")) if f.endswith(".yaml"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3.2-1b", choices=models + sorted(MODEL_ALIASES),
                        help="a shape of configs/model/ (1b: llama3.2-1b, 8b: llama3-8b)")
    parser.add_argument("--seqlens", type=int, nargs="*", default=[8192, 32768, 131072])
    parser.add_argument("--impls", nargs="+", default=["longctx", "hf_liger", "hf"],
                        choices=("longctx", "hf_liger", "hf"))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--checkpoints", nargs="+", default=["full"], choices=("full", "selective", "none"),
                        help="activation checkpointing of both sides (selective: longctx only)")
    parser.add_argument("--hf-seqlens", type=int, nargs="*", default=None,
                        help="the peers' lengths (default: --seqlens)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a longctx config override (Hydra syntax), e.g. --set model.mlp_chunk_size=8192; "
                             "repeatable")
    parser.add_argument("--layers-at", nargs="*", default=[],
                        help="LEN:N[:offload], e.g. 524288:2 or 524288:16:offload (longctx, full checkpointing)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="after timing each row at --seqlens, print its TOP kernels by GPU time")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, 64 tokens, one step: the code paths on any device (CPU: interpreted)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        # a 2K vocabulary: Triton's interpreter runs Liger's fused cross entropy row by row
        args.model, args.seqlens, args.hf_seqlens, args.steps, args.warmup = "tiny", [64], None, 1, 0
        args.layers_at, args.set = ["64:1"], ["model.vocab_size=2048", *args.set]
    name = MODEL_ALIASES.get(args.model, args.model)
    # with its index: a process group bound to the GPU asks for one
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("error: bench_train measures a GPU; on a CPU run it with --smoke (tiny sizes)")

    # every config is composed and checked before any model is built
    runs = []
    for seq_len in args.seqlens:
        for precision in args.precisions:
            for checkpoint in args.checkpoints:
                cfg = compose_config(name, seq_len, precision, checkpoint, device.type, args.set)
                dims = parallel_dims(cfg)
                # the peers have no selective checkpointing and no fp32 row (a --set may have asked for either)
                peer_ok = seq_len in (args.seqlens if args.hf_seqlens is None else args.hf_seqlens) \
                    and cfg.train.activation_checkpoint in ("full", "none") and cfg.train.precision in HF_WEIGHT_DTYPE
                runs += [(impl, cfg, dims, args.set) for impl in args.impls if impl == "longctx" or peer_ok]
    for spec in args.layers_at:
        seq_len, layers, *flags = spec.split(":")
        sets = [*args.set, f"model.num_hidden_layers={layers}", f"train.activation_offload={'offload' in flags}"]
        cfg = compose_config(name, int(seq_len), "bf16_autocast", "full", device.type, sets)
        runs.append(("longctx", cfg, parallel_dims(cfg), sets))

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    import transformers
    extra = {"transformers": transformers.__version__,
             "host_peak": "per row" if reset_host_peak() else "since the process started (clear_refs refused)"}
    try:
        from importlib.metadata import version
        extra["liger_kernel"] = version("liger-kernel")
    except Exception:   # not installed: hf_liger rows will say so
        pass
    result = {**result_head(device_name, **extra), "rows": []}
    slug = device_slug(device_name) if device.type == "cuda" else "cpu"
    out = args.out or os.path.join(ROOT, "bench", "results", f"train_{slug}{'_smoke' if args.smoke else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for i, (impl, cfg, dims, sets) in enumerate(runs):
        timed = i < len(runs) - len(args.layers_at)
        row = measure(impl, cfg, name, device, args.steps if timed else 1, args.warmup if timed else 0,
                      dims=dims, sets=sets, profile=args.profile if timed else 0)
        result["rows"].append(row)
        with open(out, "w") as f:   # after every row: a run cut short keeps what it measured
            json.dump(result, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()
    print_ratios(result["rows"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
