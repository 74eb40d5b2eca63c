#!/usr/bin/env python
"""Benchmark ring attention on N GPUs against our kernel on one GPU and PyTorch's context parallelism.

Causal, bf16, batch 1, 8 heads (8 kv heads), head dim 128, forward + backward, at 128K, 512K and 1M
tokens. Three parts, run in one command (the one-GPU part is a plain process, the others torchrun):

    python scripts/bench_ring.py --part single --out DIR             # longctx kernel and SDPA flash, 1 GPU
    torchrun --nproc_per_node 2 scripts/bench_ring.py --part multi --out DIR
        # longctx ring (+ compute-only and communication-only timings), torch_cp allgather/alltoall
    python scripts/bench_ring.py --part report --out DIR --json bench/results/ring_h200.json
    python scripts/bench_ring.py --part loopback --out DIR --gpus 2     # no N GPUs at hand: the
        # ring's computation per rank on one GPU (communication left out), a projection only
    python scripts/bench_ring.py --part ulysses --out DIR --ulysses 2,4,8 --usp 2x2
        # the same projection for U-way Ulysses and U x R USP, and the bytes each of ring, Ulysses
        # and USP sends per layer for the 1B and 8B shapes

The multi part first checks the ring's output and gradients against the one-GPU kernel at 32K.
Rows: ms (median; the slowest rank's), tflops (per GPU), tok_s, peak_gib (max over GPUs),
scaling_eff = one-GPU time / (N x N-GPU time) against the same implementation family (our kernel for
the ring, SDPA flash for torch_cp), speedup_vs_torch_cp (ours over the faster torch_cp method).
Hidden communication: compute_ms (the same ring with a loopback instead of the network),
comm_ms (the ring's exchanges alone), exposed_comm_ms = ms - compute_ms,
hidden_frac = 1 - exposed_comm_ms / comm_ms. Imports nothing beyond torch, triton and longctx.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from longctx.ops.attention import flash_attn_func  # noqa: E402
from longctx.parallel import ring as ring_module  # noqa: E402
from longctx.parallel.ring import LoopbackComm, init_ring, ring_attn_func, ring_backward, ring_forward, ring_plan  # noqa: E402
from longctx.parallel.sequence import split_sequence  # noqa: E402
from longctx.parallel.ulysses import LoopbackGroup, check_heads, heads_to_sequence, sequence_to_heads  # noqa: E402
from longctx.parallel.ulysses import ulysses_attn_func  # noqa: E402
from longctx.parallel.usp import usp_bytes_per_layer  # noqa: E402
from benchlib import result_head  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 8, 128
K = 1024
# --cpu-smoke: the whole script on CPU (gloo, fp32, the interpreted kernel, lengths in tokens), to
# catch mistakes before spending GPU time; its figures mean nothing.
DEVICE, DTYPE, SMOKE = "cuda", torch.bfloat16, False


def flops(seqlen):
    return 3.5 * 2 * seqlen * seqlen * HEADS * HEAD_DIM  # causal: forward 2 S^2 H D, backward 2.5x


def reps_for(seqlen):
    """(timed runs, warm-up runs): the kernels are compiled at the first (shortest) length, so the
    longest runs skip the warm-up, which would only cost device time."""
    return (5, 1) if seqlen <= 128 * K else ((2, 1) if seqlen <= 512 * K else (1, 0))


def timed(fn, reps, barrier=None):
    """Median milliseconds of `fn` over reps = (timed runs, warm-up runs), with CUDA events."""
    reps, warmups = reps
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(reps):
        if barrier:
            barrier()
        if SMOKE:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def randn(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE)


def peak_gib():
    return 0.0 if SMOKE else torch.cuda.max_memory_allocated() / 2**30


def reset_peak():
    if not SMOKE:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def row(impl, seqlen, gpus, ms, peak, bench="ring_attention", **extra):
    return dict(bench=bench, impl=impl, seqlen=seqlen, heads=HEADS, kv_heads=KV_HEADS,
                head_dim=HEAD_DIM, causal=True, mode="fwd_bwd", dtype="bf16", gpus=gpus, ms=round(ms, 3),
                reps=reps_for(seqlen)[0],
                tflops=round(flops(seqlen) / gpus / (ms * 1e-3) / 1e12, 1), tok_s=round(seqlen / (ms * 1e-3)),
                peak_gib=round(peak, 2), **extra)


# ------------------------------------------------------------------------------------------------
# one GPU: our kernel, PyTorch SDPA flash
# ------------------------------------------------------------------------------------------------
def save(rows, args, name):
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(rows, f)


def part_single(args):
    rows = []
    for seqlen in args.seqlens:
        for impl in ("longctx", "sdpa_flash"):
            if impl == "sdpa_flash" and seqlen > args.sdpa_max:
                continue
            if impl == "longctx":
                q, k, v, dout = randn(1, seqlen, HEADS, HEAD_DIM), randn(1, seqlen, KV_HEADS, HEAD_DIM), \
                    randn(1, seqlen, KV_HEADS, HEAD_DIM), randn(1, seqlen, HEADS, HEAD_DIM)
                attend = lambda q, k, v: flash_attn_func(q, k, v, causal=True)  # noqa: E731
            else:
                q, k, v, dout = (randn(1, HEADS, seqlen, HEAD_DIM) for _ in range(4))
                def attend(q, k, v):
                    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            for t in (q, k, v):
                t.requires_grad_()

            def step():
                torch.autograd.backward(attend(q, k, v), dout)
                q.grad = k.grad = v.grad = None
            reset_peak()
            ms = timed(step, reps_for(seqlen))
            rows.append(row(impl, seqlen, 1, ms, peak_gib()))
            save(rows, args, "single.json")
            print(f"[single] {impl:10s} {seqlen // K:5d}K {ms:10.1f} ms peak {rows[-1]['peak_gib']:.1f} GiB", flush=True)
            del q, k, v, dout
    return rows


def part_loopback(args):
    """One GPU standing in for each rank of an N-GPU ring in turn: the ring's computation alone
    (a loopback in place of the network). Its slowest rank is the ring's time if communication is
    wholly hidden; a projection, for when no N-GPU machine can be had, not a measurement of the ring."""
    rows = []
    world, scale = args.gpus, HEAD_DIM ** -0.5
    # check first: the Triton path of every rank's ring (views, fp32 partial outputs, merges, the
    # backward's recomputation) against the same ring over the PyTorch block functions
    check_len = 256 if SMOKE else 8 * K
    q, k, v, dout = (randn(1, check_len // world, h, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    errors = {}
    for rank in range(world):
        plan, loopback = ring_plan(rank, world, check_len // world, True), LoopbackComm(world, rank)
        results = {}
        for impl in ("torch", "triton"):   # the blocks on each backend of the seam
            out, lse = ring_forward(loopback, plan, q, k, v, scale, backend=impl)
            results[impl] = [out, *ring_backward(loopback, plan, dout, q, k, v, out, lse, scale, backend=impl)]
        for name, got, expected in zip(("out", "dq", "dk", "dv"), results["triton"], results["torch"]):
            err = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
            errors[f"rank{rank}_{name}"] = err
    print(f"[loopback] check at {check_len} tokens, Triton vs PyTorch blocks, relative errors: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    rows.append(dict(bench="ring_check_loopback", impl="longctx", seqlen=check_len, gpus=world, **errors))
    for seqlen in args.seqlens:
        local_len = seqlen // world
        q, k, v, dout = (randn(1, local_len, h, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
        per_rank = []
        for rank in range(world):
            plan, loopback = ring_plan(rank, world, local_len, True), LoopbackComm(world, rank)

            def compute_step():
                out, lse = ring_forward(loopback, plan, q, k, v, scale)
                ring_backward(loopback, plan, dout, q, k, v, out, lse, scale)
            reset_peak()
            per_rank.append(timed(compute_step, reps_for(seqlen)))
        rows.append(row("longctx", seqlen, world, max(per_rank), peak_gib(), bench="ring_compute_only",
                        rank_ms=[round(t, 3) for t in per_rank]))
        save(rows, args, "loopback.json")
        print(f"[loopback] {seqlen // K:5d}K ranks of {world}: {', '.join(f'{t:.1f}' for t in per_rank)} ms", flush=True)
        del q, k, v, dout
        ring_module.free_ring_buffers()


# ------------------------------------------------------------------------------------------------
# one GPU as a rank of Ulysses and of USP; bytes per layer of each method
# ------------------------------------------------------------------------------------------------
def usp_step(q, k, v, dout, group, ring_rank, ring_size, scale):
    """One rank of USP, forward and backward, as `usp_attn_func` runs it, with both exchanges
    looped back: the Ulysses all-to-alls (autograd) around the ring's forward and backward."""
    q_heads, k_heads, v_heads = sequence_to_heads(q, k, v, group)
    plan, loopback = ring_plan(ring_rank, ring_size, q_heads.shape[1], True), LoopbackComm(ring_size, ring_rank)
    with torch.no_grad():
        out_heads, lse = ring_forward(loopback, plan, q_heads, k_heads, v_heads, scale)
    out_heads.requires_grad_()
    dout_heads, = torch.autograd.grad(heads_to_sequence(out_heads, group), out_heads, dout)
    grads = ring_backward(loopback, plan, dout_heads, q_heads.detach(), k_heads.detach(), v_heads.detach(),
                          out_heads.detach(), lse, scale)
    torch.autograd.backward((q_heads, k_heads, v_heads), grads)


def part_ulysses(args):
    """One GPU as one rank of U-way Ulysses (every rank does the same work: the kernel over the
    whole sequence for H/U heads) and as each rank of a U x R USP group in turn (the ring's ranks
    differ; the slowest counts), each with its all-to-alls' local copies and a loopback in place of
    the network. A projection, like --part loopback, not a measurement on U GPUs."""
    rows, scale = [], HEAD_DIM ** -0.5
    for seqlen in args.seqlens:
        for ulysses in args.ulysses:
            q, k, v = (randn(1, seqlen // ulysses, h, HEAD_DIM).requires_grad_() for h in (HEADS, KV_HEADS, KV_HEADS))
            dout = randn(1, seqlen // ulysses, HEADS, HEAD_DIM)

            def ulysses_step():
                torch.autograd.backward(ulysses_attn_func(q, k, v, LoopbackGroup(ulysses), causal=True), dout)
                q.grad = k.grad = v.grad = None
            reset_peak()
            ms = timed(ulysses_step, reps_for(seqlen))
            rows.append(row("longctx", seqlen, ulysses, ms, peak_gib(), bench="ulysses_compute_only", ulysses=ulysses))
            save(rows, args, "ulysses.json")
            print(f"[ulysses] {seqlen // K:5d}K one rank of {ulysses}: {ms:.1f} ms", flush=True)
            del q, k, v, dout
        for ulysses, ring in args.usp:
            shape = lambda h: (1, seqlen // (ulysses * ring), h, HEAD_DIM)  # noqa: E731
            q, k, v = (randn(*shape(h)).requires_grad_() for h in (HEADS, KV_HEADS, KV_HEADS))
            dout = randn(*shape(HEADS))
            per_rank = []
            for ring_rank in range(ring):
                def step():
                    usp_step(q, k, v, dout, LoopbackGroup(ulysses), ring_rank, ring, scale)
                    q.grad = k.grad = v.grad = None
                reset_peak()
                per_rank.append(timed(step, reps_for(seqlen)))
            rows.append(row("longctx", seqlen, ulysses * ring, max(per_rank), peak_gib(), bench="usp_compute_only",
                            ulysses=ulysses, ring=ring, rank_ms=[round(t, 3) for t in per_rank]))
            save(rows, args, "ulysses.json")
            print(f"[ulysses] {seqlen // K:5d}K USP {ulysses}x{ring}, ring ranks: "
                  f"{', '.join(f'{t:.1f}' for t in per_rank)} ms", flush=True)
            del q, k, v, dout
            ring_module.free_ring_buffers()
    rows += bytes_rows(args.seqlens)
    save(rows, args, "ulysses.json")


# (name, heads, kv_heads, head_dim) of the attention of the model configs of the same names
MODEL_SHAPES = (("llama3.2-1b", 32, 8, 64), ("llama3-8b", 32, 8, 128))


def bytes_rows(seqlens, gpu_counts=(2, 4, 8), element_bytes=2):
    """Bytes one rank sends per softmax layer, forward and backward, bf16, by method and link:
    every U x R layout whose heads fit (U = 1: ring attention; R = 1: Ulysses; else USP)."""
    rows = []
    for model, heads, kv_heads, head_dim in MODEL_SHAPES:
        for seqlen, gpus in itertools.product(seqlens, gpu_counts):
            for ulysses in (u for u in range(1, gpus + 1) if gpus % u == 0 and heads_fit(heads, kv_heads, u)):
                ring = gpus // ulysses
                parts = usp_bytes_per_layer(seqlen, heads, kv_heads, head_dim, ulysses, ring, element_bytes)
                rows.append(dict(bench="bytes_per_layer", impl="longctx", model=model, seqlen=seqlen, heads=heads,
                                 kv_heads=kv_heads, head_dim=head_dim, causal=True, mode="fwd_bwd", gpus=gpus,
                                 method="ring" if ulysses == 1 else "ulysses" if ring == 1 else "usp",
                                 ulysses=ulysses, ring=ring, bytes=sum(parts.values()),
                                 **{f"bytes_{link}": b for link, b in parts.items()}))
    print(f"{'model':12s} {'seqlen':>7s} {'gpus':>4s} {'method':8s} {'U x R':>6s} {'MiB/layer/rank':>14s} "
          f"{'all-to-all':>10s} {'ring':>8s}")
    for r in rows:
        print(f"{r['model']:12s} {r['seqlen'] // K:6d}K {r['gpus']:4d} {r['method']:8s} {r['ulysses']:>2d} x "
              f"{r['ring']:<2d} {r['bytes'] / 2**20:14.1f} {r['bytes_ulysses'] / 2**20:10.1f} {r['bytes_ring'] / 2**20:8.1f}")
    return rows


def heads_fit(heads, kv_heads, ulysses):
    try:
        check_heads(heads, kv_heads, ulysses)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# N GPUs: our ring, PyTorch context parallelism
# ------------------------------------------------------------------------------------------------
def check_ring(group, seqlen):
    """Ring output and gradients against the one-GPU kernel on the whole sequence (bf16)."""
    torch.manual_seed(1234)  # the same whole sequence on every rank
    q, k, v, dout = (randn(1, seqlen, HEADS, HEAD_DIM) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    out = flash_attn_func(q, k, v, causal=True)
    expected = [out, *torch.autograd.grad(out, (q, k, v), dout)]
    local = [split_sequence(t.detach(), group).requires_grad_() for t in (q, k, v)]
    out_local = ring_attn_func(*local, group, causal=True)
    got = [out_local, *torch.autograd.grad(out_local, local, split_sequence(dout, group))]
    errors = {}
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        e = split_sequence(e, group).double()
        errors[name] = ((g.double() - e).norm() / e.norm()).item()
    return errors


def ring_comm_only(ring, seqlen_local):
    """The exchanges of one ring forward + backward, with no computation."""
    shape = (2, 2, 1, seqlen_local, KV_HEADS, HEAD_DIM)
    kv = torch.empty(shape, device=DEVICE, dtype=DTYPE)
    dkv = torch.empty(shape, device=DEVICE, dtype=torch.float32)
    n = ring.world_size

    def run():
        for buffer, exchanges in ((kv, n - 1), (kv, n - 1), (dkv, n)):  # fwd kv, bwd kv, bwd dkv
            for step in range(exchanges):
                for work in ring.exchange(buffer[step % 2], buffer[1 - step % 2]):
                    work.wait()
    return run


def part_multi(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    ring = init_ring(group, torch.device(DEVICE, torch.cuda.current_device()) if not SMOKE else "cpu")
    rows = []
    check_len = 64 if SMOKE else 32 * K
    errors = check_ring(group, check_len)
    if rank == 0:
        print(f"[check] ring vs one-GPU kernel at {check_len} tokens, relative errors: {errors}", flush=True)
    rows.append(dict(bench="ring_check", impl="longctx", seqlen=check_len, gpus=world, **{f"err_{k}": v for k, v in errors.items()}))
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(DEVICE, (world,), mesh_dim_names=("cp",))
    barrier = lambda: dist.barrier(group)  # noqa: E731

    def slowest(ms):
        t = torch.tensor([ms], device=DEVICE)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def peak_all():
        t = torch.tensor([peak_gib()], device=DEVICE)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    for seqlen in args.seqlens:
        local_len = seqlen // world
        reps = reps_for(seqlen)
        # --- our ring
        ring_module.free_ring_buffers()
        q, k, v, dout = (randn(1, local_len, h, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
        for t in (q, k, v):
            t.requires_grad_()

        def ring_step():
            torch.autograd.backward(ring_attn_func(q, k, v, group, causal=True), dout)
            q.grad = k.grad = v.grad = None
        reset_peak()
        ms = slowest(timed(ring_step, reps, barrier))
        peak = peak_all()
        # the same computation with a loopback ring (no network), and the network alone
        plan = ring_plan(rank, world, local_len, True)
        loopback = LoopbackComm(world, rank)
        scale = HEAD_DIM ** -0.5

        def compute_step():
            with torch.no_grad():
                out, lse = ring_forward(loopback, plan, q, k, v, scale)
                ring_backward(loopback, plan, dout, q, k, v, out, lse, scale)
        compute_ms = slowest(timed(compute_step, reps, barrier))
        comm_ms = slowest(timed(ring_comm_only(ring, local_len), (3, 1), barrier))
        exposed = max(ms - compute_ms, 0.0)
        rows.append(row("longctx", seqlen, world, ms, peak, compute_ms=round(compute_ms, 3),
                        comm_ms=round(comm_ms, 3), exposed_comm_ms=round(exposed, 3),
                        hidden_frac=round(max(0.0, 1 - exposed / comm_ms), 3) if comm_ms > 0 else None))
        if rank == 0:
            print(f"[multi] longctx ring {seqlen // K:5d}K {ms:10.1f} ms (compute {compute_ms:.1f}, "
                  f"comm alone {comm_ms:.1f}, exposed {exposed:.1f}) peak {peak:.1f} GiB", flush=True)
        del q, k, v, dout
        ring_module.free_ring_buffers()
        if rank == 0:
            save(rows, args, "multi.json")
        # --- PyTorch context parallelism
        for method in args.cp_methods:
            try:
                rows.append(torch_cp(mesh, method, seqlen, world, reps, barrier, slowest, peak_all))
            except Exception as error:  # keep our rows; both ranks fail alike here
                print(f"[multi] rank {rank} torch_cp {method} failed: {error!r}", flush=True)
                continue
            if rank == 0:
                save(rows, args, "multi.json")
                print(f"[multi] torch_cp {method:9s} {seqlen // K:5d}K {rows[-1]['ms']:10.1f} ms "
                      f"peak {rows[-1]['peak_gib']:.1f} GiB", flush=True)
    return rows


def torch_cp(mesh, method, seqlen, world, reps, barrier, slowest, peak_all):
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel
    set_rotate_method(method)
    # The attention inputs are made directly as this rank's shares (random data: the order of
    # the load-balanced layout does not change the work); a small sequence buffer tells
    # context_parallel the length, so no full-length copies sit in memory.
    positions = torch.arange(seqlen, device=DEVICE).view(1, seqlen)
    q, k, v, dout = (randn(1, HEADS, seqlen // world, HEAD_DIM) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    with context_parallel(mesh, buffers=[positions], buffer_seq_dims=[1], no_restore_buffers={positions}):
        def step():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.backward(out, dout)
            q.grad = k.grad = v.grad = None
        reset_peak()
        ms = slowest(timed(step, reps, barrier))
    return row("torch_cp", seqlen, world, ms, peak_all(), rotate_method=method)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def part_report(args):
    rows = []
    for name in ("single.json", "multi.json", "loopback.json", "ulysses.json"):
        path = os.path.join(args.out, name)
        if os.path.exists(path):
            with open(path) as f:
                rows += json.load(f)
        else:
            print(f"[report] {path} missing: that part did not finish")
    one_gpu = {(r["impl"], r["seqlen"]): r["ms"] for r in rows if r.get("gpus") == 1}
    best_cp = {}
    for r in rows:
        if r["impl"] == "torch_cp":
            best_cp[r["seqlen"]] = min(best_cp.get(r["seqlen"], float("inf")), r["ms"])
    for r in rows:
        if r.get("bench", "").endswith("_compute_only") and ("longctx", r["seqlen"]) in one_gpu:
            r["projected_scaling_eff"] = round(one_gpu[("longctx", r["seqlen"])] / (r["gpus"] * r["ms"]), 3)
        if r.get("bench") != "ring_attention" or r["gpus"] == 1:
            continue
        family = "longctx" if r["impl"] == "longctx" else "sdpa_flash"
        if (family, r["seqlen"]) in one_gpu:
            r["scaling_eff"] = round(one_gpu[(family, r["seqlen"])] / (r["gpus"] * r["ms"]), 3)
        if r["impl"] == "longctx" and r["seqlen"] in best_cp:
            r["speedup_vs_torch_cp"] = round(best_cp[r["seqlen"]] / r["ms"], 3)
    header = f"{'impl':10s} {'method':9s} {'seqlen':>7s} {'gpus':>4s} {'ms':>10s} {'TFLOP/s':>8s} {'peak GiB':>8s} " \
             f"{'eff':>6s} {'vs cp':>6s} {'hidden':>6s}"
    print(header)
    for r in rows:
        if r.get("bench", "").endswith("_compute_only"):
            what = f"({r['bench'][:-len('_compute_only')]} compute only, one GPU as each rank in turn)"
            print(f"{what:54s} {r['seqlen'] // K:6d}K {r['gpus']:4d} "
                  f"{r['ms']:10.1f} {r['tflops']:8.1f} {r['peak_gib']:8.1f} projected eff {r.get('projected_scaling_eff')}")
            continue
        if r.get("bench") == "bytes_per_layer":  # printed as a table by --part ulysses
            continue
        if r.get("bench") != "ring_attention":
            print({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in r.items()})
            continue
        print(f"{r['impl']:10s} {r.get('rotate_method', ''):9s} {r['seqlen'] // K:6d}K {r['gpus']:4d} {r['ms']:10.1f} "
              f"{r['tflops']:8.1f} {r['peak_gib']:8.1f} {r.get('scaling_eff', ''):>6} "
              f"{r.get('speedup_vs_torch_cp', ''):>6} {r.get('hidden_frac', '') if r.get('hidden_frac') is not None else '':>6}")
    result = {**result_head(torch.cuda.get_device_name() if torch.cuda.is_available() else "unknown", args.command),
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"[report] wrote {args.json}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("single", "multi", "loopback", "ulysses", "report"), required=True)
    parser.add_argument("--gpus", type=int, default=2, help="ring size that --part loopback stands in for")
    parser.add_argument("--out", required=True, help="folder for the parts' rows")
    parser.add_argument("--seqlens", type=lambda s: [int(x) * K for x in s.split(",")], default=[128 * K, 512 * K, 1024 * K],
                        help="in K tokens, comma separated (default 128,512,1024)")
    parser.add_argument("--sdpa-max", type=lambda s: int(s) * K, default=512 * K,
                        help="longest sequence (K tokens) for one-GPU SDPA flash (default 512)")
    parser.add_argument("--ulysses", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8],
                        help="Ulysses sizes that --part ulysses stands in for (default 2,4,8)")
    parser.add_argument("--usp", type=lambda s: [tuple(int(n) for n in x.split("x")) for x in s.split(",")],
                        default=[(2, 2)], help="USP layouts, ULYSSESxRING, comma separated (default 2x2)")
    parser.add_argument("--cp-methods", default="allgather,alltoall", type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--json", default="bench/results/ring_h200.json")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--command", default=" ".join(sys.argv))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.cpu_smoke:
        global DEVICE, DTYPE, SMOKE
        DEVICE, DTYPE, SMOKE = "cpu", torch.float32, True
        args.seqlens = [64, 128]
    if args.part == "report":
        return part_report(args)
    if args.part in ("single", "loopback", "ulysses"):
        if not SMOKE:
            torch.cuda.set_device(0)
        {"single": part_single, "loopback": part_loopback, "ulysses": part_ulysses}[args.part](args)
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if SMOKE:
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    try:
        part_multi(args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"[{sys.argv[sys.argv.index('--part') + 1] if '--part' in sys.argv else ''}] {time.time() - t0:.0f} s", flush=True)
