#!/usr/bin/env python
"""A full training step (forward, backward, gradient clipping, AdamW) of a model shape on one GPU:
longctx against Hugging Face's model of its family (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...: SDPA)
with Liger's kernels for that family (`hf_liger`: RMSNorm,
RoPE, SwiGLU and the fused linear cross entropy, what LLaMA-Factory's `enable_liger_kernel` and
axolotl's Liger plugin switch on) and without them (`hf`), in the same run, at equal activation
checkpointing and precision. Every training-step row of bench/results/ comes from here:

    python scripts/bench_train.py                          # 1B shape, 8K/32K/128K, both precisions
    python scripts/bench_train.py --model 8b --impls longctx --precisions bf16_pure --offload-optimizer \
        --seqlens 65536 131072 --warmup 0 --steps 1       # full finetuning, AdamW on the host
    python scripts/bench_train.py --model 8b --impls longctx --precisions bf16_pure --offload-optimizer \
        --lora --seqlens 1048576 --layers 4 --checkpoint-group 2 --activation-offload --documents-of 8192
    python scripts/bench_train.py --check                  # bf16 correctness on the GPU, nothing timed
    python scripts/bench_train.py --model 1b --impls longctx hf_liger --precisions bf16_autocast \
        --settings like_for_like fastest_fit               # also each side's fastest setting that fits
    scripts/bench_train_8b_h200.sh                         # bench/results/train_8b_h200.json
    scripts/bench_train_families_h200.sh                   # the Qwen3-8B and Qwen2.5-7B rows at 128K
    scripts/bench_train_h200.sh                            # issue 30's suite, both settings, < 9 min

longctx's rows are built from its Hydra config as the trainer builds them (`build_train_model`:
model, LoRA, bf16 weights, checkpointing, optimizer), with the blockwise MLP at 64K tokens and the
loss in chunks of 8K. The flags are the trainer's keys, and `--set key=value` overrides any key
(last wins; the flags come before the --set values):
    --lora                  lora.enabled=true (peft adapters, rank 16 on every projection; frozen base)
    --offload-optimizer     optim.offload=true (bf16 weights on the GPU, fp32 masters and AdamW on the
                            host: longctx/train/offload_adamw.py; needs --precisions bf16_pure)
    --checkpoint-group K    train.checkpoint_group=K (full checkpointing keeps one input per K layers)
    --activation-offload    train.activation_offload=true (the kept layer inputs wait in host memory)
    --layers N              model.num_hidden_layers=N (both sides): memory at lengths whose whole step
                            would take minutes
    --scale                 with --layers N: each longctx row also stood up for the shape's whole depth
                            (figures x L / N, an upper bound; `layers_timed`, `scaled_from` say so)
Settings (`setting` in every row, DESIGN.md): `like_for_like` (the default) runs both sides at each of
--checkpoints; `fastest_fit` runs longctx with train.activation_checkpoint=auto as the trainer resolves
it (longctx/train/plan.py, for --gpu-gib and --host-gib, default this machine's: the row's checkpoint,
selective_layers, checkpoint_group and activation_offload are its choice; under --layers the choice
for the whole depth, the cut's mixed layers in proportion), and each peer without checkpointing, then,
if that runs out of memory, with full (the "oom" row stays). A row whose configuration was measured
already in the process under the other setting is that measurement again (`measured_as`).
Each row names both sides' settings (`model`, `checkpoint`, `checkpoint_group`, `selective_layers`,
`precision`, `lora`, `optimizer`, ...), so a longctx row and a peer row with the same values compare directly:
- precision `bf16_autocast`: longctx keeps fp32 weights and runs under bf16 autocast (as its trainer
  does on one GPU); HF likewise, fp32 weights under autocast.
- precision `bf16_pure`: longctx computes in bf16 from fp32 master weights: FSDP2's mixed precision
  over a one-rank process group (the trainer reaches FSDP2 only under torchrun), or with
  --offload-optimizer bf16 weights whose masters the offloaded AdamW keeps on the host. HF holds its
  weights, gradients and AdamW states in bf16. `master_weights` says which.
- checkpoint `full`: longctx recomputes each decoder layer (train.activation_checkpoint=full), HF's
  `gradient_checkpointing_enable()`; `none` switches both off; `selective` is longctx's alone.
- the peers run beside longctx at --hf-seqlens (default: --seqlens) except under --lora and
  --documents-of, which they have no row for; their optimizer is torch's AdamW on the GPU always.
A config that names parallel.dp_backend=fsdp or deepspeed runs that backend over a one-rank process
group (`dp_backend`, `cpu_offload` in the row). Both sides use the trainer's AdamW (foreach) and its
gradient clipping, on one sequence of random ids, or with `--documents-of N` packed documents of N
tokens each (longctx only: the memory of one long document, the attention arithmetic N / SEQLEN of
it, positions restarting at each document as the packer makes them), with expandable allocator
segments as the trainer sets them. Rows of longctx that differ only in length share one built model
and optimizer (the 8B shape's 96 GB of host state are made once).
Figures: `ms` per step, `optim_ms` (clipping and the optimizer step, inside ms), `tok_s`, `mfu`
(not for LoRA: its backward skips the frozen weights' gradients), `loss`, `peak_gib` (GPU
allocated), `host_peak_gib` (the process's resident peak during the row, build included),
`build_s`, `params`, `trainable_params`; longctx rows also carry the memory planner's `plan_gib`
and `plan_host_gib` (longctx/train/plan.py). A setting that runs out of GPU memory is a row with
`"oom": true`, one that fails otherwise a row with its `error` (the traceback goes to stderr), and
the run goes on. Each step synchronises between the backward and the optimizer step (for
`optim_ms`); a step that takes over 10 s prints a progress line.
`--plan-only`: the rows with the planner's figures alone (no GPU needed). `--out FILE --append`: the
rows join FILE's (same device), its `command` the commands that made them, joined by ` && `.
`--check`: the offloaded AdamW on the GPU (CUDA streams, pinned buffers) against torch's AdamW on
fp32 masters, and grouped checkpointing's loss and gradients against per-layer, in bf16 with the
flash kernel; what the CPU tests (tests/train/test_offload_adamw.py,
tests/parallel/test_checkpoint_group.py) cannot reach. Nothing else runs.
`--smoke`: the tiny model with a 2K vocabulary at 64 tokens, one step, on whatever device there is
(on a CPU, Triton's interpreter; only Liger's RoPE and fused cross entropy run there, see
LIGER_KERNELS_INTERPRETED); the flags above apply.
Writes bench/results/train_<device>.json (DESIGN.md's format).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from typing import Optional

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
from longctx.model import Llama, ModelConfig  # noqa: E402
from longctx.model.attention import with_host_bounds  # noqa: E402
from longctx.model.llama import resolve_attention, shift_labels  # noqa: E402
from longctx.parallel import data_parallel  # noqa: E402
from longctx.parallel.mesh import ParallelDims  # noqa: E402
from longctx.parallel.parallelize import apply_activation_checkpointing, bf16_parameters  # noqa: E402
from longctx.train import train as trainer  # noqa: E402
from longctx.train.config import REPO_ROOT, Config, ConfigError, model_fields, register_configs, validate  # noqa: E402
from longctx.train.metrics import peak_tflops, training_flops  # noqa: E402
from longctx.train.offload_adamw import OffloadedAdamW  # noqa: E402
from benchlib import device_slug, host_peak_gib, model_config, print_rows, reset_host_peak, result_head  # noqa: E402

MODEL_ALIASES = {"1b": "llama3.2-1b", "8b": "llama3-8b"}
# the peers per model family (model.family, longctx/model/families.py): Liger's patch for it and the
# transformers module it patches (restored after the rows); the shapes are configs/model/ (--model)
HF_FAMILIES = {"llama": ("apply_liger_kernel_to_llama", "llama", "LlamaForCausalLM"),
               "mistral": ("apply_liger_kernel_to_mistral", "mistral", "MistralForCausalLM"),
               "qwen2": ("apply_liger_kernel_to_qwen2", "qwen2", "Qwen2ForCausalLM"),
               "qwen3": ("apply_liger_kernel_to_qwen3", "qwen3", "Qwen3ForCausalLM")}
PRECISIONS = ("bf16_autocast", "bf16_pure")
HF_WEIGHT_DTYPE = {"bf16_autocast": torch.float32, "bf16_pure": torch.bfloat16}
BENCH_DEFAULTS = ["model.mlp_chunk_size=65536", "model.loss_chunk_size=8192"]
LIGER_KERNELS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")
# Triton's CPU interpreter hands float scalar arguments to a kernel as Python floats, and Liger's
# RMSNorm and SwiGLU kernels call .to() on theirs (eps, gate_multiplier): those two cannot run there
LIGER_KERNELS_INTERPRETED = ("rope", "fused_linear_cross_entropy")
PROGRESS_S = 10.0   # a step longer than this prints a line as it ends


@dataclasses.dataclass
class Run:
    """One row to measure: which side, its config (the peers read the model, train and optim
    sections), the layout, the longctx overrides, and the length of its packed documents."""
    impl: str
    cfg: Config
    dims: ParallelDims
    sets: list
    documents_of: int
    setting: str = "like_for_like"     # or fastest_fit (DESIGN.md's benchmark rows)
    fallback: Optional["Run"] = None   # fastest_fit peers: the next setting to try when this one runs out of memory
    full_depth: Optional[Config] = None   # --scale: the shape's whole depth, which this cut of its layers stands for


def compose_config(model: str, seq_len: int, precision: str, checkpoint: str, device: str, sets: list) -> Config:
    """The trainer's config for one longctx row; `sets` (the flags', then the user's --set) come
    last and win. bf16_pure without the offloaded optimizer keeps its fp32 masters in FSDP2, unless
    `sets` name a backend."""
    from hydra import compose, initialize_config_dir
    overrides = [f"model={model}", f"train.seq_len={seq_len}", f"train.precision={precision}",
                 f"train.activation_checkpoint={checkpoint}", f"train.device={device}", *BENCH_DEFAULTS]
    try:
        with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "configs"), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides + list(sets)))
            if cfg.train.precision == "bf16_pure" and not cfg.optim.offload and \
                    not any(s.startswith("parallel.dp_backend=") for s in sets):
                cfg = OmegaConf.to_object(compose("config", overrides=overrides + ["parallel.dp_backend=fsdp", *sets]))
        return cfg
    except Exception as error:   # Hydra's override and composition errors, the schema's checks
        raise SystemExit(f"error: --set {' '.join(sets) or '(none)'}: {error}".splitlines()[0]) from None


def parallel_dims(cfg: Config) -> ParallelDims:
    """Validate as the trainer does on one process; then a config that names FSDP2 or DeepSpeed
    (bf16_pure without optim.offload needs one; --set parallel.dp_backend=deepspeed
    parallel.zero_stage=2 parallel.cpu_offload=true offloads the optimizer) gets that backend over a
    one-rank process group. The trainer builds those only under torchrun, so validation on one
    process refuses bf16_pure with them: that row's other keys are checked with the precision it
    accepts."""
    backend = data_parallel.get_backend(cfg.parallel.dp_backend).keeps_fp32_masters
    pure = cfg.train.precision == "bf16_pure" and backend
    if pure:
        cfg.train.precision = "bf16_autocast"
    try:
        dims = validate(cfg, 1)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        if pure:
            cfg.train.precision = "bf16_pure"
    if backend:
        return ParallelDims(world_size=1, dp=1, sp=1, dp_backend=cfg.parallel.dp_backend)
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


def document_bounds(seq_len: int, documents_of: int) -> list:
    """cu_seqlens of a sequence packed with documents of `documents_of` tokens (the last one shorter
    where it does not divide)."""
    return [*range(0, seq_len, documents_of), seq_len]


def random_batch(vocab_size: int, seq_len: int, documents_of: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """One sequence of random ids, and the micro-batch the trainer's step takes for it (labels
    shifted; one document: no cu_seqlens, as HF gets none; packed: positions restart at each
    document, as the packer makes them)."""
    ids = torch.randint(0, vocab_size, (1, seq_len), device=device)
    batch = {"input_ids": ids, "labels": shift_labels(ids), "cu_seqlens": None,
             "position_ids": torch.arange(seq_len, device=device)[None]}
    if documents_of < seq_len:
        bounds = torch.tensor(document_bounds(seq_len, documents_of), dtype=torch.int32)
        starts = torch.repeat_interleave(bounds[:-1].long(), bounds.diff().long()).to(device)
        batch["position_ids"] = batch["position_ids"] - starts
        batch["cu_seqlens"] = with_host_bounds(bounds, device)
    return ids, batch


def autocast_for(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16_autocast" else nullcontext()


def build_longctx(run: Run, device: torch.device):
    """The trainer's model (LoRA, bf16 weights, checkpointing and backend applied) and optimizer."""
    mesh = one_rank_group(device) if data_parallel.get_backend(run.dims.dp_backend).reduces_gradients else None
    _, train_model, optimizer, _ = trainer.build_train_model(run.cfg, run.dims, mesh, device)
    return train_model, optimizer


def longctx_step(built, run: Run, device: torch.device):
    """The trainer's step, in its two parts: forward_backward, then optimizer_step."""
    train_model, optimizer = built
    cfg = run.cfg
    _, batch = random_batch(cfg.model.vocab_size, cfg.train.seq_len, run.documents_of, device)
    autocast = autocast_for(cfg.train.precision, device)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    return (lambda: trainer.forward_backward(train_model, [batch], 1, autocast),
            lambda: data_parallel.optimizer_step(train_model, optimizer, max_norm))


@contextmanager
def liger_patched(kernels: tuple, family: str = "llama"):
    """transformers' model of `family` with Liger's kernels while the block runs. Liger's
    apply_liger_kernel_to_<family> swaps classes and functions in transformers' modeling_<family> for
    every model made afterwards, so they are put back on leaving: later `hf` rows get plain Hugging Face."""
    import importlib
    import liger_kernel.transformers as liger
    patch, module_name, model_class = HF_FAMILIES[family]
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    saved = dict(vars(modeling))
    saved_forward = getattr(modeling, model_class).forward
    getattr(liger, patch)(**{k: k in kernels for k in LIGER_KERNELS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if getattr(modeling, name) is not value:
                setattr(modeling, name, value)
        getattr(modeling, model_class).forward = saved_forward


def build_hf(run: Run, device: torch.device):
    """Hugging Face's model at the row's precision and checkpointing, with the trainer's AdamW on the
    GPU (what the transformers Trainer does too: AdamW, max_grad_norm=1), never the offloaded one."""
    import transformers
    cfg = run.cfg
    hf_config = ModelConfig(**model_fields(cfg.model)).to_hf()
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):   # made in its dtype on the GPU: no fp32 copy of a bf16 model on the way
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=HF_WEIGHT_DTYPE[cfg.train.precision])
    if cfg.train.activation_checkpoint == "full":
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    optimizer, _ = trainer.build_optimizer(model, dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, offload=False)))
    return model, optimizer


def hf_step(built, run: Run, device: torch.device):
    model, optimizer = built
    cfg = run.cfg
    ids, _ = random_batch(cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seq_len, device)
    autocast = autocast_for(cfg.train.precision, device)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    def forward_backward():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()
    return forward_backward, lambda: data_parallel.optimizer_step(model, optimizer, max_norm)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(forward_backward, optimizer_step, steps: int, warmup: int, device: torch.device) -> tuple:
    """Seconds per step and of its optimizer part (clipping included), and the last step's loss."""
    total = optim = 0.0
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        loss = forward_backward()
        synchronize(device)
        middle = time.perf_counter()
        optimizer_step()
        synchronize(device)
        end = time.perf_counter()
        if i >= warmup:
            total, optim = total + end - start, optim + end - middle
        if end - start > PROGRESS_S:
            what = f"warm-up {i + 1}/{warmup}" if i < warmup else f"step {i - warmup + 1}/{steps}"
            print(f"  {what}: {end - start:.1f} s (optimizer {end - middle:.1f} s)", flush=True)
    return total / steps, optim / steps, float(loss)


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


def optimizer_name(run: Run) -> str:
    if run.impl != "longctx":
        return "adamw_gpu"
    if run.cfg.optim.offload:
        return "offloaded_adamw"   # longctx/train/offload_adamw.py
    return f"adamw_{run.dims.dp_backend}_cpu_offload" if run.cfg.parallel.cpu_offload else "adamw_gpu"


def row_keys(run: Run, name: str, device: torch.device) -> dict:
    """What a row is: DESIGN.md's shape keys and both sides' settings, flat."""
    t, m, longctx = run.cfg.train, ModelConfig(**model_fields(run.cfg.model)), run.impl == "longctx"
    row = {"bench": "train_step", "impl": run.impl, "model": name, "seqlen": t.seq_len,
           "documents_of": run.documents_of, "heads": m.num_attention_heads, "kv_heads": m.num_key_value_heads,
           "head_dim": m.head_dim, "causal": True, "gpus": int(device.type == "cuda"),
           "layers": m.num_hidden_layers, "mode": "fwd_bwd_optim", "checkpoint": t.activation_checkpoint,
           "checkpoint_group": t.checkpoint_group if longctx else 1,
           "selective_layers": t.selective_layers if longctx else 0, "setting": run.setting,
           "activation_offload": t.activation_offload if longctx else False,
           "precision": t.precision, "lora": run.cfg.lora.enabled if longctx else False,
           "optimizer": optimizer_name(run),
           "master_weights": "bf16" if not longctx and t.precision == "bf16_pure" else "fp32",
           "attention": resolve_attention(m.attention, torch.empty(0, device=device)) if longctx else "sdpa",
           "mlp_chunk": m.mlp_chunk_size if longctx else 0}
    if longctx:
        row.update(dp_backend=run.dims.dp_backend, cpu_offload=run.cfg.parallel.cpu_offload, overrides=" ".join(run.sets))
    return row


def build_key(run: Run) -> str:
    """Rows of longctx whose configs differ only in length share a built model."""
    return repr(dataclasses.replace(run.cfg, train=dataclasses.replace(run.cfg.train, seq_len=0)))


def parameter_counts(model) -> tuple[int, int]:
    """(all, trained) parameters; a ZeRO-3 partition counts its whole parameter (ds_numel)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, _ in sizes), sum(n for n, trained in sizes if trained)


def measure(run: Run, name: str, device: torch.device, steps: int, warmup: int, built: dict, profile: int = 0) -> dict:
    """One row. `built` holds the last longctx build ({key: (model, optimizer)}), kept for the next
    row of the same settings and dropped before any other build."""
    t, m = run.cfg.train, ModelConfig(**model_fields(run.cfg.model))
    liger = (LIGER_KERNELS if device.type == "cuda" else LIGER_KERNELS_INTERPRETED) if run.impl == "hf_liger" else ()
    row = row_keys(run, name, device)
    if liger:
        row["liger"] = ",".join(liger)   # rows stay flat (DESIGN.md)
    key = build_key(run) if run.impl == "longctx" else None
    if key not in built:
        built.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    reset_host_peak()
    parts = step = None
    try:
        with liger_patched(liger, run.cfg.model.family) if liger else nullcontext():
            parts = built.get(key)
            if parts is None:
                start = time.perf_counter()
                parts = build_longctx(run, device) if run.impl == "longctx" else build_hf(run, device)
                synchronize(device)
                row["build_s"] = time.perf_counter() - start
                if key is not None:
                    built[key] = parts
            row["params"], row["trainable_params"] = parameter_counts(parts[0])
            step = (longctx_step if run.impl == "longctx" else hf_step)(parts, run, device)
            seconds, optim_seconds, row["loss"] = time_steps(*step, steps, warmup, device)
            if profile and device.type == "cuda":
                print_profile(lambda: (step[0](), step[1]()), profile)
        peak = peak_tflops(device) if device.type == "cuda" else None
        flops = training_flops(m, torch.tensor(document_bounds(t.seq_len, run.documents_of)))
        row.update(ms=seconds * 1e3, optim_ms=optim_seconds * 1e3, tok_s=t.seq_len / seconds,
                   mfu=flops / seconds / (peak * 1e12) if peak and not row["lora"] else None)
    except torch.OutOfMemoryError:
        row["oom"] = True
        built.clear()
    except Exception as error:   # one setting failing ends its row only: the run goes on to the next
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        built.clear()
    parts = step = None   # a model not kept for the next row, its gradients and optimizer state go now
    gc.collect()
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row["host_peak_gib"] = host_peak_gib()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if run.impl == "longctx":
        add_plan(row, run)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def add_plan(row: dict, run: Run) -> dict:
    row["plan_gib"] = plan.estimate(run.cfg, 1).total / 2**30
    row["plan_host_gib"] = plan.host_estimate(run.cfg, 1).total / 2**30
    return row


def measure_once(run: Run, name: str, device: torch.device, args, built: dict, measured: dict) -> dict:
    """`measure`, unless this very configuration (side, config, length, documents) was measured
    already in this process under another setting (fastest_fit's full checkpointing is often
    like_for_like's): then that row again, saying so (`measured_as`)."""
    key = (run.impl, build_key(run), run.cfg.train.seq_len, run.documents_of)
    if key in measured:
        row = dict(measured[key], setting=run.setting, measured_as=measured[key]["setting"])
        print(f"{run.impl} {run.setting} at {run.cfg.train.seq_len}: the {row['measured_as']} row's measurement", flush=True)
        return row
    row = measure(run, name, device, args.steps, args.warmup, built, profile=args.profile)
    measured[key] = row
    return row


def print_table(rows: list) -> None:
    def figure(key, fmt):
        return lambda r: "oom" if r.get("oom") else format(r[key], fmt) if r.get(key) is not None else "-"
    print_rows(rows, [("impl", 8, lambda r: r["impl"]), ("tokens", 8, lambda r: r["seqlen"]),
                      ("docs of", 8, lambda r: r["documents_of"]), ("layers", 6, lambda r: r["layers"]),
                      ("lora", 5, lambda r: r["lora"]), ("setting", 13, lambda r: r.get("setting", "-")),
                      ("ckpt", 9, lambda r: r["checkpoint"]), ("sel", 3, lambda r: r.get("selective_layers", 0)),
                      ("group", 5, lambda r: r["checkpoint_group"]), ("act.off", 7, lambda r: r["activation_offload"]),
                      ("precision", 13, lambda r: r["precision"]), ("optimizer", 15, lambda r: r["optimizer"]),
                      ("ms", 9, figure("ms", ".0f")), ("optim ms", 8, figure("optim_ms", ".0f")),
                      ("tok/s", 8, figure("tok_s", ".0f")), ("GiB", 6, figure("peak_gib", ".1f")),
                      ("plan", 6, figure("plan_gib", ".1f")), ("host", 6, figure("host_peak_gib", ".1f")),
                      ("plan", 6, figure("plan_host_gib", ".1f"))], named_by=10)


def print_ratios(rows: list) -> None:
    """longctx against each peer row of the same setting and shape keys: tokens/s and peak memory.
    like_for_like pairs rows of equal checkpointing, precision, optimizer and master weights;
    fastest_fit pairs each side's fastest row that ran (their settings differ by design)."""
    # where the optimizer or the master weights live changes the step too: a like_for_like row of
    # longctx with its optimizer on the host is not paired with a peer that keeps AdamW on the GPU
    keys = {"like_for_like": ("model", "seqlen", "documents_of", "layers", "checkpoint", "checkpoint_group",
                              "activation_offload", "selective_layers", "precision", "lora", "master_weights", "optimizer"),
            "fastest_fit": ("model", "seqlen", "documents_of", "layers", "precision", "lora")}

    def key(row):
        setting = row.get("setting", "like_for_like")
        return (setting, *(row.get(k) for k in keys[setting]))
    ours = {key(r): r for r in rows if r["impl"] == "longctx" and "tok_s" in r and "layers_timed" not in r}
    peers = {}
    for peer in rows:   # a fastest_fit peer's row that ran wins over its rung that ran out of memory
        if peer["impl"] != "longctx" and (key(peer), peer["impl"]) not in peers or "tok_s" in peer:
            peers[key(peer), peer["impl"]] = peer
    pairs = [(peer, ours.get(k)) for (k, _), peer in peers.items() if ours.get(k) is not None]
    if not pairs:
        return
    print(f"{'setting':<14} {'peer':<9} {'tokens':>7} {'precision':<14} {'ckpt ours':<13} {'peer':<5} {'tok/s ours':>10} "
          f"{'peer':>8} {'ratio':>6} {'GiB ours':>8} {'peer':>6}")
    for peer, mine in pairs:
        theirs = "oom" if peer.get("oom") else "error" if "error" in peer else f"{peer['tok_s']:.0f}"
        ratio = f"{mine['tok_s'] / peer['tok_s']:.2f}" if "tok_s" in peer else "-"
        ckpt = mine["checkpoint"] + (f"+{mine['selective_layers']}sel" if mine.get("selective_layers") else "")
        print(f"{mine.get('setting', 'like_for_like'):<14} {peer['impl']:<9} {peer['seqlen']:>7} {peer['precision']:<14} "
              f"{ckpt:<13} {peer['checkpoint']:<5} {mine['tok_s']:>10.0f} {theirs:>8} {ratio:>6} "
              f"{mine['peak_gib'] or 0:>8.1f} {peer['peak_gib'] or 0:>6.1f}")


def check(device: torch.device, small: bool) -> None:
    """bf16 correctness on the GPU before any timing: the streamed optimizer against torch's AdamW
    on fp32 masters, and grouped checkpointing against per-layer, with the flash kernel (`small`:
    tiny sizes, for a CPU)."""
    torch.manual_seed(0)
    sizes = (1000, 30_001, 4096) if small else (1000, 3_000_001, 4096)
    params = [torch.nn.Parameter(torch.randn(n, device=device).to(torch.bfloat16)) for n in sizes]
    masters = [p.detach().float().cpu().requires_grad_() for p in params]
    ours = OffloadedAdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, chunk_size=1 << (12 if small else 18),
                          depth=2)
    ref = torch.optim.AdamW(masters, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(3):
        for p, m in zip(params, masters):
            g = torch.randn(p.shape, device=device).to(torch.bfloat16)
            p.grad, m.grad = g, g.float().cpu()
        ours.step()
        ref.step()
    worst = max(((ours.state[p]["master"] - m.detach()).norm() / m.detach().norm()).item() for p, m in zip(params, masters))
    exact = all(torch.equal(p.detach().cpu(), ours.state[p]["master"].to(torch.bfloat16)) for p in params)
    print(f"check offloaded AdamW on {device.type}: master rel err {worst:.2e}, weights = bf16(master): {exact}", flush=True)
    assert worst < 1e-6 and exact
    # head_dim 128 as the 8B shape's: its kernels are compiled here, before any row is timed
    width = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 vocab_size=512, attention="auto") if small else \
        dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
             attention="flash")
    config = model_config("llama3.2-1b", num_hidden_layers=4, mlp_chunk_size=8192, loss_chunk_size=8192, **width)
    tokens = 128 if small else 16384
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    results = []
    for group in (1, 2):
        torch.manual_seed(1)
        with torch.device(device):
            model = Llama(config)
        bf16_parameters(model)
        apply_activation_checkpointing(model, "full", False, group)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad
                                        for n, p in model.named_parameters()}))
    (loss1, g1), (loss2, g2) = results
    worst = max(((g2[n].float() - g1[n].float()).norm() / g1[n].float().norm()).item() for n in g1)
    print(f"check grouped checkpointing ({resolve_attention(config.attention, ids)}, bf16, {tokens} tokens): "
          f"loss {loss1.item():.6f} vs {loss2.item():.6f}, worst gradient rel diff {worst:.2e}", flush=True)
    assert torch.equal(loss1, loss2) and worst < 1e-2


def flag_overrides(args) -> list:
    """The flags as the trainer's config keys (before the user's --set values)."""
    sets = []
    if args.lora:
        sets.append("lora.enabled=true")
    if args.offload_optimizer:
        sets.append("optim.offload=true")
    if args.checkpoint_group != 1:
        sets.append(f"train.checkpoint_group={args.checkpoint_group}")
    if args.activation_offload:
        sets.append("train.activation_offload=true")
    if args.layers:
        sets.append(f"model.num_hidden_layers={args.layers}")
    return sets


def plan_runs(args, name: str, device: torch.device) -> list:
    """Every row's config, composed and checked before any model is built: like_for_like rows at each
    of --checkpoints for both sides; fastest_fit rows with longctx's train.activation_checkpoint=auto
    resolved by the memory planner for this GPU (at the shape's whole depth under --layers, the
    resolved setting then applied to the cut), and each peer's ladder (none, then full)."""
    sets = flag_overrides(args) + args.set
    runs = []
    for seq_len in args.seqlens:
        documents_of = min(args.documents_of or seq_len, seq_len)
        for precision in args.precisions:
            def peer_ok(cfg):
                # the peers have no selective checkpointing, no fp32 row (a --set may have asked for
                # either), no LoRA and no packed documents here
                return seq_len in (args.seqlens if args.hf_seqlens is None else args.hf_seqlens) \
                    and cfg.train.activation_checkpoint in ("full", "none") and cfg.train.precision in HF_WEIGHT_DTYPE \
                    and not cfg.lora.enabled and documents_of == seq_len
            if "like_for_like" in args.settings:
                for checkpoint in args.checkpoints:
                    cfg = compose_config(name, seq_len, precision, checkpoint, device.type, sets)
                    dims = parallel_dims(cfg)
                    full_depth = whole_depth(args, name, seq_len, precision, checkpoint, device, sets, cfg)
                    runs += [Run(impl, cfg, dims, sets, documents_of, full_depth=full_depth if impl == "longctx" else None)
                             for impl in args.impls if impl == "longctx" or peer_ok(cfg)]
            if "fastest_fit" in args.settings:
                runs += fastest_fit_runs(args, name, seq_len, precision, documents_of, device, sets, peer_ok)
    # rows of one setting at every length follow each other: longctx's share one build
    order = {}
    for run in runs:
        order.setdefault((run.impl, build_key(run)), len(order))
    return sorted(runs, key=lambda run: order[run.impl, build_key(run)])


def whole_depth(args, name, seq_len, precision, checkpoint, device, sets, cut) -> Optional[Config]:
    """--scale: the config of the shape's whole depth that a cut of its layers (--layers) stands for
    (None without --scale, or where the cut is the whole depth); `auto` resolved at the whole depth."""
    if not args.scale:
        return None
    whole = [s for s in sets if not s.startswith("model.num_hidden_layers=")]
    cfg = compose_config(name, seq_len, precision, checkpoint, device.type, whole)
    if cfg.model.num_hidden_layers == cut.model.num_hidden_layers:
        return None
    resolve_checkpointing(cfg, args)
    return cfg


def resolve_checkpointing(cfg: Config, args) -> str:
    """train.activation_checkpoint=auto as the trainer resolves it (longctx/train/plan.py), for this
    GPU's memory (--gpu-gib) and the host's (--host-gib); says what it chose."""
    return plan.resolve_checkpointing(cfg, 1, args.gpu_gib, args.host_gib).strip()


def fastest_fit_runs(args, name, seq_len, precision, documents_of, device, sets, peer_ok) -> list:
    """longctx with auto checkpointing (the planner's choice is the row's checkpoint, selective_layers,
    checkpoint_group, activation_offload); each peer's first rung, no checkpointing, with full
    checkpointing to fall back to if it runs out of memory."""
    runs = []
    cfg = compose_config(name, seq_len, precision, "auto", device.type, sets)
    full_depth = whole_depth(args, name, seq_len, precision, "auto", device, sets, cfg)
    if full_depth is not None:   # the cut takes the whole depth's choice, its mixed layers in proportion
        t, whole, layers = cfg.train, full_depth.train, cfg.model.num_hidden_layers
        t.activation_checkpoint, t.activation_offload = whole.activation_checkpoint, whole.activation_offload
        t.checkpoint_group = min(whole.checkpoint_group, layers)
        t.selective_layers = round(whole.selective_layers * layers / full_depth.model.num_hidden_layers)
        choice = plan.Checkpointing(whole.activation_checkpoint, whole.activation_offload, whole.selective_layers,
                                    whole.checkpoint_group)
        print(f"fastest_fit at {seq_len}: {choice.describe()} at {full_depth.model.num_hidden_layers} layers, "
              f"timed on {layers}", flush=True)
    else:
        print(f"fastest_fit at {seq_len}: {resolve_checkpointing(cfg, args)}", flush=True)
    if "longctx" in args.impls:
        runs.append(Run("longctx", cfg, parallel_dims(cfg), sets, documents_of, "fastest_fit", full_depth=full_depth))
    for impl in args.impls:
        if impl == "longctx":
            continue
        ladder = [compose_config(name, seq_len, precision, checkpoint, device.type, sets) for checkpoint in ("none", "full")]
        if not peer_ok(ladder[0]):
            continue
        full = Run(impl, ladder[1], parallel_dims(ladder[1]), sets, documents_of, "fastest_fit")
        runs.append(Run(impl, ladder[0], parallel_dims(ladder[0]), sets, documents_of, "fastest_fit", fallback=full))
    return runs


def scaled_row(row: dict, run: Run, name: str, device: torch.device, timed: bool = True) -> dict:
    """A cut's row stood up for the whole depth: the step's figures x L / N (N layers timed of L). An
    upper bound: what does not grow with the layers (embedding, loss, the optimizer's share of the
    embeddings) is counted L / N times. The row names its cut (`layers_timed`, `scaled_from`: the cut's
    ms) and carries the planner's memory of the whole depth (`plan_gib`), not a measured peak."""
    whole = Run(run.impl, run.full_depth, run.dims, run.sets, run.documents_of, run.setting)
    out = row_keys(whole, name, device)
    timed, layers = row["layers"], out["layers"]
    out.update(layers_timed=timed, scaled_from=row.get("ms"), timed_peak_gib=row.get("peak_gib"))
    if not timed:
        pass
    elif row.get("oom") or "ms" not in row:
        out.update({k: row[k] for k in ("oom", "error") if k in row})
    else:
        factor = layers / timed
        m = ModelConfig(**model_fields(run.full_depth.model))
        seconds = row["ms"] * factor / 1e3
        peak = peak_tflops(device) if device.type == "cuda" else None
        flops = training_flops(m, torch.tensor(document_bounds(out["seqlen"], run.documents_of)))
        out.update(ms=row["ms"] * factor, optim_ms=row["optim_ms"] * factor, tok_s=out["seqlen"] / seconds,
                   mfu=flops / seconds / (peak * 1e12) if peak and not out["lora"] else None, loss=row.get("loss"))
    out["peak_gib"] = None
    add_plan(out, whole)
    return out


def start_result(out: str, append: bool, device_name: str, **extra) -> dict:
    head = result_head(device_name, **extra)
    if not (append and os.path.exists(out)):
        return {**head, "rows": []}
    with open(out) as f:
        result = json.load(f)
    if result.get("device") != device_name:
        raise SystemExit(f"error: --append: {out} holds rows of {result.get('device')}, not {device_name}")
    result["command"] = f"{result['command']} && {head['command']}"
    if head["commit"] not in result["commit"].split(", "):
        result["commit"] = f"{result['commit']}, {head['commit']}"
    return result


def main():
    register_configs()
    models = sorted(f[:-5] for f in os.listdir(os.path.join(REPO_ROOT, "configs", "model")) if f.endswith(".yaml"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3.2-1b", choices=models + sorted(MODEL_ALIASES),
                        help="a shape of configs/model/ (1b: llama3.2-1b, 8b: llama3-8b; qwen3-8b, qwen2.5-7b, "
                             "mistral-7b: the peers are that family's transformers model with Liger's patch for it)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=None, help="default 8192 32768 131072 (smoke: 64)")
    parser.add_argument("--impls", nargs="+", default=["longctx", "hf_liger", "hf"],
                        choices=("longctx", "hf_liger", "hf"))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--checkpoints", nargs="+", default=["full"], choices=("full", "selective", "none"),
                        help="activation checkpointing of both sides (selective: longctx only)")
    parser.add_argument("--hf-seqlens", type=int, nargs="*", default=None,
                        help="the peers' lengths (default: --seqlens)")
    parser.add_argument("--lora", action="store_true", help="lora.enabled=true (longctx rows only)")
    parser.add_argument("--offload-optimizer", action="store_true",
                        help="optim.offload=true: fp32 masters and AdamW on the host (with --precisions bf16_pure)")
    parser.add_argument("--checkpoint-group", type=int, default=1, metavar="K", help="train.checkpoint_group=K")
    parser.add_argument("--activation-offload", action="store_true", help="train.activation_offload=true")
    parser.add_argument("--layers", type=int, default=0, metavar="N",
                        help="model.num_hidden_layers=N, both sides (default: the shape's)")
    parser.add_argument("--documents-of", type=int, default=0, metavar="N",
                        help="packed documents of N tokens instead of one document (longctx rows only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a longctx config override (Hydra syntax), e.g. --set model.mlp_chunk_size=8192; "
                             "repeatable")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="after timing each row, print its TOP kernels by GPU time")
    parser.add_argument("--settings", nargs="+", default=["like_for_like"], choices=("like_for_like", "fastest_fit"),
                        help="like_for_like: both sides at each of --checkpoints; fastest_fit: longctx with "
                             "train.activation_checkpoint=auto, each peer without checkpointing, else full")
    parser.add_argument("--gpu-gib", type=float, default=None,
                        help="GPU memory auto plans for (default: this GPU's; without one, an H200's 139.8)")
    parser.add_argument("--host-gib", type=float, default=None,
                        help="host memory auto plans activation offload for (default: this machine's)")
    parser.add_argument("--scale", action="store_true",
                        help="with --layers N: each longctx row also scaled to the shape's whole depth "
                             "(layers_timed, scaled_from in the row)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--plan-only", action="store_true", help="the rows with the planner's figures alone")
    parser.add_argument("--check", action="store_true",
                        help="bf16 checks of the offloaded AdamW and grouped checkpointing on the GPU; nothing timed")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, 64 tokens, one step: the code paths on any device (CPU: interpreted)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--append", action="store_true", help="add the rows to those --out holds")
    args = parser.parse_args()
    if args.smoke:
        # a 2K vocabulary: Triton's interpreter runs Liger's fused cross entropy row by row
        args.model, args.steps, args.warmup = "tiny", 1, 0
        args.seqlens, args.set = args.seqlens or [64], ["model.vocab_size=2048", *args.set]
    args.seqlens = args.seqlens or [8192, 32768, 131072]
    name = MODEL_ALIASES.get(args.model, args.model)
    # with its index: a process group bound to the GPU asks for one
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.check:
        check(device, small=device.type == "cpu")
        return
    if device.type == "cpu" and not (args.smoke or args.plan_only):
        raise SystemExit("error: bench_train measures a GPU; on a CPU run it with --smoke (tiny sizes) or --plan-only")
    if args.gpu_gib is None:
        args.gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 139.8
    if args.host_gib is None:
        args.host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if args.scale and not args.layers:
        raise SystemExit("error: --scale stands a cut of the layers (--layers N) up for the whole depth: give --layers")
    runs = plan_runs(args, name, device)

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    import transformers
    extra = {"transformers": transformers.__version__,
             "host_peak": "per row" if reset_host_peak() else "since the process started (clear_refs refused)"}
    try:
        from importlib.metadata import version
        extra["liger_kernel"] = version("liger-kernel")
    except Exception:   # not installed: hf_liger rows will say so
        pass
    slug = device_slug(device_name) if device.type == "cuda" else "cpu"
    kind = "_plan" if args.plan_only else "_smoke" if args.smoke else ""
    out = args.out or os.path.join(ROOT, "bench", "results", f"train_{slug}{kind}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    result = start_result(out, args.append, device_name, **extra)
    first = len(result["rows"])
    built, measured = {}, {}
    for run in runs:
        while run is not None:
            if args.plan_only:
                row = row_keys(run, name, device)
                if run.impl == "longctx":
                    add_plan(row, run)
            else:
                row = measure_once(run, name, device, args, built, measured)
            result["rows"].append(row)
            if run.full_depth is not None:
                result["rows"].append(scaled_row(row, run, name, device, timed=not args.plan_only))
            with open(out, "w") as f:   # after every row: a run cut short keeps what it measured
                json.dump(result, f, indent=1)
            # a fastest_fit peer that ran out of memory tries its next setting (its OOM row stays)
            run = run.fallback if row.get("oom") and not args.plan_only else None
    built.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    print_table(result["rows"][first:])
    print_ratios(result["rows"][first:])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
