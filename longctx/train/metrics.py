"""Step metrics (tokens/s, MFU, memory, communication wait) and where they go: console, metrics.jsonl, wandb."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .console import progress_bar_wanted

# dense bf16 peak TFLOP/s by device name (no sparsity)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "H800": 989.0, "B200": 2250.0, "L40S": 362.0}


def training_flops(config, cu_seqlens: torch.Tensor) -> float:
    """FLOPs of a training step over one packed sequence (`cu_seqlens`, the document bounds): 6 N
    per token for the matmuls (embedding lookups excluded, the output head included) plus causal
    attention within each document, which is what the kernel computes: QK^T and PV cost 4 L^2 D H
    per layer forward for a document of L tokens, half of it under the causal mask, and the
    backward costs twice the forward. Recomputation (checkpointing) is not counted: MFU is of the
    model's FLOPs."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    n = config.num_parameters(embeddings=False) + config.vocab_size * config.hidden_size
    softmax_layers = sum(config.layer_type(i) == "softmax" for i in range(config.num_hidden_layers))
    attention = 3 * 0.5 * 4 * config.num_attention_heads * config.head_dim * softmax_layers * (lengths ** 2).sum()
    return 6 * n * float(lengths.sum()) + float(attention)


def training_flops_per_token(config, seq_len: int) -> float:
    """Per token of one document of `seq_len` tokens."""
    return training_flops(config, torch.tensor([0, seq_len])) / seq_len


def peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the rows past `step` (logged by a run that died before its next checkpoint, which a resume
    from `step` computes again), so that each step appears once, with the values of the run that
    counts; a row cut short by a kill goes too. Replaced atomically: a kill now loses nothing."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Rank 0 only: a tqdm bar, a line every `every` steps, metrics.jsonl, and wandb if enabled.

    comm_wait_s and comm_frac exist only on the steps profiled for them (`comm_every`); the console
    line shows the latest measurement with the step it was taken at."""

    def __init__(self, run_dir: Path, cfg, total_steps: int, start_step: int, resolved_config: dict):
        self.cfg = cfg
        path = Path(run_dir) / "metrics.jsonl"
        keep_steps_up_to(path, start_step)
        self.file = open(path, "a")
        self.bar = None
        if progress_bar_wanted(cfg.progress_bar):
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self.last_comm = None   # (step, comm_frac) of the latest profiled step
        self.wandb = None
        if cfg.wandb != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb  # imported only when a run logs to it
            self.wandb = wandb.init(project=cfg.project, dir=str(run_dir), config=resolved_config,
                                    mode=cfg.wandb, name=Path(run_dir).name, resume="allow",
                                    settings=wandb.Settings(console="off"))

    def log(self, step: int, metrics: dict) -> None:
        if "comm_frac" in metrics:
            self.last_comm = step, metrics["comm_frac"]
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tok_s']:.0f}",
                                 mem=f"{metrics['peak_gib']:.1f}G", refresh=False)
        if step % self.cfg.every == 0:
            line = (f"step {step} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} grad_norm "
                    f"{metrics['grad_norm']:.3f} tok/s {metrics['tok_s']:.0f} ({metrics['tok_s_per_gpu']:.0f}/gpu)"
                    f" step {metrics['step_s']:.2f}s peak {metrics['peak_gib']:.2f} GiB")
            if metrics.get("mfu") is not None:
                line += f" mfu {metrics['mfu']:.1%}"
            if self.last_comm is not None:
                line += f" comm {self.last_comm[1]:.0%} (step {self.last_comm[0]})"
            (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()
