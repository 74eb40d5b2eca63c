#!/usr/bin/env python
"""Benchmark longctx's Triton FlashAttention-2 against PyTorch SDPA (flash and cuDNN backends) and
FlexAttention, on the same bf16 inputs, in one run; check correctness on the way.

    python scripts/bench_attention.py                  # checks + benchmark, JSON to bench/results/
    python scripts/bench_attention.py --sweep          # also time candidate block configs (tuning)
    python scripts/bench_attention.py --quick          # 4K only, no FlexAttention (a smoke run)
    python scripts/bench_attention.py --deterministic  # also rows of the deterministic backward

The backward runs in its default mode (`deterministic=False`: the one pass, dQ by atomics, for head dims
with an entry in ONE_PASS_CONFIGS, else the two kernels) as `longctx`, and with `--deterministic` also
as `longctx_deterministic` (always the two kernels). `--jobs N` runs the
correctness checks and the first compilation of every kernel the timings use in N processes first
(Triton compiles one kernel at a time per process), so that the timed part finds them compiled.
`--profile` adds, per shape, the time of each of our kernels (torch.profiler) and each compiled
kernel's registers, spills and shared memory.

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
from longctx.ops.attention import (  # noqa: E402
    attention_backward, attention_forward, flash_attn_func, flash_attn_varlen_func)
from longctx.ops.attention import backward as attention_backward_module  # noqa: E402
from longctx.ops.attention import forward as attention_forward_module  # noqa: E402
from longctx.ops.attention.backward import (  # noqa: E402
    DKDV_CONFIGS, DKDV_GQA_CONFIGS, DQ_CONFIGS, ONE_PASS_CONFIGS, _bwd, bwd_configs)
from longctx.ops.attention.forward import FWD_CONFIGS, _fwd, padded_head_dim  # noqa: E402
from longctx.ops.attention.naive import attention_reference  # noqa: E402
from benchlib import ROOT, device_slug, peak_gib, rel_err, result_head  # noqa: E402

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


def attention_flops(seqlen, heads, head_dim, causal, mode):
    forward = 4 * seqlen * seqlen * heads * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def bench_ms(fn, seqlen):
    # long runs need fewer repeats; do_bench's warmup/rep are in milliseconds; the median is reported
    rep = 100 if seqlen <= 16384 else 300
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


# ----------------------------------------------------------------------------------------------
# implementations, each: make(q, k, v, causal) -> callable returning out in its own layout
# ----------------------------------------------------------------------------------------------
def ours(q, k, v, causal):
    return flash_attn_func(q, k, v, causal=causal)


def ours_deterministic(q, k, v, causal):
    return flash_attn_func(q, k, v, causal=causal, deterministic=True)


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
    to_ours = (lambda t: t) if name.startswith("longctx") else (lambda t: t.transpose(1, 2))
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


def run_benchmark(shapes, with_flex, deterministic):
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
        if deterministic:
            rows += measure("longctx_deterministic", ours_deterministic, q, k, v, causal, do, ref, shape)
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
        for r in rows[-2 * (1 + deterministic + len(peers)):]:
            if "tflops" in r:
                print(f"  {r['impl']:<11} {r['mode']:<8} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s", flush=True)
        del q, k, v, do, qt, kt, vt, dot, ref
        torch.cuda.empty_cache()
    return rows


def run_packed(shapes, deterministic):
    """Packed documents (varlen, cu_seqlens) against the dense kernel on the same tokens: same work."""
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
        modes = [("longctx", False)] + ([("longctx_deterministic", True)] if deterministic else [])
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
# correctness on the GPU: bf16 (the CPU interpreter cannot run bf16 dots) and fp16 vs float64
# ----------------------------------------------------------------------------------------------
CHECK_CASES = [
    # (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, causal_offset)
    (2, 1000, 1000, 8, 2, 128, True, None), (2, 777, 777, 4, 4, 64, False, None),
    (1, 513, 1030, 4, 1, 80, True, None), (1, 600, 600, 4, 2, 96, True, -100),
    (1, 300, 300, 2, 2, 192, True, 150), (1, 455, 455, 4, 2, 256, True, None),
    (1, 455, 455, 4, 4, 256, False, None), (1, 257, 257, 4, 2, 32, True, None),
    (1, 333, 333, 4, 2, 20, True, None),  # a head dim the descriptors take padded
]
VARLEN_DOCS = [1, 700, 1, 129, 0, 333, 64]


def check_tasks(dtypes, only_head_dim=None):
    """One task per check case: (dtype name, index in CHECK_CASES, or "varlen")."""
    tasks = []
    for dtype in dtypes:
        tasks += [("check", dtype, i) for i, case in enumerate(CHECK_CASES)
                  if only_head_dim is None or case[5] == only_head_dim]
        if only_head_dim is None:
            tasks.append(("check", dtype, "varlen"))
    return tasks


def run_check(dtype_name, case):
    """Rows of one check case, one per backward mode (fresh inputs from the case's own seed)."""
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(1234 + (len(CHECK_CASES) if case == "varlen" else case))

    def rand(*s):
        return torch.randn(*s, device="cuda", dtype=dtype, generator=gen)
    if case == "varlen":  # documents of length 1 and 0
        cu = torch.zeros(len(VARLEN_DOCS) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(VARLEN_DOCS).cumsum(0)
        cu = cu.cuda()
        total, heads, kv_heads, d = int(cu[-1]), 4, 2, 128
        q, k, v, do = (rand(total, h, d) for h in (heads, kv_heads, kv_heads, heads))
        kw = dict(causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
        extra = dict(max_seqlen_q=max(VARLEN_DOCS), max_seqlen_k=max(VARLEN_DOCS))
        name = f"{dtype} varlen docs={VARLEN_DOCS} H{heads}/{kv_heads}-D{d}-causal"
    else:
        batch, sq, sk, heads, kv_heads, d, causal, offset = CHECK_CASES[case]
        q, k, v = rand(batch, sq, heads, d), rand(batch, sk, kv_heads, d), rand(batch, sk, kv_heads, d)
        do = rand(batch, sq, heads, d)
        kw, extra = dict(causal=causal, causal_offset=offset if causal else None), {}
        name = f"{dtype} B{batch}-Sq{sq}-Sk{sk}-H{heads}/{kv_heads}-D{d}-{'causal' if causal else 'full'}-off{offset}"
    return _check_one(name, q, k, v, do, kw, extra)


def _check_one(name, q, k, v, do, kw, extra):
    out, lse = attention_forward(q, k, v, **kw, **extra)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention_reference(*leaves, **kw)
    ref_grads = torch.autograd.grad(ref_out, leaves, do.double())
    low = [x.detach().requires_grad_() for x in (q, k, v)]
    low_out, _ = attention_reference(*low, **kw)   # PyTorch in the low precision: the yardstick
    low_grads = torch.autograd.grad(low_out, low, do)
    finite = torch.isfinite(ref_lse)
    rows = []
    # the one pass also where its table has no entry (then the default is the deterministic path): with
    # its first sweep candidate, so that the kernel the sweep times is checked on the GPU
    one_pass_key = (padded_head_dim(q.shape[-1]), kw["causal"])
    forced = ONE_PASS_CONFIGS.get(one_pass_key) is None and ONE_PASS_CANDIDATES.get(one_pass_key[0])
    modes = [("default", False), ("deterministic", True)] + ([("one pass", False)] if forced else [])
    for mode, deterministic in modes:
        if mode == "one pass":
            ONE_PASS_CONFIGS[one_pass_key] = forced[0]
        try:  # one mode failing (a config over the chip's resources) still checks the others
            grads = attention_backward(do, q, k, v, out, lse, **kw, **extra, deterministic=deterministic)
        except Exception as e:
            rows.append({"check": name, "backward": mode, "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(f"  FAIL {name} {mode}: {rows[-1]['error']}", flush=True)
            continue
        finally:
            if mode == "one pass":
                del ONE_PASS_CONFIGS[one_pass_key]
        row = {"check": name, "backward": mode,
               "lse_inf_match": bool(torch.equal(finite, torch.isfinite(lse))),
               "lse_max_abs_err": (lse[finite].double() - ref_lse[finite]).abs().max().item() if finite.any() else 0.0}
        ok = row["lse_inf_match"] and row["lse_max_abs_err"] < 2e-2
        for n, ours_, low_, ref_ in zip(("out", "dq", "dk", "dv"), (out, *grads), (low_out, *low_grads),
                                        (ref_out, *ref_grads)):
            e, e_low = rel_err(ours_, ref_), rel_err(low_, ref_)
            row[f"err_{n}"], row[f"err_{n}_torch_lowp"] = round(e, 6), round(e_low, 6)
            ok &= e <= 2 * e_low + 1e-4 and math.isfinite(e)
        row["ok"] = bool(ok)
        print(f"  {'ok  ' if ok else 'FAIL'} {name} {mode}: " + " ".join(
            f"{n}={row[f'err_{n}']:.2e}/{row[f'err_{n}_torch_lowp']:.2e}" for n in ("out", "dq", "dk", "dv")),
            flush=True)
        rows.append(row)
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


# ----------------------------------------------------------------------------------------------
# sweep of block configurations (offline tuning; the winners go into FWD_CONFIGS and ONE_PASS_CONFIGS)
# ----------------------------------------------------------------------------------------------
# The deterministic path's tables (DKDV/DQ_CONFIGS) came from earlier sweeps on an H100, whose candidate
# lists and timings are in bench/results/attention_h100*.json. A 5th entry "split" runs dK and dV in two
# passes (the dK pass adds dQ).
FWD_CANDIDATES = {
    64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 4), (128, 32, 4, 4)],
    128: [(128, 64, 8, 4), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 4), (128, 32, 4, 4)],
    256: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3)],
}
# The deterministic path's two kernels, swept one at a time (the other at its table entry). On the H200
# (the first attention_h200.json, kernel_resources) the H100's entries spilled in the dK/dV kernel: 28 registers at
# D128 (32, 64, 4, 4), 144 at D64 (64, 64, 4, 3); hence the candidates with 8 warps.
DKDV_CANDIDATES = {
    64: [(64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3),
         (128, 64, 8, 3), (128, 128, 8, 2)],
    128: [(32, 64, 4, 4), (32, 64, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2),
          (16, 64, 4, 4), (32, 128, 4, 3)],
    256: [(64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (64, 32, 8, 2), (16, 64, 4, 2)],
}
DQ_CANDIDATES = {
    64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4),
         (64, 64, 8, 3)],
    128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 8, 3), (128, 32, 4, 4),
          (128, 32, 8, 3), (64, 64, 8, 3)],
    256: [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 8, 3)],
}
# The one pass adds dQ's shares by a TMA reduce of the whole tile. A trial on the H200 (Triton 3.6, 16K
# causal, MHA / 8 KV heads) timed 5 candidates per head dim: 8 warps or 128-row tiles at D64 took 8.9-22
# ms, (64, 64, 8, 3) at D128 26 ms; those left here are the best of it and the split (dK with dQ's reduce,
# then dV: 6 products, half the live accumulators). Their times: attention_h200.json's "sweep".
ONE_PASS_CANDIDATES = {
    64: [(64, 64, 4, 3), (64, 128, 8, 3), (64, 128, 8, 3, "split")],
    128: [(64, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 3, "split"), (32, 128, 8, 3, "split")],
    256: [(32, 64, 4, 2)],
}
SWEEP_SEQLEN, SWEEP_HEADS, SWEEP_KV_HEADS = 16384, 32, (32, 8)  # causal; MHA and GQA each count


def deterministic_candidates(head_dim, grouped):
    """(kind, (dK/dV config, dQ config)) of the deterministic path: each kernel's candidates with the other
    kernel at its table entry."""
    dkdv, dq = bwd_configs(padded_head_dim(head_dim), True, grouped, torch.device("cuda"))
    return ([("bwd dkdv", (c, dq)) for c in DKDV_CANDIDATES[head_dim]]
            + [("bwd dq", (dkdv, c)) for c in DQ_CANDIDATES[head_dim]])


def sweep_warm_tasks(head_dims):
    tasks = []
    for head_dim in head_dims:
        for kv_heads in SWEEP_KV_HEADS:
            shape = (SWEEP_SEQLEN, SWEEP_HEADS, kv_heads, head_dim, True)
            tasks += [("warm", shape, True, None, cfg)
                      for _, cfg in deterministic_candidates(head_dim, kv_heads != SWEEP_HEADS)]
            tasks += [("warm", shape, False, None, cfg) for cfg in ONE_PASS_CANDIDATES[head_dim]]
            tasks += [("warm", shape, True, cfg, None) for cfg in FWD_CANDIDATES[head_dim] if kv_heads == SWEEP_HEADS]
    return tasks


def run_sweep(head_dims, apply=False):
    """Time the forward, the deterministic backward's two kernels and the one-pass backward candidates
    (causal, bf16) on MHA and GQA. Winners: the forward's on MHA; the dK/dV kernel's per MHA and GQA (its
    programs loop over a GQA group); the dQ kernel's and the one pass's by time summed over both. With
    `apply`, the winners replace the tables for this run (both causal flags: the non-causal kernels are the
    same minus the mask), and the one pass gets an entry only where it beats the deterministic winners."""
    results, chosen = [], {}
    for head_dim in head_dims:
        bd = padded_head_dim(head_dim)
        totals = {}  # (kind, kv_heads or None, cfg) -> ms
        for kv_heads in SWEEP_KV_HEADS:
            print(f"== sweep D={head_dim} causal S={SWEEP_SEQLEN} H={SWEEP_HEADS} Hkv={kv_heads}", flush=True)
            gen = torch.Generator(device="cuda").manual_seed(7)
            q, k, v, do = (torch.randn(1, SWEEP_SEQLEN, h, head_dim, device="cuda", dtype=torch.bfloat16,
                                       generator=gen) for h in (SWEEP_HEADS, kv_heads, kv_heads, SWEEP_HEADS))
            args = dict(softmax_scale=head_dim ** -0.5, causal=True, causal_offset=None, cu_seqlens_q=None,
                        cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, causal_offsets=None)
            out, lse = _fwd(q, k, v, out_dtype=None, **args)
            fwd_flops = attention_flops(SWEEP_SEQLEN, SWEEP_HEADS, head_dim, True, "fwd")

            def timed(kind, cfg, fn, per_kv_heads=False):
                # a dQ candidate runs beside the dK/dV table entry, which may differ for MHA and GQA: its
                # time is summed over both under the dQ config alone
                key = (kind, kv_heads if per_kv_heads else None, cfg[1] if kind == "bwd dq" else cfg)
                try:
                    ms = bench_ms(fn, SWEEP_SEQLEN)
                    r = dict(kind=kind, head_dim=head_dim, kv_heads=kv_heads, config=cfg, ms=round(ms, 4),
                             tflops=round(fwd_flops * (1.0 if kind == "fwd" else 2.5) / ms / 1e9, 1))
                    totals[key] = totals.get(key, 0.0) + ms
                except Exception as e:
                    r = dict(kind=kind, head_dim=head_dim, kv_heads=kv_heads, config=cfg,
                             error=f"{type(e).__name__}: {str(e)[:120]}")
                    totals[key] = float("inf")
                print("  ", r, flush=True)
                results.append(r)

            def backward(deterministic, cfg):
                return lambda: _bwd(do, q, k, v, out, lse, delta=None, grad_dtype=None, deterministic=deterministic,
                                    configs=cfg, **args)

            if kv_heads == SWEEP_HEADS:
                for cfg in FWD_CANDIDATES[head_dim]:
                    timed("fwd", cfg, lambda: _fwd(q, k, v, out_dtype=None, config=cfg, **args))
            for kind, cfg in deterministic_candidates(head_dim, kv_heads != SWEEP_HEADS):
                timed(kind, cfg, backward(True, cfg), per_kv_heads=kind == "bwd dkdv")
            for cfg in ONE_PASS_CANDIDATES[head_dim]:
                timed("bwd one pass", cfg, backward(False, cfg))
            torch.cuda.empty_cache()

        def best(kind, kv_heads=None):
            cands = {cfg: ms for (k_, h_, cfg), ms in totals.items() if k_ == kind and h_ == kv_heads}
            cfg = min(cands, key=cands.get) if cands else None
            return cfg, cands.get(cfg, float("inf"))
        (fwd_winner, fwd_ms), (one_pass, one_pass_ms) = best("fwd"), best("bwd one pass")
        # the (dK/dV, dQ) pairs timed: the dK/dV kernel's winner per MHA and GQA, the dQ kernel's over both;
        # a kernel whose candidates all failed keeps its table entry
        dkdv_win = {h: (best("bwd dkdv", h)[0] or [DKDV_CONFIGS[(bd, True)]])[0] for h in SWEEP_KV_HEADS}
        dq_win = best("bwd dq")[0] or DQ_CONFIGS[(bd, True)]
        # the deterministic path's time with both winners, estimated from the separate sweeps (the dQ
        # sweep ran with the dK/dV table entries): the dQ sweep's best, less what each dK/dV winner saves
        det_ms = best("bwd dq")[1]
        for h in SWEEP_KV_HEADS:
            table_pair = bwd_configs(bd, True, h != SWEEP_HEADS, torch.device("cuda"))
            det_ms -= max(0.0, totals.get(("bwd dkdv", h, table_pair), 0.0) - best("bwd dkdv", h)[1])
        one_pass_wins = one_pass_ms < det_ms
        chosen[head_dim] = dict(fwd=fwd_winner, fwd_ms=fwd_ms, dkdv_mha=dkdv_win[SWEEP_HEADS],
                                dkdv_gqa=dkdv_win[min(SWEEP_KV_HEADS)],
                                dq=dq_win, deterministic_ms_summed_estimate=det_ms, one_pass=one_pass,
                                one_pass_ms_summed=one_pass_ms, one_pass_is_default=one_pass_wins)
        print(f"  BEST D={head_dim}: {chosen[head_dim]}", flush=True)
        if apply:
            for flag in (True, False):
                if fwd_ms < float("inf"):
                    FWD_CONFIGS[(bd, flag)] = fwd_winner
                DKDV_CONFIGS[(bd, flag)] = dkdv_win[SWEEP_HEADS]
                DKDV_GQA_CONFIGS[(bd, flag)] = dkdv_win[min(SWEEP_KV_HEADS)]
                DQ_CONFIGS[(bd, flag)] = dq_win
            # the sweep times causal shapes only; without the mask every program's dQ atomics start
            # together, so a one-pass winner here says nothing of the non-causal kernel
            if one_pass_wins:
                ONE_PASS_CONFIGS[(bd, True)] = one_pass
            else:
                ONE_PASS_CONFIGS.pop((bd, True), None)
    return results, chosen


# ----------------------------------------------------------------------------------------------
# profile: time per kernel, and each compiled kernel's registers, spills and shared memory
# ----------------------------------------------------------------------------------------------
def kernel_times(shape, deterministic, repeats=3):
    """Mean GPU time per fwd+bwd of each kernel in ours at `shape` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    seqlen, heads, kv_heads, head_dim, causal = shape
    q, k, v, do = (torch.randn(1, seqlen, h, head_dim, device="cuda", dtype=torch.bfloat16)
                   for h in (heads, kv_heads, kv_heads, heads))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def step():
        out = flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)
        torch.autograd.grad(out, (q, k, v), do)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if total and evt.count:
            times[evt.key[:80]] = round(total / 1e3 / repeats, 4)
    return dict(zip(("seqlen", "heads", "kv_heads", "head_dim", "causal"), shape),
                backward="deterministic" if deterministic else "default", kernel_ms=times)


def kernel_resources():
    """Registers, spills and shared memory of every attention kernel variant this process compiled, and
    the programs per SM they allow (65536 registers, 227 KiB of shared memory per SM on Hopper)."""
    rows = []
    for module in (attention_forward_module, attention_backward_module):
        for name, fn in vars(module).items():
            if not hasattr(fn, "device_caches"):
                continue
            for caches in fn.device_caches.values():
                for compiled in caches[0].values():
                    try:
                        meta = compiled.metadata
                        constants = {}
                        for key, value in getattr(compiled.src, "constants", {}).items():
                            index = key[0] if isinstance(key, tuple) else key
                            arg = fn.arg_names[index] if isinstance(index, int) else str(index)
                            if arg.isupper() or arg.startswith("BLOCK"):
                                constants[arg] = value
                        threads = 32 * meta.num_warps
                        by_regs = 65536 // max(1, compiled.n_regs * threads)
                        by_smem = (227 * 1024) // max(1, meta.shared)
                        rows.append(dict(kernel=name, num_warps=meta.num_warps, num_stages=meta.num_stages,
                                         n_regs=compiled.n_regs, n_spills=compiled.n_spills, shared=meta.shared,
                                         programs_per_sm=min(by_regs, by_smem), **constants))
                    except Exception as e:
                        rows.append(dict(kernel=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


TABLES = (FWD_CONFIGS, ONE_PASS_CONFIGS, DKDV_CONFIGS, DKDV_GQA_CONFIGS, DQ_CONFIGS)


def _set_tables(tables):
    """Pool initializer: the parent's configuration tables (after a sweep's --apply) in each worker."""
    for table, entries in zip(TABLES, tables):
        table.clear()
        table.update(entries)


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
    result["checks"] = checks
    result["compile_errors"] = result.get("compile_errors", []) + [r for r in rows if "task" in r]
    for r in result["compile_errors"]:
        print("  compile error:", r, flush=True)
    save()
    print(f"checks: {len(checks) - len(failures)}/{len(checks)} ok ({time.time() - t0:.0f} s)", flush=True)
    if not args.no_bench:
        for shape in shapes:
            result["rows"] += run_benchmark([shape], with_flex, args.deterministic)
            if args.profile:  # after each shape: a run cut short keeps what it compiled
                result["kernel_resources"] = kernel_resources()
            save()
        try:
            result["rows"] += run_packed(packed, args.deterministic)
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


def print_table(rows):
    impls = ["longctx", "longctx_deterministic", "sdpa_flash", "sdpa_cudnn", "flex"]
    print(f"\n{'S':>6} {'H/Hkv':>6} {'D':>4} {'causal':>6} {'layout':>6} {'mode':>8} "
          + " ".join(f"{i[:11]:>11}" for i in impls) + "   (TFLOP/s)")
    key = lambda r: (r["seqlen"], r["heads"], r["kv_heads"], r["head_dim"], r["causal"], r.get("layout", "-"))  # noqa: E731
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
