#!/usr/bin/env python
"""Benchmark longctx's Triton FlashAttention-2 against PyTorch SDPA (flash and cuDNN backends) and
FlexAttention, on the same bf16 inputs, in one run; check correctness on the way.

    python scripts/bench_attention.py                  # checks + benchmark, JSON to bench/results/
    python scripts/bench_attention.py --sweep          # also time candidate block configs (tuning)
    python scripts/bench_attention.py --quick          # 4K only, no FlexAttention (a smoke run)

TFLOP/s count the forward as 4 * S^2 * H * D (halved when causal) and the backward as 2.5 times the
forward, as flash-attn's benchmarks do. Batch 1, bf16. Peers use their own (B, H, S, D) layout;
ours takes (B, S, H, D). Writes {"device","torch","triton","commit","command","rows"} as DESIGN.md says.
Needs a CUDA GPU; imports nothing beyond torch, triton and longctx.ops.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from longctx.ops.attention import attention_backward, attention_forward, flash_attn_func  # noqa: E402
from longctx.ops.attention.backward import DKDV_CONFIGS, DKDV_GQA_CONFIGS, DQ_CONFIGS, _bwd  # noqa: E402
from longctx.ops.attention.forward import FWD_CONFIGS, _fwd, padded_head_dim  # noqa: E402
from longctx.ops.attention.naive import attention_reference  # noqa: E402
from benchlib import ROOT, device_slug, peak_gib, rel_err, result_head  # noqa: E402

# (seqlen, heads, kv_heads, head_dim, causal)
SHAPES = [
    (16384, 32, 32, 128, True), (16384, 32, 8, 128, True),
    (65536, 32, 32, 128, True), (65536, 32, 8, 128, True),
    (4096, 32, 32, 128, True), (4096, 32, 8, 128, True),
    (16384, 32, 32, 64, True), (16384, 32, 32, 256, True),
    (16384, 32, 32, 128, False),
    (32768, 32, 8, 64, True),  # the Llama-3.2-1B attention at the length of issue #10's target
]
QUICK_SHAPES = [(4096, 32, 32, 128, True), (4096, 32, 8, 128, True), (4096, 32, 32, 256, True)]


def attention_flops(seqlen, heads, head_dim, causal, mode):
    forward = 4 * seqlen * seqlen * heads * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def bench_ms(fn, seqlen):
    # long runs need fewer repeats; do_bench's warmup/rep are in milliseconds; the median is reported
    rep = 200 if seqlen <= 16384 else 600
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


# ----------------------------------------------------------------------------------------------
# implementations, each: make(q, k, v, causal) -> callable returning out in its own layout
# ----------------------------------------------------------------------------------------------
def ours(q, k, v, causal):
    return flash_attn_func(q, k, v, causal=causal)


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return run


_FLEX = {}


def flex(q, k, v, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        # one compilation per shape: past dynamo's default limit (8) flex would fall back to an unfused
        # implementation that materialises the scores (it did once, for the 9th shape)
        import torch._dynamo
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    seqlen = q.shape[2]
    key = (seqlen, causal)
    if key not in _FLEX:
        _FLEX[key] = create_block_mask(lambda b, h, i, j: i >= j, None, None, seqlen, seqlen,
                                       device=q.device) if causal else None
    return _FLEX["fn"](q, k, v, block_mask=_FLEX[key], enable_gqa=q.shape[1] != k.shape[1])


def measure(name, impl, q, k, v, causal, do, ref, shape):
    """Rows for fwd and fwd_bwd of one implementation; `ref` (out, grads) in ours' layout to compare."""
    seqlen, heads, kv_heads, head_dim, _ = shape
    rows = []
    keys = dict(bench="attention", impl=name, seqlen=seqlen, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, causal=causal, batch=1, dtype="bfloat16")
    to_ours = (lambda t: t) if name == "longctx" else (lambda t: t.transpose(1, 2))
    try:
        out = impl(q, k, v, causal)
        grads = torch.autograd.grad(out, (q, k, v), do)
        check = {}
        if ref is not None:
            check["err_out_vs_sdpa_flash"] = rel_err(to_ours(out), ref[0])
            for n, g, r in zip(("dq", "dk", "dv"), grads, ref[1]):
                g = to_ours(g)
                if g.shape != r.shape:  # gradients of repeated K/V: sum each group
                    g = g.unflatten(2, (r.shape[2], -1)).sum(3)
                check[f"err_{n}_vs_sdpa_flash"] = rel_err(g, r)
        del out, grads
        fwd_ms = bench_ms(lambda: impl(q, k, v, causal), seqlen)

        def fwd_bwd():
            out = impl(q, k, v, causal)
            torch.autograd.grad(out, (q, k, v), do)
        fb_ms = bench_ms(fwd_bwd, seqlen)
        fb_peak = peak_gib(fwd_bwd)
        for mode, ms in (("fwd", fwd_ms), ("fwd_bwd", fb_ms)):
            flops = attention_flops(seqlen, heads, head_dim, causal, mode)
            row = dict(keys, mode=mode, ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                       tok_s=round(seqlen / ms * 1e3, 1))
            if mode == "fwd_bwd":
                row["peak_gib"] = round(fb_peak, 3)
                row.update({k_: round(v_, 6) for k_, v_ in check.items()})
            rows.append(row)
    except Exception as e:  # a peer may not support a shape (cuDNN GQA, flex at D256): record it
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"  {name} failed: {msg}", flush=True)
        rows.append(dict(keys, mode="fwd_bwd", error=msg))
    torch.cuda.empty_cache()
    return rows


def run_benchmark(shapes, with_flex):
    from torch.nn.attention import SDPBackend
    rows = []
    for shape in shapes:
        seqlen, heads, kv_heads, head_dim, causal = shape
        print(f"== S={seqlen} H={heads} Hkv={kv_heads} D={head_dim} causal={causal}", flush=True)
        gen = torch.Generator(device="cuda").manual_seed(seqlen + heads + kv_heads + head_dim)

        def rand(*s):
            return torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)
        q, k, v, do = rand(1, seqlen, heads, head_dim), rand(1, seqlen, kv_heads, head_dim), \
            rand(1, seqlen, kv_heads, head_dim), rand(1, seqlen, heads, head_dim)
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        # peers' layout (B, H, S, D), contiguous, same values
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        flash = sdpa(SDPBackend.FLASH_ATTENTION)
        ref_out = flash(qt, kt, vt, causal)
        ref_grads = torch.autograd.grad(ref_out, (qt, kt, vt), dot)
        ref = (ref_out.transpose(1, 2), [g.transpose(1, 2) for g in ref_grads])
        del ref_out, ref_grads
        peers = [("sdpa_flash", flash), ("sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION))]
        if with_flex:
            peers.append(("flex", flex))
        rows += measure("longctx", ours, q, k, v, causal, do, ref, shape)
        for name, impl in peers:
            new = measure(name, impl, qt, kt, vt, causal, dot, ref, shape)
            if name == "sdpa_cudnn" and kv_heads != heads and "error" in new[-1]:
                # cuDNN without GQA support: give it K and V repeated per query head (outside the timing)
                group = heads // kv_heads
                kr, vr = (x.detach().repeat_interleave(group, dim=1).requires_grad_() for x in (kt, vt))
                new = measure(name, impl, qt, kr, vr, causal, dot, ref, shape)
                for r in new:
                    r["kv_repeated"] = True
                del kr, vr
            rows += new
        for r in rows[-2 * (1 + len(peers)):]:
            if "tflops" in r:
                print(f"  {r['impl']:<11} {r['mode']:<8} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s", flush=True)
        del q, k, v, do, qt, kt, vt, dot, ref
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# correctness on the GPU: bf16 (the CPU interpreter cannot run bf16 dots) and fp16 vs float64
# ----------------------------------------------------------------------------------------------
CHECK_CASES = [
    # (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, causal_offset)
    (2, 1000, 1000, 8, 2, 128, True, None), (2, 777, 777, 4, 4, 64, False, None),
    (1, 513, 1030, 4, 1, 80, True, None), (1, 600, 600, 4, 2, 96, True, -100),
    (1, 300, 300, 2, 2, 192, True, 150), (1, 455, 455, 4, 2, 256, True, None),
    (1, 455, 455, 4, 4, 256, False, None), (1, 257, 257, 4, 2, 32, True, None),
]
VARLEN_DOCS = [1, 700, 1, 129, 0, 333, 64]


def run_checks(dtypes, only_head_dim=None):
    rows, failures = [], []
    gen = torch.Generator(device="cuda").manual_seed(1234)
    for dtype in dtypes:
        for batch, sq, sk, heads, kv_heads, d, causal, offset in CHECK_CASES:
            if only_head_dim is not None and d != only_head_dim:
                continue
            def rand(*s):
                return torch.randn(*s, device="cuda", dtype=dtype, generator=gen)
            q, k, v = rand(batch, sq, heads, d), rand(batch, sk, kv_heads, d), rand(batch, sk, kv_heads, d)
            do = rand(batch, sq, heads, d)
            kw = dict(causal=causal, causal_offset=offset if causal else None)
            rows.append(_check_one(f"{dtype} B{batch}-Sq{sq}-Sk{sk}-H{heads}/{kv_heads}-D{d}-"
                                   f"{'causal' if causal else 'full'}-off{offset}", q, k, v, do, kw, {}, failures))
        if only_head_dim is not None:
            continue
        # varlen: documents of length 1 and 0, with and without explicit offsets
        lengths = torch.tensor(VARLEN_DOCS)
        cu = torch.zeros(len(VARLEN_DOCS) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        cu = cu.cuda()
        total, heads, kv_heads, d = int(cu[-1]), 4, 2, 128
        q, k, v, do = (torch.randn(total, h, d, device="cuda", dtype=dtype, generator=gen)
                       for h in (heads, kv_heads, kv_heads, heads))
        kw = dict(causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
        rows.append(_check_one(f"{dtype} varlen docs={VARLEN_DOCS} H{heads}/{kv_heads}-D{d}-causal", q, k, v, do,
                               kw, dict(max_seqlen_q=max(VARLEN_DOCS), max_seqlen_k=max(VARLEN_DOCS)), failures))
    return rows, failures


def _check_one(name, q, k, v, do, kw, extra, failures):
    out, lse = attention_forward(q, k, v, **kw, **extra)
    grads = attention_backward(do, q, k, v, out, lse, **kw, **extra)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention_reference(*leaves, **kw)
    ref_grads = torch.autograd.grad(ref_out, leaves, do.double())
    low = [x.detach().requires_grad_() for x in (q, k, v)]
    low_out, _ = attention_reference(*low, **kw)   # PyTorch in the low precision: the yardstick
    low_grads = torch.autograd.grad(low_out, low, do)
    finite = torch.isfinite(ref_lse)
    row = {"check": name, "lse_inf_match": bool(torch.equal(finite, torch.isfinite(lse))),
           "lse_max_abs_err": (lse[finite].double() - ref_lse[finite]).abs().max().item() if finite.any() else 0.0}
    ok = row["lse_inf_match"] and row["lse_max_abs_err"] < 2e-2
    for n, ours_, low_, ref_ in zip(("out", "dq", "dk", "dv"), (out, *grads), (low_out, *low_grads),
                                    (ref_out, *ref_grads)):
        e, e_low = rel_err(ours_, ref_), rel_err(low_, ref_)
        row[f"err_{n}"], row[f"err_{n}_torch_lowp"] = round(e, 6), round(e_low, 6)
        ok &= e <= 2 * e_low + 1e-4 and math.isfinite(e)
    row["ok"] = bool(ok)
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: " + " ".join(
        f"{n}={row[f'err_{n}']:.2e}/{row[f'err_{n}_torch_lowp']:.2e}" for n in ("out", "dq", "dk", "dv")), flush=True)
    if not ok:
        failures.append(name)
    return row


# ----------------------------------------------------------------------------------------------
# sweep of block configurations (offline tuning; the winners go into FWD/DKDV/DQ_CONFIGS)
# ----------------------------------------------------------------------------------------------
# Candidates of the last sweep (the first sweeps' lists and timings are in bench/results/*.json).
# A 5th entry "split" runs dK and dV in two passes. (A variant with K and V as right-hand operands of the
# dK/dV dots, "kvright", was tried at head dim 256 and lost: bench/results/attention_h100_d256.json.)
FWD_CANDIDATES = {
    64: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 4)],
    128: [(128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 5)],
    256: [(128, 64, 8, 2)],
}
DKDV_CANDIDATES = {
    64: [(64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 4, 3), (32, 128, 8, 3), (128, 128, 8, 3),
         (64, 64, 4, 4)],
    128: [(32, 64, 4, 4), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 5)],
    256: [(64, 64, 8, 2), (64, 64, 8, 2, "split"), (32, 64, 4, 2, "split"), (64, 64, 4, 2, "split"), (32, 32, 4, 3)],
}
DQ_CANDIDATES = {
    64: [(64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3)],
    256: [(128, 32, 8, 3)],
}
DKDV_GQA_CANDIDATES = {
    64: [(64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 4, 3), (32, 128, 8, 3), (128, 128, 8, 3),
         (64, 64, 4, 4), (64, 64, 4, 5), (32, 128, 4, 4), (32, 128, 4, 5), (32, 64, 4, 4), (64, 128, 8, 4)],
    128: [(32, 64, 4, 4), (32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 8, 4), (32, 64, 4, 3), (64, 64, 4, 4)],
}


def run_sweep(head_dims, seqlen=16384, heads=32, kv_heads=32, apply=False):
    """Time the candidates (causal, bf16); with `apply`, the winners replace the tables for this run.
    With kv_heads < heads only the dK/dV kernel's grouped-query configs are swept."""
    results, chosen = [], {}
    causal, grouped = True, kv_heads != heads
    for head_dim in head_dims:
        print(f"== sweep D={head_dim} causal={causal} S={seqlen} H={heads} Hkv={kv_heads}", flush=True)
        gen = torch.Generator(device="cuda").manual_seed(7)
        q, do = (torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                             generator=gen) for _ in range(2))
        k, v = (torch.randn(1, seqlen, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16,
                            generator=gen) for _ in range(2))
        args = dict(softmax_scale=head_dim ** -0.5, causal=causal, causal_offset=None, cu_seqlens_q=None,
                    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, causal_offsets=None)
        out, lse = _fwd(q, k, v, out_dtype=None, **args)
        fwd_flops = attention_flops(seqlen, heads, head_dim, causal, "fwd")
        bd = padded_head_dim(head_dim)

        def timed(kind, cfg, fn):
            try:
                ms = bench_ms(fn, seqlen)
                factor = 1.0 if kind == "fwd" else 2.5
                r = dict(kind=kind, head_dim=head_dim, causal=causal, config=cfg, ms=round(ms, 4),
                         tflops=round(fwd_flops * factor / ms / 1e9, 1))
            except Exception as e:
                r = dict(kind=kind, head_dim=head_dim, causal=causal, config=cfg,
                         error=f"{type(e).__name__}: {str(e)[:120]}")
            print("  ", r, flush=True)
            results.append(r)
            return r

        def best(kind, default):
            cands = [r for r in results if r["kind"] == kind and r["head_dim"] == head_dim and "ms" in r]
            return tuple(min(cands, key=lambda r: r["ms"])["config"]) if cands else default

        dq_default = DQ_CONFIGS[(bd, causal)]
        if grouped:
            for cfg in DKDV_GQA_CANDIDATES[head_dim]:
                timed("bwd(dkdv gqa sweep)", cfg, lambda: _bwd(do, q, k, v, out, lse, delta=None, grad_dtype=None,
                                                               configs=(cfg, dq_default), **args))
            winner = best("bwd(dkdv gqa sweep)", DKDV_CONFIGS[(bd, causal)])
            chosen[head_dim] = dict(dkdv_gqa=winner)
            print(f"  BEST D={head_dim} GQA: {winner}", flush=True)
            if apply:
                DKDV_GQA_CONFIGS[(bd, True)] = DKDV_GQA_CONFIGS[(bd, False)] = winner
            continue
        for cfg in FWD_CANDIDATES[head_dim]:
            timed("fwd", cfg, lambda: _fwd(q, k, v, out_dtype=None, config=cfg, **args))
        for cfg in DKDV_CANDIDATES[head_dim]:
            timed("bwd(dkdv sweep)", cfg, lambda: _bwd(do, q, k, v, out, lse, delta=None, grad_dtype=None,
                                                       configs=(cfg, dq_default), **args))
        best_dkdv = best("bwd(dkdv sweep)", DKDV_CONFIGS[(bd, causal)])
        for cfg in DQ_CANDIDATES[head_dim]:
            timed("bwd(dq sweep)", cfg, lambda: _bwd(do, q, k, v, out, lse, delta=None, grad_dtype=None,
                                                     configs=(best_dkdv, cfg), **args))
        winners = dict(fwd=best("fwd", FWD_CONFIGS[(bd, causal)]), dkdv=best_dkdv,
                       dq=best("bwd(dq sweep)", DQ_CONFIGS[(bd, causal)]))
        chosen[head_dim] = winners
        print(f"  BEST D={head_dim}: {winners}", flush=True)
        if apply:
            for flag in (True, False):
                FWD_CONFIGS[(bd, flag)] = winners["fwd"]
                DKDV_CONFIGS[(bd, flag)] = winners["dkdv"]
                DQ_CONFIGS[(bd, flag)] = winners["dq"]
        del q, k, v, do, out, lse
        torch.cuda.empty_cache()
    return results, chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4K shapes only, no FlexAttention")
    parser.add_argument("--sweep", type=int, nargs="*", default=None, metavar="HEAD_DIM",
                        help="time candidate block configs for these head dims first (default 64 128 256)")
    parser.add_argument("--apply", action="store_true", help="benchmark with the sweep's winners")
    parser.add_argument("--sweep-kv-heads", type=int, default=32, help="kv heads of the sweep (< 32: GQA dK/dV only)")
    parser.add_argument("--kv-heads", type=int, default=None, help="benchmark only the shapes with these kv heads")
    parser.add_argument("--head-dim", type=int, default=None, help="benchmark and check only this head dim")
    parser.add_argument("--check-dtypes", default="bfloat16,float16")
    parser.add_argument("--no-bench", action="store_true", help="checks (and sweep) only")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/attention_<device>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    out_path = args.out or os.path.join(ROOT, "bench", "results", f"attention_{device_slug(device)}.json")
    result = {**result_head(device), "rows": []}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    t0 = time.time()
    if args.sweep is not None:
        try:
            result["sweep"], result["sweep_winners"] = run_sweep(args.sweep or [64, 128, 256], kv_heads=args.sweep_kv_heads,
                                                                 apply=args.apply)
        except Exception:
            traceback.print_exc()
        save()
    result["configs_used"] = {"fwd": {str(k): v for k, v in FWD_CONFIGS.items()},
                              "dkdv": {str(k): v for k, v in DKDV_CONFIGS.items()},
                              "dkdv_gqa": {str(k): v for k, v in DKDV_GQA_CONFIGS.items()},
                              "dq": {str(k): v for k, v in DQ_CONFIGS.items()}}
    # after the sweep, so that the checks run the configurations the benchmark uses
    print("== correctness (vs float64; yardstick: PyTorch in the same low precision)", flush=True)
    checks, failures = run_checks([getattr(torch, name) for name in args.check_dtypes.split(",") if name],
                                  args.head_dim)
    result["checks"] = checks
    save()
    print(f"checks: {len(checks) - len(failures)}/{len(checks)} ok ({time.time() - t0:.0f} s)", flush=True)
    if not args.no_bench:
        shapes = QUICK_SHAPES if args.quick else SHAPES
        if args.kv_heads is not None:
            shapes = [s for s in shapes if s[2] == args.kv_heads]
        if args.head_dim is not None:
            shapes = [s for s in shapes if s[3] == args.head_dim]
        for shape in shapes:
            result["rows"] += run_benchmark([shape], with_flex=not (args.quick or args.no_flex))
            save()
        print_table(result["rows"])
    print(f"wrote {out_path} ({time.time() - t0:.0f} s)")
    if failures:
        sys.exit(f"correctness checks failed: {failures}")


def print_table(rows):
    impls = ["longctx", "sdpa_flash", "sdpa_cudnn", "flex"]
    print(f"\n{'S':>6} {'H/Hkv':>6} {'D':>4} {'causal':>6} {'mode':>8} " + " ".join(f"{i:>11}" for i in impls)
          + "   (TFLOP/s)")
    shapes = sorted({(r["seqlen"], r["heads"], r["kv_heads"], r["head_dim"], r["causal"]) for r in rows},
                    key=lambda s: (s[3] != 128, not s[4], s[0], -s[2]))
    for s in shapes:
        for mode in ("fwd", "fwd_bwd"):
            cells = []
            for impl in impls:
                match = [r for r in rows if (r["seqlen"], r["heads"], r["kv_heads"], r["head_dim"], r["causal"]) == s
                         and r["impl"] == impl and r.get("mode") == mode and "tflops" in r]
                cells.append(f"{match[0]['tflops']:>11.1f}" if match else f"{'-':>11}")
            print(f"{s[0]:>6} {s[1]:>3}/{s[2]:<2} {s[3]:>4} {str(s[4]):>6} {mode:>8} " + " ".join(cells))


if __name__ == "__main__":
    main()
