#!/usr/bin/env python
"""Benchmark softmax attention: longctx's backends (the seam, `longctx/ops/attention/backends.py`:
Triton, cuDNN, and `auto`) against PyTorch SDPA (flash and cuDNN backends) and FlexAttention, on the
same bf16 inputs, in one run; every backend is checked on the GPU before anything is timed.

    python scripts/bench_attention.py                     # checks + benchmark, JSON to bench/results/
    python scripts/bench_attention.py --write-auto-table  # also time the backends over the auto
                                                          # table's shapes and write auto_table.json
    python scripts/bench_attention.py --sweep             # also time candidate block configs (tuning)
    python scripts/bench_attention.py --quick             # 4K only, no FlexAttention (a smoke run)
    python scripts/bench_attention.py --deterministic     # also rows of the deterministic backward

Modules: `attention_sweep.py` (the Triton kernels' block-config sweep and profile),
`attention_checks.py` (the Triton kernels against float64 on the GPU), `check_backends_gpu.py` (each
backend against the torch backend), `auto_table.py` (the table `model.attention=auto` reads), and
this file (the benchmark). Timing helpers: `benchlib.py`.

Rows (`impl`): `longctx` (the Triton kernels through flash_attn_func, the backward in its default
mode: the one pass, dQ by atomics, for head dims with an entry in ONE_PASS_CONFIGS, else the two
kernels), `longctx_deterministic` (with --deterministic), `backend_<name>` (each backend of the seam
that passed its GPU checks, through `backends.attention`; a row with `unsupported` where the backend
does not take the shape), `auto` (what `model.attention=auto` picks, named in `auto_backend`; after
--write-auto-table, from the table just written), the peers `sdpa_flash`, `sdpa_cudnn`, `flex`. A
backend that failed any GPU check is neither timed nor written into the table. `--jobs N` runs the
Triton correctness checks and the first compilation of every kernel the timings use in N processes
first (Triton compiles one kernel at a time per process). `--profile` adds, per shape, the time of
each of our kernels and each compiled kernel's registers, spills and shared memory.

TFLOP/s count the forward as 4 * S^2 * H * D (halved when causal) and the backward as 2.5 times the
forward, as flash-attn's benchmarks do. Batch 1, bf16. Peers use their own (B, H, S, D) layout;
ours takes (B, S, H, D). Writes {"device","torch","triton","commit","command","rows"} as DESIGN.md says.
Needs a CUDA GPU; imports nothing beyond torch, triton and longctx.ops.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from longctx.ops.attention import (  # noqa: E402
    attention_backward, attention_forward, flash_attn_func, flash_attn_varlen_func)
from longctx.ops.attention import backends as seam  # noqa: E402
from longctx.ops.attention.backward import DKDV_CONFIGS, DKDV_GQA_CONFIGS, DQ_CONFIGS, ONE_PASS_CONFIGS, _bwd  # noqa: E402
from longctx.ops.attention.forward import FWD_CONFIGS, _fwd  # noqa: E402
import auto_table  # noqa: E402
import check_backends_gpu  # noqa: E402
from attention_checks import check_tasks, run_check  # noqa: E402
from attention_sweep import (TABLES, _set_tables, kernel_resources, kernel_times, run_sweep,  # noqa: E402
                             sweep_warm_tasks)
from benchlib import ROOT, attention_flops, device_slug, median_ms, peak_gib, rel_err, result_head  # noqa: E402

# (seqlen, heads, kv_heads, head_dim, causal): issue #19's shapes
SHAPES = [
    (16384, 32, 32, 128, True), (32768, 32, 8, 64, True),  # the second: the Llama-3.2-1B attention
    (65536, 32, 8, 128, True), (16384, 32, 32, 128, False), (16384, 32, 32, 256, True),
    (65536, 32, 32, 128, True),
]
QUICK_SHAPES = [(4096, 32, 32, 128, True), (4096, 32, 8, 128, True), (4096, 32, 32, 256, True)]
# packed documents against the dense kernel at the same work: `docs` documents of `seqlen` tokens,
# as one packed (docs * seqlen) sequence with cu_seqlens, and as a dense batch of `docs`
PACKED_SHAPES = [(16384, 4, 32, 8, 128, True)]  # (seqlen, docs, heads, kv_heads, head_dim, causal)


def bench_ms(fn, seqlen):
    return median_ms(fn, seqlen)


# ----------------------------------------------------------------------------------------------
# implementations, each: make(q, k, v, causal) -> callable returning out in its own layout
# ----------------------------------------------------------------------------------------------
def ours(q, k, v, causal):
    return flash_attn_func(q, k, v, causal=causal)


def ours_deterministic(q, k, v, causal):
    return flash_attn_func(q, k, v, causal=causal, deterministic=True)


def seam_backend(name):
    """A backend of the seam (or "auto"), with autograd, in our (B, S, H, D) layout."""
    def run(q, k, v, causal):
        return seam.attention(q, k, v, backend=name, causal=causal)
    return run


def seam_packed(name, cu, seqlen):
    """The same over packed (T, H, D) documents of `seqlen` tokens each."""
    def run(q, k, v, causal):
        return seam.attention(q, k, v, backend=name, causal=causal, cu_seqlens=cu, max_seqlen=seqlen)
    return run


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


def measure(name, impl, q, k, v, causal, do, ref, shape, batch=1, **extra_keys):
    """Rows for fwd and fwd_bwd of one implementation; `ref` (out, grads) in ours' layout to compare.
    `batch` sequences of the shape's length (dense, or packed documents) count in the figures."""
    seqlen, heads, kv_heads, head_dim, _ = shape
    rows = []
    keys = dict(bench="attention", impl=name, seqlen=seqlen, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, causal=causal, batch=batch, dtype="bfloat16", **extra_keys)
    ours_layout = name.startswith(("longctx", "backend_", "auto"))
    to_ours = (lambda t: t) if ours_layout else (lambda t: t.transpose(1, 2))
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
            flops = batch * attention_flops(seqlen, heads, head_dim, causal, mode)
            row = dict(keys, mode=mode, ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                       tok_s=round(batch * seqlen / ms * 1e3, 1))
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


def measure_backends(names, q, k, v, causal, do, ref, shape, packed_cu=None, batch=1, **extra):
    """Rows of each named backend of the seam that takes the shape, then of "auto" (which names the
    backend it picked: `auto_backend`). `packed_cu`: q, k, v are packed (T, H, D) documents."""
    rows = []
    seqlen, heads, kv_heads, head_dim, _ = shape
    for name in list(names) + (["auto"] if names else []):
        if name != "auto":
            ok, reason = seam.backends()[name].usable(q.device, q.dtype, head_dim, causal, heads != kv_heads,
                                                      packed_cu is not None)
            if not ok:
                rows.append(dict(bench="attention", impl=f"backend_{name}", seqlen=seqlen, heads=heads,
                                 kv_heads=kv_heads, head_dim=head_dim, causal=causal, batch=batch,
                                 dtype="bfloat16", mode="fwd_bwd", unsupported=reason, **extra))
                continue
        impl = seam_backend(name) if packed_cu is None else seam_packed(name, packed_cu, seqlen)
        new = measure("auto" if name == "auto" else f"backend_{name}", impl, q, k, v, causal, do, ref, shape,
                      batch=batch, **extra)
        if name == "auto":
            picked = seam.select_for("auto", q, k, causal=causal, varlen=packed_cu is not None, seqlen=seqlen)
            for r in new:
                r["auto_backend"] = picked.name
        rows += new
    return rows


def run_benchmark(shapes, with_flex, deterministic, backends=(), peers=True):
    """Rows of each shape: ours, the seam's `backends` (names) and auto, and with `peers` SDPA and flex."""
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
        others = [("sdpa_flash", flash), ("sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION))] if peers else []
        if with_flex and peers:
            others.append(("flex", flex))
        start = len(rows)
        if peers:
            rows += measure("longctx", ours, q, k, v, causal, do, ref, shape)
        if deterministic and peers:
            rows += measure("longctx_deterministic", ours_deterministic, q, k, v, causal, do, ref, shape)
        rows += measure_backends(backends, q, k, v, causal, do, ref, shape)
        for name, impl in others:
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
        for r in rows[start:]:
            if "tflops" in r:
                print(f"  {r['impl']:<15} {r['mode']:<8} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s", flush=True)
        del q, k, v, do, qt, kt, vt, dot, ref
        torch.cuda.empty_cache()
    return rows


def run_packed(shapes, deterministic, backends=(), peers=True):
    """Packed documents (varlen, cu_seqlens) against the dense kernel on the same tokens: same work;
    the seam's `backends` (and auto) on both layouts."""
    rows = []
    for seqlen, docs, heads, kv_heads, head_dim, causal in shapes:
        print(f"== packed: {docs} documents of {seqlen}, H={heads} Hkv={kv_heads} D={head_dim} causal={causal}",
              flush=True)
        gen = torch.Generator(device="cuda").manual_seed(seqlen + docs)

        def rand(*s):
            return torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)
        q, k, v, do = (rand(docs, seqlen, h, head_dim) for h in (heads, kv_heads, kv_heads, heads))
        cu = torch.arange(docs + 1, device="cuda", dtype=torch.int32) * seqlen
        flat = [x.detach().flatten(0, 1).requires_grad_() for x in (q, k, v)]
        dense = [x.detach().requires_grad_() for x in (q, k, v)]

        def packed(det):
            return lambda q_, k_, v_, c: flash_attn_varlen_func(q_, k_, v_, cu, cu, seqlen, seqlen, causal=c,
                                                                deterministic=det)

        def dense_impl(det):
            return lambda q_, k_, v_, c: flash_attn_func(q_, k_, v_, causal=c, deterministic=det)
        # the packed result must be the dense one (the same math per document)
        out_p = packed(False)(*flat, causal)
        grads_p = torch.autograd.grad(out_p, flat, do.flatten(0, 1))
        out_d = dense_impl(False)(*dense, causal)
        grads_d = torch.autograd.grad(out_d, dense, do)
        check = {f"err_{n}_packed_vs_dense": round(rel_err(a.flatten(0, 1), b), 6)
                 for n, a, b in zip(("out", "dq", "dk", "dv"), (out_d, *grads_d), (out_p, *grads_p))}
        print("  ", check, flush=True)
        del out_p, grads_p, out_d, grads_d
        shape = (seqlen, heads, kv_heads, head_dim, causal)
        modes = ([("longctx", False)] + ([("longctx_deterministic", True)] if deterministic else [])) if peers else []
        for layout, leaves, grad, cu_ in (("dense", dense, do, None), ("packed", flat, do.flatten(0, 1), cu)):
            new = measure_backends(backends, *leaves, causal, grad, None, shape, packed_cu=cu_, batch=docs,
                                   layout=layout)
            for r in new:
                if "tflops" in r:
                    print(f"  {r['impl']:<22} {layout:<7} {r['mode']:<8} {r['ms']:9.3f} ms {r['tflops']:7.1f} "
                          f"TFLOP/s", flush=True)
            rows += new
        for name, det in modes:
            for layout, impl, leaves, grad in (("dense", dense_impl(det), dense, do),
                                               ("packed", packed(det), flat, do.flatten(0, 1))):
                new = measure(name, impl, *leaves, causal, grad, None, shape, batch=docs, layout=layout)
                for r in new:
                    r.update(check if layout == "packed" and r.get("mode") == "fwd_bwd" else {})
                    if "tflops" in r:
                        print(f"  {name:<22} {layout:<7} {r['mode']:<8} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s",
                              flush=True)
                rows += new
        del q, k, v, do, flat, dense
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# compiling in parallel: the checks, and one small run of every kernel variant the timings use
# ----------------------------------------------------------------------------------------------
def run_task(task):
    """A pool worker's task; kernels compiled here land in Triton's on-disk cache for the parent."""
    kind, *args = task
    try:
        if kind == "check":
            return run_check(*args)
        if kind == "warm_flex":  # FlexAttention compiles per shape (dynamic=False): its caches on disk
            seqlen, heads, kv_heads, head_dim, causal = args[0]
            q, k, v = (torch.randn(1, h, seqlen, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for h in (heads, kv_heads, kv_heads))
            flex(q, k, v, causal).sum().backward()
            torch.cuda.synchronize()
            return []
        if kind == "warm":  # the kernels of one (shape, backward config) at a short length: same specialization
            (seqlen, heads, kv_heads, head_dim, causal), deterministic, fwd_config, bwd_config = args
            seqlen, batch = 512, 1
        else:  # "warm_packed": dense and packed, default configs
            (seqlen, docs, heads, kv_heads, head_dim, causal), deterministic = args
            seqlen, batch, fwd_config, bwd_config = 512, docs, None, None
        q, k, v, do = (torch.randn(batch, seqlen, h, head_dim, device="cuda", dtype=torch.bfloat16)
                       for h in (heads, kv_heads, kv_heads, heads))
        common = dict(softmax_scale=head_dim ** -0.5, causal=causal, causal_offset=None, cu_seqlens_q=None,
                      cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, causal_offsets=None)
        if kind == "warm_packed":
            cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * seqlen
            common.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seqlen, max_seqlen_k=seqlen)
            q, k, v, do = (x.flatten(0, 1) for x in (q, k, v, do))
        out, lse = _fwd(q, k, v, out_dtype=None, config=fwd_config, **common)
        _bwd(do, q, k, v, out, lse, delta=None, grad_dtype=None, deterministic=deterministic, configs=bwd_config,
             **common)
        if kind == "warm_packed":
            q, k, v, do = (x.unflatten(0, (batch, seqlen)) for x in (q, k, v, do))
            out, lse = attention_forward(q, k, v, causal=causal)
            attention_backward(do, q, k, v, out, lse, causal=causal, deterministic=deterministic)
        torch.cuda.synchronize()
        return []
    except Exception as e:  # reported, and the timed run meets the same error where it matters
        return [{"task": str(task), "error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False}]


def run_pool(tasks, jobs):
    """Rows of the tasks, run in `jobs` fresh processes that take the parent's configuration tables. A
    worker that dies (a crash in a kernel) fails its tasks and the ones after it, not the run."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    rows = []
    with ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn"), initializer=_set_tables,
                             initargs=(tuple(dict(t) for t in TABLES),)) as pool:
        futures = [pool.submit(run_task, task) for task in tasks]
        for task, future in zip(tasks, futures):
            try:
                rows += future.result()
            except Exception as e:
                rows.append({"task": str(task), "error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False})
    return rows




def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4K shapes only, no FlexAttention")
    parser.add_argument("--sweep", type=int, nargs="*", default=None, metavar="HEAD_DIM",
                        help="time candidate block configs for these head dims first (default 64 128 256)")
    parser.add_argument("--apply", action="store_true", help="benchmark with the sweep's winners")
    parser.add_argument("--deterministic", action="store_true", help="also rows of the deterministic backward")
    parser.add_argument("--profile", action="store_true", help="time per kernel and compiled kernels' resources")
    parser.add_argument("--jobs", type=int, default=8, help="processes for the checks and first compilations")
    parser.add_argument("--kv-heads", type=int, default=None, help="benchmark only the shapes with these kv heads")
    parser.add_argument("--head-dim", type=int, default=None, help="benchmark and check only this head dim")
    parser.add_argument("--check-dtypes", default="bfloat16,float16")
    parser.add_argument("--no-bench", action="store_true", help="checks (and sweep) only")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/attention_<device>.json)")
    parser.add_argument("--write-auto-table", action="store_true",
                        help="time the backends over the table's shapes and write the auto table")
    parser.add_argument("--table", default=seam.TABLE_PATH, help="where --write-auto-table writes")
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
        head_dims = args.sweep or [64, 128, 256]
        result["compile_errors"] = run_pool(sweep_warm_tasks(head_dims), args.jobs)
        print(f"sweep compiled ({time.time() - t0:.0f} s)", flush=True)
        try:
            result["sweep"], result["sweep_winners"] = run_sweep(head_dims, apply=args.apply)
            result["kernel_resources"] = kernel_resources()
        except Exception:
            traceback.print_exc()
        save()
    result["configs_used"] = {"fwd": {str(k): v for k, v in FWD_CONFIGS.items()},
                              "one_pass": {str(k): v for k, v in ONE_PASS_CONFIGS.items()},
                              "dkdv": {str(k): v for k, v in DKDV_CONFIGS.items()},
                              "dkdv_gqa": {str(k): v for k, v in DKDV_GQA_CONFIGS.items()},
                              "dq": {str(k): v for k, v in DQ_CONFIGS.items()}}
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.kv_heads is not None:
        shapes = [s for s in shapes if s[2] == args.kv_heads]
    if args.head_dim is not None:
        shapes = [s for s in shapes if s[3] == args.head_dim]
    packed = [] if args.quick or args.head_dim is not None else PACKED_SHAPES
    with_flex = not (args.quick or args.no_flex)
    # after the sweep, so that the checks run the configurations the benchmark uses; the benchmark's
    # first compilations ride along in the same processes
    print("== correctness (vs float64; yardstick: PyTorch in the same low precision)", flush=True)
    tasks = check_tasks(args.check_dtypes.split(","), args.head_dim)
    modes = (False, True) if args.deterministic else (False,)
    if not args.no_bench or args.profile:
        tasks += [("warm", s, det, None, None) for s in shapes for det in modes]
    if not args.no_bench:
        tasks += [("warm_packed", s, det) for s in packed for det in modes]
        tasks += [("warm_flex", s) for s in shapes if with_flex]
    rows = run_pool(tasks, args.jobs)
    checks = [r for r in rows if "check" in r]
    failures = [f"{r['check']} {r['backward']}" for r in checks if not r["ok"]]
    # every backend of the seam against the torch backend: one that fails is not timed
    print("== backends (vs the torch backend in fp32 from the same bf16 inputs)", flush=True)
    result["backend_checks"] = check_backends_gpu.run_checks()
    check_backends_gpu.print_table(result["backend_checks"])
    result["backend_summary"] = check_backends_gpu.summary(result["backend_checks"])
    backends = passing_backends(result["backend_checks"], failures)
    result["backends_timed"] = backends
    print(f"backends timed: {backends}", flush=True)
    result["checks"] = checks
    result["compile_errors"] = result.get("compile_errors", []) + [r for r in rows if "task" in r]
    for r in result["compile_errors"]:
        print("  compile error:", r, flush=True)
    save()
    print(f"checks: {len(checks) - len(failures)}/{len(checks)} ok ({time.time() - t0:.0f} s)", flush=True)
    if args.write_auto_table:
        table_rows = []
        for shape in auto_table.DENSE_SHAPES:
            table_rows += run_benchmark([shape], False, False, backends=backends, peers=False)
        table_rows += run_packed(auto_table.PACKED_SHAPES, False, backends=backends, peers=False)
        result["auto_table_rows"] = table_rows
        written = auto_table.write(table_rows, args.table, torch.device("cuda"), result_head(device))
        seam.load_table.cache_clear()
        seam.clear_selection()
        result["auto_table"] = written
        print(f"wrote {args.table}: {len(written['entries'])} entries", flush=True)
        save()
    if not args.no_bench:
        for shape in shapes:
            result["rows"] += run_benchmark([shape], with_flex, args.deterministic, backends=backends)
            if args.profile:  # after each shape: a run cut short keeps what it compiled
                result["kernel_resources"] = kernel_resources()
            save()
        try:
            result["rows"] += run_packed(packed, args.deterministic, backends=backends)
        except Exception:
            traceback.print_exc()
        save()
        print_table(result["rows"])
    if args.profile:
        try:
            result["kernel_resources"] = kernel_resources()
            result["kernel_ms"] = [kernel_times(s, det) for s in shapes for det in modes]
        except Exception:
            traceback.print_exc()
        save()
        for r in result.get("kernel_ms", []):
            print(r, flush=True)
    print(f"wrote {out_path} ({time.time() - t0:.0f} s)")
    if failures:
        sys.exit(f"correctness checks failed: {failures}")


def passing_backends(backend_rows, triton_failures) -> list:
    """The seam's backends (torch aside: it materialises the scores) that ran every GPU check they
    support without a failure; triton also needs the kernel checks of attention_checks.py."""
    names = []
    for name, backend in seam.backends().items():
        if name == "torch" or not backend.available()[0]:
            continue
        mine = [r for r in backend_rows if r["backend"] == name and not r.get("forced")]
        if any(r["status"] == "FAIL" for r in mine) or (name == "triton" and triton_failures):
            print(f"  {name}: failed a check, not timed", flush=True)
            continue
        names.append(name)
    return names


def print_table(rows):
    impls = ["longctx", "longctx_deterministic", "backend_triton", "backend_cudnn", "auto", "sdpa_flash",
             "sdpa_cudnn", "flex"]
    print(f"\n{'S':>6} {'H/Hkv':>6} {'D':>4} {'causal':>6} {'layout':>6} {'mode':>8} "
          + " ".join(f"{i[:11]:>11}" for i in impls) + "   (TFLOP/s)")
    key = lambda r: (r["seqlen"], r["heads"], r["kv_heads"], r["head_dim"], r["causal"], r.get("layout", "-"))  # noqa: E731
    rows = [r for r in rows if "seqlen" in r]
    shapes = sorted({key(r) for r in rows}, key=lambda s: (s[3] != 128, not s[4], s[5], s[0], -s[2]))
    for s in shapes:
        for mode in ("fwd", "fwd_bwd"):
            cells = []
            for impl in impls:
                match = [r for r in rows if key(r) == s and r["impl"] == impl and r.get("mode") == mode and "tflops" in r]
                cells.append(f"{match[0]['tflops']:>11.1f}" if match else f"{'-':>11}")
            print(f"{s[0]:>6} {s[1]:>3}/{s[2]:<2} {s[3]:>4} {str(s[4]):>6} {s[5]:>6} {mode:>8} " + " ".join(cells))


if __name__ == "__main__":
    main()
