"""What the benchmark scripts share: the head of their JSON (DESIGN.md's format:
{"device", "torch", "triton", "commit", "command", "rows"}), the timing helpers (median time,
attention FLOPs, peak memory) and error measures.

Imported by the scripts beside it (their folder is on sys.path when they run).
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def git_commit() -> str:
    """LONGCTX_COMMIT where set (a copy of the tree whose .git is absent or stale: the GPU
    machine), else the checkout's commit."""
    if os.environ.get("LONGCTX_COMMIT"):
        return os.environ["LONGCTX_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:
        commit = ""
    return commit or "unknown"


def model_config(name: str, **overrides):
    """A shape of configs/model/ (its YAML file as it stands, not composed through Hydra) as a
    longctx ModelConfig, with `overrides` on top."""
    import yaml
    from longctx.model import ModelConfig
    with open(os.path.join(ROOT, "configs", "model", f"{name}.yaml")) as f:
        fields = yaml.safe_load(f)
    fields.pop("name", None)
    fields.update(overrides)
    return ModelConfig(**fields)


def result_head(device: str, command: str | None = None, **extra) -> dict:
    """The fields every result file starts with; `rows` is added by the caller."""
    import triton
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_commit(), "command": command or " ".join(["python"] + sys.argv), **extra}


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', for result file names."""
    return next((s for s in ("h100", "h200", "a100", "b200") if s in name.lower()), "gpu")


def print_rows(rows: list, columns: list, named_by: int) -> None:
    """A benchmark's rows as a table: `columns` are (header, width, cell(row) -> value); a row
    with an "error" shows its first `named_by` cells (what it is), then the error."""
    print(" ".join(f"{header:>{width}}" for header, width, _ in columns))
    for r in rows:
        shown = columns[:named_by] if "error" in r else columns
        line = " ".join(f"{str(cell(r)):>{width}}" for _, width, cell in shown)
        print(line + (f"  {r['error'][:60]}" if "error" in r else ""))


def median_ms(fn, seqlen: int = 0) -> float:
    """The median time of `fn` in ms (triton's do_bench: CUDA events, cache flushed between runs);
    runs past 16K tokens get a longer budget (do_bench's warmup and rep are milliseconds)."""
    import triton
    rep = 100 if seqlen <= 16384 else 300
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def attention_flops(seqlen: int, heads: int, head_dim: int, causal: bool, mode: str) -> float:
    """FLOPs of softmax attention over one sequence, as flash-attn's benchmarks count them: the
    forward 4 S^2 H D (halved when causal), the backward 2.5 forwards ("fwd_bwd": 3.5 in all)."""
    forward = 4 * seqlen * seqlen * heads * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def peak_gib(fn) -> float:
    """GPU memory that `fn` allocates at its peak above what was allocated before, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def reset_host_peak() -> bool:
    """Restart the process's resident-memory high-water mark (Linux: 5 to /proc/self/clear_refs),
    so that `host_peak_gib` measures what follows. False where that is refused (some sandboxes):
    the peak then stays the one since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_gib() -> float:
    """The process's peak resident memory (VmHWM) since `reset_host_peak`, in GiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20   # kB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
