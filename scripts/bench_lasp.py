#!/usr/bin/env python
"""Benchmark lightning attention and LASP: one section per function, rows into one JSON file.

    python scripts/bench_lasp.py --section kernel            # one GPU: our kernel vs fla, 16K/64K/256K
    python scripts/bench_lasp.py --section kernel --sweep    # also time launch configs of our kernel

Section `kernel` (one GPU): 16 heads, head dim 128, bf16, batch 1, forward and forward+backward of
`lightning_attn_func` against flash-linear-attention's `chunk_lightning_attn` (pip
flash-linear-attention, carried as wheels) on the same inputs and the same per-head decay, with
correctness checks first (bf16 against fla and against the fp32 chunked reference).
TFLOP/s are nominal, the same count for both: per token and head the forward does
2*64*Dk + 2*64*Dv (the intra-chunk products, chunk 64) + 4*Dk*Dv (state read and update); the
backward twice that. Writes {"device","torch","triton","commit","command","rows"} (DESIGN.md) to
bench/results/lasp_<device>.json, replacing only rows of the sections that ran.
Needs a CUDA GPU; imports nothing beyond torch, triton, fla and longctx.ops.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from longctx.ops.linear import lightning_attn_func  # noqa: E402
from longctx.ops.linear import forward as linear_forward  # noqa: E402
from longctx.ops.linear.naive import lightning_attn_chunked  # noqa: E402
from benchlib import peak_gib, print_rows, rel_err, result_head  # noqa: E402

HEADS, HEAD_DIM = 16, 128
KERNEL_SEQLENS = [16384, 65536, 262144]


def bench_ms(fn, seqlen):
    rep = 200 if seqlen <= 65536 else 500
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def lightning_flops(seqlen, heads, dk, dv, mode, chunk=64):
    forward = seqlen * heads * (2 * chunk * dk + 2 * chunk * dv + 4 * dk * dv)
    return forward * (3 if mode == "fwd_bwd" else 1)


def fla_decay(heads, layer_idx=0, num_layers=24):
    """The per-head decay chunk_lightning_attn uses (its g_gamma is -decay), as ours takes it."""
    return 8 / heads * (1 - layer_idx / num_layers) * torch.arange(heads, dtype=torch.float32, device="cuda")


def load_fla():
    try:
        from fla.ops.lightning_attn import chunk_lightning_attn
        return chunk_lightning_attn
    except Exception:
        traceback.print_exc()
        print("flash-linear-attention not importable: peer rows skipped")
        return None


def _impls(fla):
    def ours(q, k, v, decay):
        return lightning_attn_func(q, k, v, decay)

    impls = {"longctx": ours}
    if fla is not None:
        def peer(q, k, v, decay):
            return fla(q, k, v, layer_idx=0, num_layers=24, scale=1.0, output_final_state=True)
        impls["fla"] = peer
    return impls


def check_kernel(fla):
    """bf16 outputs and gradients: ours and fla against the fp32 chunked reference, and against each other."""
    lines, failures = [], []
    for seqlen in (4096, 16384):
        torch.manual_seed(seqlen)
        q, k, v = (torch.randn(1, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) * 0.1
                   for _ in range(3))
        do = torch.randn(1, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        decay = fla_decay(HEADS) / 8 + 0.001  # milder decays than fla's so that long-range terms count
        results = {}
        for name, fn in _impls(fla).items():
            if name == "fla":
                def fn(q, k, v, decay, _fla=fla):  # the same decay as ours, through fla's simple_gla
                    from fla.ops.simple_gla import chunk_simple_gla
                    return chunk_simple_gla(q, k, v, g_gamma=-decay, scale=1.0, output_final_state=True)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out, final = fn(*leaves, decay)
            out.backward(do)
            results[name] = [out, final] + [x.grad for x in leaves]
        if seqlen == 4096:
            leaves = [x.float().requires_grad_() for x in (q, k, v)]
            out, final = lightning_attn_chunked(*leaves, decay)
            out.backward(do.float())
            results["reference_fp32"] = [out, final] + [x.grad for x in leaves]
        base = "reference_fp32" if "reference_fp32" in results else "fla"
        for name, got in results.items():
            if name == base or base not in results:
                continue
            errs = {what: rel_err(g, r) for what, g, r in zip(("out", "final", "dq", "dk", "dv"), got, results[base])}
            unwritten = not all(torch.isfinite(g).all() for g in got)
            line = f"check T={seqlen} {name} vs {base}: " + " ".join(f"{w}={e:.2e}" for w, e in errs.items())
            lines.append(line)
            print(line, flush=True)
            if unwritten or max(errs.values()) > 2e-2:
                failures.append(line)
    return failures


def measure(impl, fn, seqlen, mode):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) * 0.1
               for _ in range(3))
    decay = fla_decay(HEADS)
    row = {"bench": "lightning_attn", "impl": impl, "seqlen": seqlen, "heads": HEADS, "head_dim": HEAD_DIM,
           "dtype": "bf16", "gpus": 1, "mode": mode}
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v, decay)
    else:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        do = torch.randn_like(q)

        def step():
            out, _ = fn(*leaves, decay)
            out.backward(do)
    if impl == "longctx":
        row["config"] = json.dumps(linear_forward.launch_settings(seqlen, q.device), sort_keys=True)
    try:
        step()
        ms = bench_ms(step, seqlen)
        row.update(ms=round(ms, 4), tok_s=round(seqlen / ms * 1e3), peak_gib=round(peak_gib(step), 3),
                   tflops=round(lightning_flops(seqlen, HEADS, HEAD_DIM, HEAD_DIM, mode) / ms / 1e9, 2))
    except Exception as error:  # an out-of-memory or a failure of one peer must not lose the other rows
        row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    print(json.dumps(row), flush=True)
    return row


def bench_kernel(args):
    """Section `kernel`: one GPU, ours against fla at 16K, 64K and 256K tokens."""
    fla = load_fla()
    failures = check_kernel(fla)
    rows = []
    for seqlen in args.seqlens or KERNEL_SEQLENS:
        for mode in ("fwd", "fwd_bwd"):
            for impl, fn in _impls(fla).items():
                rows.append(measure(impl, fn, seqlen, mode))
    if args.sweep:
        rows += sweep_kernel(args.seqlens or KERNEL_SEQLENS)
    return rows, failures


def sweep_kernel(seqlens):
    """Time launch configs of our kernel (fwd+bwd); the rows carry the config, impl longctx_sweep."""
    base = linear_forward.GPU_CONFIGS[0][1]
    candidates = [dict(base, **change) for change in (
        {}, {"num_warps": 8}, {"block_z": 128, "num_warps": 8}, {"num_stages": 3}, {"programs_per_sm": 2},
        {"programs_per_sm": 8})]
    rows = []
    try:
        for config in candidates:
            linear_forward.GPU_CONFIG_OVERRIDE = config
            for seqlen in seqlens:
                row = measure("longctx_sweep", lambda q, k, v, d: lightning_attn_func(q, k, v, d), seqlen, "fwd_bwd")
                row["config"] = json.dumps(config, sort_keys=True)
                rows.append(row)
    finally:
        linear_forward.GPU_CONFIG_OVERRIDE = None
    return rows


SECTIONS = {"kernel": bench_kernel}


def print_table(rows):
    print_rows(rows, [("bench", 16, lambda r: r["bench"]), ("impl", 15, lambda r: r["impl"]),
                      ("mode", 9, lambda r: r["mode"]), ("seqlen", 8, lambda r: r["seqlen"]),
                      ("ms", 10, lambda r: f"{r['ms']:.3f}"), ("Mtok/s", 9, lambda r: f"{r['tok_s'] / 1e6:.2f}"),
                      ("TFLOP/s", 9, lambda r: f"{r['tflops']:.1f}"), ("GiB", 8, lambda r: f"{r['peak_gib']:.2f}"),
                      ("config", 6, lambda r: r.get("config", ""))], named_by=4)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", action="append", choices=sorted(SECTIONS), help="sections to run (all)")
    parser.add_argument("--seqlens", type=int, nargs="*", help="override the sequence lengths of `kernel`")
    parser.add_argument("--sweep", action="store_true", help="also time launch configs of our kernel")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/lasp_<device>.json)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    slug = device.lower().replace("nvidia", "").strip().split()[0].replace(" ", "_")
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "results",
                                        f"lasp_{slug}.json")
    sections = args.section or sorted(SECTIONS)
    rows, failures = [], []
    for name in sections:
        section_rows, section_failures = SECTIONS[name](args)
        for row in section_rows:
            row["section"] = name
        rows += section_rows
        failures += section_failures
    kept = []
    if os.path.exists(out_path):  # rows of sections that did not run this time stay
        with open(out_path) as f:
            kept = [r for r in json.load(f).get("rows", []) if r.get("section") not in sections]
    result = {**result_head(device), "rows": kept + rows}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print_table(rows)
    print(f"wrote {out_path}")
    if failures:
        print("CHECK FAILURES:\n" + "\n".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
