#!/usr/bin/env python
"""A training step of the Llama-3.2-1B shape under each data-parallel backend, on 2 GPUs:
tokens/s, MFU and peak memory per GPU.

    torchrun --nproc_per_node 2 scripts/bench_parallel.py                 # 32K dp=2 and 128K sp=2 (ring)
    torchrun --nproc_per_node 2 scripts/bench_parallel.py --smoke         # a tiny model on CPU (gloo)

Each case builds the model through the trainer's own functions (`build_train_model`,
`forward_backward`, `optimizer_step`: what `python -m longctx.train` runs) with full activation
checkpointing and the Triton flash kernel (ring attention over the sp group at 128K); the batch is
random tokens, one document per sequence. Precision: DDP keeps fp32 weights under bf16 autocast;
FSDP2 and DeepSpeed hold fp32 masters and compute in bf16 (`train.precision=bf16_pure`).
Writes bench/results/parallel_<device>.json (DESIGN.md's format; rows of impl `longctx`, one per
backend: the backends are each other's peers).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from longctx.parallel import data_parallel  # noqa: E402
from longctx.parallel.mesh import ParallelDims  # noqa: E402
from longctx.train import train as T  # noqa: E402
from longctx.train.config import Config  # noqa: E402
from longctx.train.metrics import peak_tflops, training_flops_per_token  # noqa: E402
from benchlib import print_rows, result_head  # noqa: E402

BACKENDS = [("ddp", 0), ("fsdp", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def make_config(args, seq_len: int, dp: int, sp: int, backend: str, stage: int) -> Config:
    cfg = Config()
    with open(os.path.join(ROOT, "configs", "model", f"{args.model}.yaml")) as f:
        for key, value in yaml.safe_load(f).items():
            setattr(cfg.model, key, value)
    if args.smoke:
        m = cfg.model
        m.vocab_size, m.hidden_size, m.intermediate_size, m.num_hidden_layers = 512, 64, 128, 2
        m.num_attention_heads, m.num_key_value_heads, m.head_dim, m.attention = 4, 2, 16, "sdpa"
    p, t = cfg.parallel, cfg.train
    p.dp, p.sp, p.sp_method, p.dp_backend, p.zero_stage = dp, sp, "ring" if sp > 1 else "none", backend, stage
    t.seq_len, t.micro_batch, t.grad_accum = seq_len, 1, 1
    t.precision = "bf16_autocast" if backend == "ddp" else "bf16_pure"
    t.activation_checkpoint = "full"
    t.device = "cpu" if args.smoke else "cuda"
    cfg.optim.warmup_steps = 1
    return cfg


def random_batch(seq_len: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq_len)[None],
            "cu_seqlens": torch.tensor([0, seq_len], dtype=torch.int32)}


def run_case(args, cfg: Config, device: torch.device) -> dict:
    world = dist.get_world_size()
    p = cfg.parallel
    dims = ParallelDims(world, p.dp, p.sp, p.sp_method, p.dp_backend)
    mesh = dims.build_mesh(device.type)
    torch.manual_seed(0)
    model, train_model, optimizer, scheduler = T.build_train_model(cfg, dims, mesh, device)
    dp_rank = mesh["dp"].get_local_rank()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16_autocast" else nullcontext()
    times = []
    for step in range(args.warmup + args.steps):
        batch = random_batch(cfg.train.seq_len, cfg.model.vocab_size, seed=step * dims.dp + dp_rank)
        micro = [T.shard_batch(batch, dims, device)]
        if device.type == "cuda":
            torch.cuda.synchronize()
            if step == args.warmup:
                torch.cuda.reset_peak_memory_stats(device)
        dist.barrier()
        start = time.perf_counter()
        loss = T.forward_backward(train_model, micro, world, autocast)
        data_parallel.optimizer_step(train_model, optimizer, cfg.optim.grad_clip)
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = torch.tensor(sum(times[args.warmup:]) / args.steps)
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    del model, train_model, optimizer, scheduler
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens = cfg.train.seq_len * dims.dp
    tok_s = tokens / step_s.item()
    flops = training_flops_per_token(T.ModelConfig(**T.model_fields(cfg.model)), cfg.train.seq_len)
    tflops = tok_s / world * flops / 1e12
    peak_tf = peak_tflops(device)
    return {"bench": "parallel", "impl": "longctx", "backend": p.dp_backend,
            "zero_stage": p.zero_stage if p.dp_backend == "deepspeed" else None,
            "model": cfg.model.name, "seqlen": cfg.train.seq_len, "gpus": world, "dp": dims.dp, "sp": dims.sp,
            "sp_method": dims.sp_method, "precision": cfg.train.precision, "activation_checkpoint": "full",
            "mode": "fwd_bwd_step", "ms": step_s.item() * 1e3, "tok_s": tok_s, "tok_s_per_gpu": tok_s / world,
            "tflops": tflops, "mfu": tflops / peak_tf if peak_tf else None, "peak_gib": peak.item(),
            "loss": loss.item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3.2-1b")
    parser.add_argument("--cases", nargs="+", default=["32768:dp2", "131072:sp2"],
                        help="LEN:dp2 (data parallel over both GPUs) or LEN:sp2 (ring attention over both)")
    parser.add_argument("--backends", nargs="+", default=[f"{b}{s or ''}" for b, s in BACKENDS])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (gloo), to check the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args.cases = ["256:dp2", "256:sp2"]
    device = T.init_distributed("cpu" if args.smoke else "cuda")
    world = dist.get_world_size()
    rank = dist.get_rank()
    rows = []
    for case in args.cases:
        seq_len, layout = case.split(":")
        dp, sp = (world, 1) if layout.startswith("dp") else (1, world)
        for name in args.backends:
            backend, stage = next((b, s) for b, s in BACKENDS if f"{b}{s or ''}" == name)
            cfg = make_config(args, int(seq_len), dp, sp, backend, stage)
            try:
                row = run_case(args, cfg, device)
            except torch.cuda.OutOfMemoryError as error:   # same on every rank for these symmetric cases
                row = {"bench": "parallel", "impl": "longctx", "backend": backend, "seqlen": int(seq_len),
                       "dp": dp, "sp": sp, "error": f"out of memory: {str(error)[:200]}"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
                if args.out:   # rows as they come, in case the run is cut short
                    with open(args.out + "l", "a") as f:
                        f.write(json.dumps(row) + "\n")
    if rank == 0:
        print_table(rows)
        write(args, rows, device)
    dist.barrier()
    dist.destroy_process_group()


def print_table(rows):
    print_rows(rows, [("seqlen", 7, lambda r: r["seqlen"]), ("dp", 3, lambda r: r["dp"]), ("sp", 3, lambda r: r["sp"]),
                      ("backend", 11, lambda r: r["backend"] + (str(r.get("zero_stage")) if r.get("zero_stage") else "")),
                      ("ms", 9, lambda r: f"{r['ms']:.1f}"), ("tok/s", 9, lambda r: f"{r['tok_s']:.0f}"),
                      ("tok/s/gpu", 9, lambda r: f"{r['tok_s_per_gpu']:.0f}"), ("TFLOP/s", 8, lambda r: f"{r['tflops']:.1f}"),
                      ("MFU", 6, lambda r: f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"),
                      ("peak GiB", 9, lambda r: f"{r['peak_gib']:.2f}")], named_by=4)


def write(args, rows, device):
    try:
        import wandb
        wandb_version = wandb.__version__
    except ImportError:
        wandb_version = None
    try:
        import deepspeed
        deepspeed_version = deepspeed.__version__
    except ImportError:
        deepspeed_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tag = "smoke_cpu" if args.smoke else f"{name.split()[-1].lower()}x{dist.get_world_size()}"
    result = {**result_head(f"{dist.get_world_size()} x {name}", "torchrun --nproc_per_node 2 " + " ".join(sys.argv),
                            wandb=wandb_version, deepspeed=deepspeed_version), "rows": rows}
    path = args.out or os.path.join(ROOT, "bench", "results", f"parallel_{tag}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
