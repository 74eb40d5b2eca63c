#!/usr/bin/env python
"""A full training step (forward, backward, AdamW) of a LLaMA shape: longctx against Hugging Face
`LlamaForCausalLM` (SDPA attention, gradient checkpointing) in the same run, with the memory
planner's estimate beside the measured peak.

    python scripts/bench_train.py --model llama3.2-1b --seqlens 8192 32768 65536 131072

longctx runs as the trainer does on a GPU: fp32 master weights with bf16 autocast, the Triton
flash kernel, activation checkpointing (`--modes`: full, selective), a blockwise MLP and the chunked loss. Hugging Face
runs in its lightest setting: bf16 weights (and bf16 AdamW states), SDPA, gradient checkpointing;
so the memory comparison is conservative for longctx. `--layers-at LEN:N[:offload]` also times a model
cut to N layers at LEN tokens (full checkpointing, optionally offloaded), to check the planner at
lengths a whole model step would take minutes at.
Writes bench/results/train_<device>.json (DESIGN.md's format).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from longctx.model import Llama, ModelConfig  # noqa: E402
from longctx.parallel.parallelize import apply_activation_checkpointing  # noqa: E402
from longctx.plan import estimate  # noqa: E402
from longctx.train.metrics import peak_tflops, training_flops_per_token  # noqa: E402
from benchlib import device_slug, result_head  # noqa: E402


def model_config(name: str, **overrides) -> ModelConfig:
    with open(os.path.join(ROOT, "configs", "model", f"{name}.yaml")) as f:
        fields = yaml.safe_load(f)
    fields.pop("name")
    fields.update(overrides)
    return ModelConfig(**fields)


def plan_bytes(config: ModelConfig, name: str, seq_len: int, checkpoint: str, offload: bool) -> float:
    model = copy.copy(config)
    model.name = name
    cfg = SimpleNamespace(
        model=model,
        train=SimpleNamespace(micro_batch=1, seq_len=seq_len, precision="bf16_autocast",
                              activation_checkpoint=checkpoint, activation_offload=offload),
        parallel=SimpleNamespace(sp=1, dp=1, dp_backend="none", zero_stage=0, cpu_offload=False, sp_method="none"))
    return estimate(cfg, 1).total


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run_longctx(config: ModelConfig, seq_len: int, checkpoint: str, offload: bool):
    model = Llama(config).cuda()
    apply_activation_checkpointing(model, checkpoint, offload)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def run_hf(config: ModelConfig, seq_len: int, checkpoint: str, offload: bool):
    import transformers
    hf_config = config.to_hf()
    hf_config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_config).to(device="cuda", dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


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


def measure(impl, config, name, seq_len, steps, warmup, checkpoint="full", offload=False, profile=0):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"bench": "train_step", "impl": impl, "model": name, "seqlen": seq_len, "gpus": 1,
           "layers": config.num_hidden_layers, "mode": "fwd_bwd_optim", "checkpoint": checkpoint,
           "offload": offload, "attention": config.attention if impl == "longctx" else "sdpa",
           "mlp_chunk": config.mlp_chunk_size if impl == "longctx" else 0}
    model = step = None
    try:
        model, step = (run_longctx if impl == "longctx" else run_hf)(config, seq_len, checkpoint, offload)
        seconds = time_steps(step, steps, warmup)
        tok_s = seq_len / seconds
        peak = peak_tflops(torch.device("cuda"))
        row.update(ms=seconds * 1e3, tok_s=tok_s, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   mfu=tok_s * training_flops_per_token(config, seq_len) / (peak * 1e12) if peak else None)
        if profile:
            print_profile(step, profile)
    except torch.OutOfMemoryError:
        row.update(oom=True, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    finally:
        del model, step
    if impl == "longctx":
        row["plan_gib"] = plan_bytes(config, name, seq_len, checkpoint, offload) / 2**30
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3.2-1b")
    parser.add_argument("--seqlens", type=int, nargs="*", default=[8192, 32768, 65536])
    parser.add_argument("--hf-seqlens", type=int, nargs="+", default=None, help="default: --seqlens")
    parser.add_argument("--modes", nargs="+", default=["full"], choices=("full", "selective", "none"),
                        help="longctx's activation checkpointing at --seqlens (HF always checkpoints each layer)")
    parser.add_argument("--layers-at", nargs="*", default=[],
                        help="LEN:N[:offload], e.g. 524288:2 or 524288:16:offload (full checkpointing)")
    parser.add_argument("--attentions", nargs="+", default=["flash"], choices=("flash", "sdpa"),
                        help="longctx's softmax kernel at --seqlens: ours, or PyTorch SDPA as HF uses it")
    parser.add_argument("--mlp-chunk", type=int, default=65536, help="blockwise MLP chunk (tokens)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="after timing each row at --seqlens, print its TOP kernels by GPU time")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    result = {**result_head(device, transformers=__import__("transformers").__version__), "rows": []}
    out = args.out or os.path.join(ROOT, "bench", "results", f"train_{device_slug(device)}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def record(row):   # written after every row: a run cut short keeps what it measured
        result["rows"].append(row)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    for seq_len in args.seqlens:
        for attention in args.attentions:
            config = model_config(args.model, attention=attention, mlp_chunk_size=args.mlp_chunk, loss_chunk_size=8192)
            for mode in args.modes:
                record(measure("longctx", config, args.model, seq_len, args.steps, args.warmup, checkpoint=mode,
                               profile=args.profile))
        if seq_len in (args.hf_seqlens or args.seqlens):
            record(measure("hf", config, args.model, seq_len, args.steps, args.warmup, profile=args.profile))
    for spec in args.layers_at:
        seq_len, layers, *flags = spec.split(":")
        cut = model_config(args.model, attention="flash", mlp_chunk_size=args.mlp_chunk, loss_chunk_size=8192,
                           num_hidden_layers=int(layers))
        record(measure("longctx", cut, args.model, int(seq_len), 1, 0, offload="offload" in flags))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
