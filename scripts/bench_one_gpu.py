#!/usr/bin/env python
"""Big shapes on one GPU: training steps of the 8B shape with the offloaded optimizer (full
finetuning) or LoRA, grouped activation checkpointing, the 1B shape's longest length, and Hugging
Face + Liger in the same run; each row with the planner's GPU and host estimates beside the
measured peaks.

    python scripts/bench_one_gpu.py --check                        # bf16 correctness on the GPU first
    python scripts/bench_one_gpu.py --rows "llama3-8b full 65536" "llama3-8b full 131072" \
        "llama3-8b lora 65536" "llama3-8b full 524288 layers=2 group=2" "llama3-8b hf_liger 131072" \
        "llama3.2-1b gpu_adamw 1048576 group=4"
    python scripts/bench_one_gpu.py --plan-only --rows ... --out bench/results/plan_..._predictions.json

A row is `MODEL KIND SEQLEN [layers=N] [group=K] [offload=1] [docs=D] [warmup=W] [steps=S]`. KIND: `full`
(bf16 weights, OffloadedAdamW: fp32 masters and moments on the host), `lora` (peft adapters rank
16 on every projection, frozen bf16 base, the adapters' masters on the host), `gpu_adamw` (fp32
weights with bf16 autocast and torch's fused AdamW on the GPU; the trainer's default is that precision with
torch's foreach AdamW),
`hf_liger` (transformers `LlamaForCausalLM` in bf16 with Liger's kernels, SDPA, gradient
checkpointing, fused AdamW on the GPU). Random initialisation, one sequence of random ids: one
document, or packed documents of D tokens each (`docs=D`, as packed ShareGPT is: the memory is
that of one document, the attention's arithmetic D / SEQLEN of it; how the rows at 512K and 1M
show that a length fits without the quarter of an hour a single 512K document takes). Consecutive rows of the same model and kind share it (the 96 GB of host state of the
8B shape are made once). Host memory is the process's resident set, sampled every 20 ms.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from longctx.model import Llama  # noqa: E402
from longctx.model.attention import with_host_bounds  # noqa: E402
from longctx.model.lora import LORA_TARGETS, apply_lora  # noqa: E402
from longctx.parallel.checkpoint_group import group_layers  # noqa: E402
from longctx.parallel.parallelize import apply_activation_checkpointing, bf16_parameters  # noqa: E402
from longctx.train.plan import GIB, estimate, host_estimate  # noqa: E402
from longctx.train.offload_adamw import OffloadedAdamW  # noqa: E402
from benchlib import device_slug, model_config, result_head  # noqa: E402

LORA = SimpleNamespace(enabled=True, rank=16, alpha=32, dropout=0.0, target_modules=list(LORA_TARGETS), trainable=[])
CHUNKS = dict(mlp_chunk_size=8192, loss_chunk_size=8192, attention="flash")


def parse_row(spec: str) -> dict:
    model, kind, seqlen, *options = spec.split()
    row = dict(model=model, kind=kind, seqlen=int(seqlen), layers=None, group=1, offload=0, docs=0, warmup=0, steps=1)
    for option in options:
        key, value = option.split("=")
        row[key] = int(value)
    return row


def shape(row):
    overrides = dict(CHUNKS)
    if row["layers"]:
        overrides["num_hidden_layers"] = row["layers"]
    config = model_config(row["model"], **overrides)
    return config


def plan(row) -> tuple[float, float]:
    config = shape(row)
    config.name = row["model"]
    kind = row["kind"]
    cfg = SimpleNamespace(
        model=config,
        train=SimpleNamespace(micro_batch=1, seq_len=row["seqlen"], activation_checkpoint="full",
                              precision="bf16_autocast" if kind == "gpu_adamw" else "bf16_pure",
                              activation_offload=bool(row["offload"]), checkpoint_group=row["group"]),
        parallel=SimpleNamespace(sp=1, dp=1, dp_backend="none", zero_stage=0, cpu_offload=False, sp_method="none"),
        optim=SimpleNamespace(offload=kind in ("full", "lora")),
        lora=LORA if kind == "lora" else SimpleNamespace(enabled=False))
    return estimate(cfg, 1).total / GIB, host_estimate(cfg, 1).total / GIB


class HostPeak:
    """The resident set's peak while the block runs, sampled (PyTorch's pinned blocks included)."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def adamw_groups(model):
    trained = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trained if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]


def build(row):
    """(model, optimizer, autocast) of a row, on the GPU; the 8B shape is made in bf16 there and
    its fp32 masters on the host come from those weights."""
    kind, config = row["kind"], shape(row)
    if kind == "hf_liger":
        import transformers
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
        hf_config = config.to_hf()
        hf_config._attn_implementation = "sdpa"
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                model = transformers.LlamaForCausalLM(hf_config)
        finally:
            torch.set_default_dtype(torch.float32)
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True), nullcontext()
    with torch.device("cuda"):
        model = Llama(config)
    if kind == "lora":
        apply_lora(model, LORA.rank, LORA.alpha, LORA.dropout, LORA.target_modules, LORA.trainable)
    if kind in ("full", "lora"):
        bf16_parameters(model)
        torch.cuda.empty_cache()
    apply_activation_checkpointing(model, "full", bool(row["offload"]), row["group"] if row["offload"] else 1)
    if kind == "gpu_adamw":
        optimizer = torch.optim.AdamW(adamw_groups(model), lr=1e-5, betas=(0.9, 0.95), fused=True)
        return model, optimizer, torch.autocast("cuda", dtype=torch.bfloat16)
    return model, OffloadedAdamW(adamw_groups(model), lr=1e-5, betas=(0.9, 0.95)), nullcontext()


def set_group(model, row) -> None:
    """Regroup the checkpointed layers (the wrappers stay; the groups are only how they are called)."""
    if row["offload"]:
        if row["group"] > 1 and model.layer_groups is None:
            raise ValueError("activation offload hooks the groups when the model is built")
        return
    model.layer_groups = group_layers(model, row["group"]) if row["group"] > 1 else None


def measure(row, built, seqlen):
    model, optimizer, autocast = built
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, seqlen), device="cuda")
    packed = {}
    if row["docs"]:   # positions restart at each document (the model derives them from cu_seqlens)
        packed["cu_seqlens"] = with_host_bounds(torch.arange(0, seqlen + 1, row["docs"], dtype=torch.int32), "cuda")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    times = {"fwd_bwd": 0.0, "optim": 0.0}

    def step(record):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids, **packed).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.cuda.synchronize()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if record:
            times["fwd_bwd"] += middle - start
            times["optim"] += time.perf_counter() - middle
        return loss.item()

    for _ in range(row["warmup"]):
        step(False)
    torch.cuda.reset_peak_memory_stats()
    with HostPeak() as host:
        losses = [step(True) for _ in range(row["steps"])]
    seconds = (times["fwd_bwd"] + times["optim"]) / row["steps"]
    return dict(ms=seconds * 1e3, optim_ms=times["optim"] / row["steps"] * 1e3, tok_s=seqlen / seconds,
                peak_gib=torch.cuda.max_memory_allocated() / GIB, host_peak_gib=host.peak / GIB, loss=losses[-1])


def row_keys(row, config) -> dict:
    kind = row["kind"]
    return {"bench": "train_step", "impl": "hf_liger" if kind == "hf_liger" else "longctx", "model": row["model"],
            "seqlen": row["seqlen"], "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim, "causal": True, "gpus": 1, "mode": "fwd_bwd_optim",
            "layers": config.num_hidden_layers, "documents_of": row["docs"] or row["seqlen"], "lora": kind == "lora",
            "checkpoint": "full" if row["group"] == 1 else f"full_group{row['group']}",
            "activation_offload": bool(row["offload"]),
            "precision": "bf16_autocast" if kind == "gpu_adamw" else "bf16",
            "optimizer": {"full": "offloaded_adamw", "lora": "offloaded_adamw"}.get(kind, "adamw_gpu_fused")}


def check() -> None:
    """bf16 correctness on the GPU before any timing: the streamed optimizer against torch's AdamW
    on fp32 masters, and grouped checkpointing against per-layer, with the flash kernel."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda").to(torch.bfloat16)) for n in (1000, 3_000_001, 4096)]
    masters = [p.detach().float().cpu().requires_grad_() for p in params]
    ours = OffloadedAdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, chunk_size=1 << 18, depth=2)
    ref = torch.optim.AdamW(masters, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(3):
        for p, m in zip(params, masters):
            g = torch.randn(p.shape, device="cuda").to(torch.bfloat16)
            p.grad, m.grad = g, g.float().cpu()
        ours.step()
        ref.step()
    worst = max(((ours.state[p]["master"] - m.detach()).norm() / m.detach().norm()).item() for p, m in zip(params, masters))
    exact = all(torch.equal(p.detach().cpu(), ours.state[p]["master"].to(torch.bfloat16)) for p in params)
    print(f"check offloaded AdamW on the GPU: master rel err {worst:.2e}, weights = bf16(master): {exact}")
    assert worst < 1e-6 and exact
    # head_dim 128 as the 8B shape's: its kernels are compiled here, before any row is timed
    config = model_config("llama3.2-1b", num_hidden_layers=4, hidden_size=1024, intermediate_size=2048,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=128, **CHUNKS)
    ids = torch.randint(0, config.vocab_size, (1, 16384), device="cuda")
    results = []
    for group in (1, 2):
        torch.manual_seed(1)
        with torch.device("cuda"):
            model = Llama(config)
        bf16_parameters(model)
        apply_activation_checkpointing(model, "full", False, group)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad
                                        for n, p in model.named_parameters()}))
    (loss1, g1), (loss2, g2) = results
    worst = max(((g2[n].float() - g1[n].float()).norm() / g1[n].float().norm()).item() for n in g1)
    print(f"check grouped checkpointing (flash, bf16, 16K): loss {loss1.item():.6f} vs {loss2.item():.6f}, "
          f"worst gradient rel diff {worst:.2e}")
    assert torch.equal(loss1, loss2) and worst < 1e-2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="*", default=[])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.check:
        check()
    rows = [parse_row(spec) for spec in args.rows]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "planned (no GPU)"
    head = result_head(device) if not args.plan_only else {"commit": result_head(device)["commit"],
                                                          "command": " ".join(["python"] + sys.argv)}
    result = {**head, "rows": []}
    out = args.out or os.path.join(ROOT, "bench", "results", f"train_8b_{device_slug(device)}.json")
    cached_key, built = None, None
    for row in rows:
        config = shape(row)
        record = {**row_keys(row, config)}
        if row["kind"] != "hf_liger":
            record["plan_gib"], record["plan_host_gib"] = plan(row)
        if not args.plan_only:
            # the model (and the 8B shape's 96 GB of host state) is shared by rows that differ only in
            # length or checkpoint group; activation offload hooks the groups, so it needs a new one
            key = (row["model"], row["kind"], row["layers"], row["offload"], row["group"] if row["offload"] else 1)
            try:
                if key != cached_key:
                    built = None
                    gc.collect()
                    torch.cuda.empty_cache()
                    start = time.perf_counter()
                    with HostPeak() as host:
                        built, cached_key = build(row), key
                    record["build_s"], record["build_host_peak_gib"] = time.perf_counter() - start, host.peak / GIB
                if row["kind"] != "hf_liger":
                    set_group(built[0], row)
                record.update(measure(row, built, row["seqlen"]))
            except torch.OutOfMemoryError:
                record.update(oom=True, peak_gib=torch.cuda.max_memory_allocated() / GIB)
                built, cached_key = None, None
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
        result["rows"].append(record)
        with open(out, "w") as f:   # after every row: a run cut short keeps what it measured
            json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
