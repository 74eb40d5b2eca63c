"""Correctness of the Triton attention kernels on the GPU, before any timing: bf16 (which the CPU
interpreter cannot run) and fp16 against float64, each backward mode, with PyTorch in the same low
precision as the yardstick. The other backends of the seam are checked by
`check_backends_gpu.py` (against the torch backend); bench_attention.py runs both first.
"""
from __future__ import annotations

import math

import torch

from longctx.ops.attention import attention_backward, attention_forward
from longctx.ops.attention.backward import ONE_PASS_CONFIGS
from longctx.ops.attention.forward import padded_head_dim
from longctx.ops.attention.naive import attention_reference
from attention_sweep import ONE_PASS_CANDIDATES
from benchlib import rel_err

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
