#!/usr/bin/env python
"""longctx's own elementwise Triton kernels against Liger's equivalents, on the same inputs in one run:
RMSNorm and the cross entropy fused with the output projection, forward and forward+backward, at the
Llama-3.2-1B and Llama-3-8B shapes.

    python scripts/bench_ops.py                            # 8K, 32K, 128K tokens; both shapes
    python scripts/bench_ops.py --tokens 65536 --models llama3-8b --ops rms_norm
    python scripts/bench_ops.py --smoke                    # tiny shapes, fp32: the code paths on a CPU

The rotary embedding and the SwiGLU product were measured here too (bench/results/ops_h200.json):
Liger's were as fast or faster and leaner, and longctx.ops runs them on CUDA since, so there is
nothing of ours left to compare for those two.

Each side is called as its model calls it: ours through longctx.ops; Liger's through
liger_kernel.transformers.functional as `apply_liger_kernel_to_llama` wires it into Hugging Face
(RMSNorm in place in the backward).
`fwd` runs on inputs that need no gradient; `fwd_bwd` takes the input gradients with
torch.autograd.grad (nothing accumulates into .grad). Figures: `ms` (median, triton's do_bench),
`gbs` (the bytes an op must move at least, over the time: each input read once and each output
written once; for the memory-bound ops), `tflops` (the cross entropy's three matmuls: 2 T H V
forward, 6 T H V with the gradients), `peak_gib` (what a call allocates above its inputs). Our rows
carry `rel_diff`, the relative difference of our outputs (and gradients) from Liger's on the
inputs timed. A setting that runs out of memory is a row with `"oom": true`; a call that fails is a
row with its `error`. Writes bench/results/ops_<device>.json (DESIGN.md's format).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when Triton kernels are defined: before longctx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from longctx.ops.cross_entropy import chunked_cross_entropy  # noqa: E402
from longctx.ops.rms_norm import rms_norm  # noqa: E402
from benchlib import ROOT, device_slug, model_config, peak_gib, rel_err, result_head  # noqa: E402

EPS = 1e-5
SMOKE_SHAPE = {"hidden": 64, "intermediate": 160, "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab": 1000}


def model_shape(name: str) -> dict:
    m = model_config(name)
    return {"hidden": m.hidden_size, "intermediate": m.intermediate_size, "heads": m.num_attention_heads,
            "kv_heads": m.num_key_value_heads, "head_dim": m.head_dim, "vocab": m.vocab_size}


# ----------------------------------------------------------------------------------------------
# each op: its inputs (tokens t, shape s), the names of those the gradients are taken of, both
# sides (inputs, loss chunk -> a tuple of outputs, the same on both sides), and the least bytes it
# moves (memory-bound ops) or its FLOPs (the cross entropy)
# ----------------------------------------------------------------------------------------------
@dataclass
class Op:
    inputs: Callable
    differentiable: tuple
    longctx: Callable
    liger: Callable
    moved_bytes: Optional[Callable] = None     # (t, s, element bytes, with backward) -> bytes
    flops: Optional[Callable] = None           # (t, s, with backward) -> FLOPs


def _randn(shape, dtype, device, grad, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def liger_functional():
    from liger_kernel.transformers import functional
    return functional


def rms_norm_inputs(t, s, dtype, device, grad):
    return {"x": _randn((t, s["hidden"]), dtype, device, grad),
            "w": _randn((s["hidden"],), dtype, device, False, 0.1).add_(1).requires_grad_(grad)}


def cross_entropy_inputs(t, s, dtype, device, grad):
    return {"hidden": _randn((t, s["hidden"]), dtype, device, grad),
            "weight": _randn((s["vocab"], s["hidden"]), dtype, device, grad, s["hidden"] ** -0.5),
            "labels": torch.randint(0, s["vocab"], (t,), device=device)}


OPS = {
    "rms_norm": Op(
        rms_norm_inputs, ("x", "w"),
        longctx=lambda i, _: (rms_norm(i["x"], i["w"], EPS, kernel=True),),
        liger=lambda i, _: (liger_functional().liger_rms_norm(i["x"], i["w"], EPS),),
        # read x, write y; the backward reads dy and x and writes dx
        moved_bytes=lambda t, s, e, bwd: (5 if bwd else 2) * t * s["hidden"] * e),
    "cross_entropy": Op(
        cross_entropy_inputs, ("hidden", "weight"),
        longctx=lambda i, chunk: (chunked_cross_entropy(i["hidden"], i["weight"], i["labels"], chunk_size=chunk,
                                                        kernel=True),),
        liger=lambda i, _: (liger_functional().liger_fused_linear_cross_entropy(
            i["hidden"], i["weight"], i["labels"], reduction="sum"),),
        flops=lambda t, s, bwd: (6 if bwd else 2) * t * s["hidden"] * s["vocab"]),
}


def call(op: Op, impl: str, inputs: dict, mode: str, chunk: int, grads=None):
    """One forward (and backward): the outputs, and the input gradients under fwd_bwd."""
    outs = getattr(op, impl)(inputs, chunk)
    if mode == "fwd":
        return outs, ()
    return outs, torch.autograd.grad(outs, [inputs[n] for n in op.differentiable], grads)


def bench_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(name, impl, model, shape, tokens, mode, dtype, device, chunk, reference=None):
    """One row; returns it and the outputs (for our row's rel_diff against Liger's)."""
    op = OPS[name]
    row = {"bench": name, "impl": impl, "model": model, "seqlen": tokens, **shape, "mode": mode,
           "dtype": str(dtype).removeprefix("torch."), "gpus": 1 if device.type == "cuda" else 0}
    results = None
    try:
        torch.manual_seed(0)   # both sides get the same inputs
        inputs = op.inputs(tokens, shape, dtype, device, mode == "fwd_bwd")
        grads = None
        if mode == "fwd_bwd":
            # the output shapes from a copy, in case a call writes into its inputs
            with torch.no_grad():
                copies = {k: v.detach().clone() for k, v in inputs.items()}
                like = [(o.shape, o.dtype) for o in getattr(op, impl)(copies, chunk)]
                del copies
            torch.manual_seed(1)   # a random gradient for each output, 1 for a loss
            grads = [torch.randn(s, device=device, dtype=d) if s else torch.ones((), device=device, dtype=d)
                     for s, d in like]
        outs, input_grads = call(op, impl, inputs, mode, chunk, grads)
        results = [o.detach().to(torch.float32, copy=True) for o in (*outs, *input_grads)]
        del outs, input_grads
        row["ms"] = bench_ms(lambda: call(op, impl, inputs, mode, chunk, grads), device)
        if op.flops is not None:
            row["tflops"] = op.flops(tokens, shape, mode == "fwd_bwd") / (row["ms"] * 1e-3) / 1e12
        else:
            moved = op.moved_bytes(tokens, shape, dtype.itemsize, mode == "fwd_bwd")
            row["gbs"] = moved / (row["ms"] * 1e-3) / 1e9
        if device.type == "cuda":
            row["peak_gib"] = peak_gib(lambda: call(op, impl, inputs, mode, chunk, grads))
        else:
            row["peak_gib"] = None
        if reference is not None:
            row["rel_diff"] = max(rel_err(a, b) for a, b in zip(results, reference))
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as error:   # one peer failing (e.g. a kernel the CPU interpreter cannot run) ends its row only
        if device.type == "cuda":
            traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    inputs = grads = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shown = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items() if k not in shape}
    print(" ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
    return row, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama3.2-1b", "llama3-8b"],
                        help="shapes from configs/model/")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=("fwd", "fwd_bwd"))
    parser.add_argument("--loss-chunk", type=int, default=8192,
                        help="our cross entropy's chunk (tokens), as bench_train")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in fp32: the code paths on any device")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("error: bench_ops measures a GPU; on a CPU run it with --smoke (tiny sizes)")
    # fp32 in the smoke run: Triton's CPU interpreter computes bf16 dots wrongly (tests/ops/test_attention.py)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = {"smoke": SMOKE_SHAPE} if args.smoke else {m: model_shape(m) for m in args.models}
    tokens = [48] if args.smoke else args.tokens
    chunk = 32 if args.smoke else args.loss_chunk   # the smoke run crosses a chunk boundary too

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    try:
        from importlib.metadata import version
        extra = {"liger_kernel": version("liger-kernel")}
    except Exception:   # not installed: Liger's rows say so
        extra = {}
    result = {**result_head(device_name, **extra), "loss_chunk": chunk, "rows": []}
    slug = device_slug(device_name) if device.type == "cuda" else "cpu"
    out = args.out or os.path.join(ROOT, "bench", "results", f"ops_{slug}{'_smoke' if args.smoke else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for model, shape in shapes.items():
        for name in args.ops:
            for t in tokens:
                for mode in args.modes:
                    liger_row, reference = measure(name, "liger", model, shape, t, mode, dtype, device, chunk)
                    ours_row, _ = measure(name, "longctx", model, shape, t, mode, dtype, device, chunk, reference)
                    result["rows"] += [ours_row, liger_row]
                    with open(out, "w") as f:   # after every pair: a run cut short keeps what it measured
                        json.dump(result, f, indent=1)
    print(f"{'op':<14} {'model':<12} {'tokens':>7} {'mode':<8} {'ours ms':>8} {'Liger ms':>9} {'Liger/ours':>10} "
          f"{'ours GiB':>9} {'Liger GiB':>9}")
    rows = result["rows"]
    for ours, liger in zip(rows[::2], rows[1::2]):
        ratio = liger["ms"] / ours["ms"] if "ms" in ours and "ms" in liger else None
        cells = [ours.get("ms"), liger.get("ms"), ratio, ours.get("peak_gib"), liger.get("peak_gib")]
        shown = (f"{c:>{w}.3f}" if isinstance(c, float) else f"{'-':>{w}}" for c, w in zip(cells, (8, 9, 10, 9, 9)))
        print(f"{ours['bench']:<14} {ours['model']:<12} {ours['seqlen']:>7} {ours['mode']:<8} " + " ".join(shown))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
