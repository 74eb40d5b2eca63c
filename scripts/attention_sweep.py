"""The Triton attention kernels' tuning: the sweep of block configurations (offline; the winners go
into FWD_CONFIGS, ONE_PASS_CONFIGS and the deterministic path's tables of `longctx/ops/attention`),
and the profile (time per kernel, each compiled kernel's registers, spills and shared memory).

Run through `scripts/bench_attention.py --sweep [--apply]` / `--profile`; a module of it, with
`attention_checks.py` (correctness) and the benchmark itself in bench_attention.py.
"""
from __future__ import annotations

import torch

from longctx.ops.attention import backward as attention_backward_module
from longctx.ops.attention import flash_attn_func
from longctx.ops.attention import forward as attention_forward_module
from longctx.ops.attention.backward import (DKDV_CONFIGS, DKDV_GQA_CONFIGS, DQ_CONFIGS, ONE_PASS_CONFIGS, _bwd,
                                            bwd_configs)
from longctx.ops.attention.forward import FWD_CONFIGS, _fwd, padded_head_dim
from benchlib import attention_flops, median_ms

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
                    ms = median_ms(fn, SWEEP_SEQLEN)
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
