#!/usr/bin/env python
"""Check every available attention backend (longctx/ops/attention/backends.py) on the GPU: forward,
log-sum-exp and backward against the `torch` backend computed in fp32 from the same bf16 inputs.

    python scripts/check_backends_gpu.py --out bench/results/backend_checks_h200.json

Cases: dense causal at head dims 64 and 128, grouped-query attention, a non-causal block with fewer
queries than keys (what ring attention's off-diagonal blocks are), and packed documents (cu_seqlens)
with lengths 1 and odd, with and without GQA. A backend that says it does not support a case is
listed as such, not failed.

cuDNN's packed (varlen) backward in torch releases before pytorch#186142 (June 2026) sized its dQ
buffer by the head dim: an illegal memory access, which poisons the CUDA context, as soon as a
document is longer than the head dim. So the cuDNN packed cases run in a child process with
LONGCTX_CUDNN_VARLEN=1 (forcing the path on); a crash there only marks them failed. The summary says
whether LONGCTX_CUDNN_VARLEN=1 may be set for training on this torch.

Exit status 1 if any supported case fails. About a minute on one H100/H200 (Triton compiles a few
kernels). Imports torch and longctx.ops only (plus triton for the result head).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from longctx.ops.attention import backends as seam  # noqa: E402

# name, (batch, q_len, k_len, heads, kv_heads, head_dim, causal, doc_lengths or None)
CASES = [
    ("dense causal d64", (2, 1024, 1024, 8, 8, 64, True, None)),
    ("dense causal d128", (1, 2048, 2048, 8, 8, 128, True, None)),
    ("gqa 4:1 causal d64", (1, 2048, 2048, 16, 4, 64, True, None)),
    ("gqa 4:1 causal d128", (1, 1024, 1024, 8, 2, 128, True, None)),
    ("block 512x1024 full d128", (1, 512, 1024, 8, 8, 128, False, None)),
    ("packed causal d128", (1, None, None, 8, 8, 128, True, [1, 383, 1, 1000, 517, 129, 2, 15])),
    ("packed causal d64", (1, None, None, 8, 8, 64, True, [700, 1, 301, 1047])),
    ("packed gqa 4:1 causal d64", (1, None, None, 16, 4, 64, True, [1, 513, 2, 999, 533])),
]
# relative L2 error bounds to the fp32 reference for bf16 inputs (bf16 eps = 7.8e-3); the bugs this
# looks for give errors of order 1, NaN or a crash
TOL = {"out": 1e-2, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2}
LSE_TOL = 2e-2   # largest absolute error of the log-sum-exp (natural log) on rows that see a key


def _inputs(spec, device, seed):
    batch, q_len, k_len, heads, kv_heads, head_dim, causal, docs = spec
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if docs is not None:
        total = sum(docs)
        shapes = [(total, heads, head_dim), (total, kv_heads, head_dim), (total, kv_heads, head_dim),
                  (total, heads, head_dim)]
        cu = torch.tensor([0] + list(torch.tensor(docs).cumsum(0)), dtype=torch.int32, device=device)
        extra = dict(cu_seqlens=cu, max_seqlen=max(docs))
    else:
        shapes = [(batch, q_len, heads, head_dim), (batch, k_len, kv_heads, head_dim),
                  (batch, k_len, kv_heads, head_dim), (batch, q_len, heads, head_dim)]
        extra = dict(cu_seqlens=None, max_seqlen=None)
    q, k, v, dout = (torch.randn(s, generator=gen).to(device=device, dtype=torch.bfloat16) for s in shapes)
    return q, k, v, dout, dict(causal=causal, softmax_scale=head_dim ** -0.5, **extra)


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def check_case(backend: seam.Backend, name: str, spec, device) -> dict:
    batch, q_len, k_len, heads, kv_heads, head_dim, causal, docs = spec
    row = dict(backend=backend.name, case=name, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
               causal=causal, docs=docs, q_len=q_len, k_len=k_len)
    ok, reason = backend.usable(device, torch.bfloat16, head_dim, causal, heads != kv_heads, docs is not None)
    if not ok:
        return dict(row, status="unsupported", reason=reason)
    q, k, v, dout, kwargs = _inputs(spec, device, seed=len(name))
    reference = seam.backends()["torch"]
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), **kwargs)
    ref_grads = reference.backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, **kwargs)
    try:
        out, lse = backend.forward(q, k, v, **kwargs)
        grads = backend.backward(dout, q, k, v, out, lse, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - a failing backend is a row, not a stop
        return dict(row, status="FAIL", reason=f"{type(error).__name__}: {str(error)[:300]}")
    errors = {"out": _rel(out, ref_out)}
    errors.update({n: _rel(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    problems = [f"{n} {e:.2e} > {TOL[n]:.0e}" for n, e in errors.items() if not e <= TOL[n]]
    shapes = [(tuple(out.shape), tuple(ref_out.shape)), (tuple(lse.shape), tuple(ref_lse.shape))]
    shapes += [(tuple(g.shape), tuple(r.shape)) for g, r in zip(grads, ref_grads)]
    problems += [f"shape {a} != {b}" for a, b in shapes if a != b]
    if tuple(lse.shape) == tuple(ref_lse.shape):
        empty = torch.isinf(ref_lse)
        if not torch.equal(torch.isinf(lse), empty):
            problems.append("lse is -inf on other rows than the reference's")
        lse_err = float((lse.double() - ref_lse.double())[~empty].abs().max()) if (~empty).any() else 0.0
        errors["lse"] = lse_err
        if not lse_err <= LSE_TOL:
            problems.append(f"lse {lse_err:.2e} > {LSE_TOL:.0e}")
    return dict(row, status="FAIL" if problems else "ok", reason="; ".join(problems),
                errors={n: float(f"{e:.3e}") for n, e in errors.items()})


def run_checks(names=None, cases=CASES, device=None, child_for_cudnn_varlen=True) -> list:
    """Rows of every (backend, case); the cuDNN packed cases in a child process (see the notes)."""
    device = torch.device(device or "cuda")
    rows = []
    for backend in seam.backends().values():
        if backend.name == "torch" or (names and backend.name not in names):
            continue
        available, reason = backend.available()
        if not available:
            rows.append(dict(backend=backend.name, case="*", status="unavailable", reason=reason))
            continue
        for name, spec in cases:
            packed = spec[-1] is not None
            if backend.name == "cudnn" and packed and child_for_cudnn_varlen:
                continue
            rows.append(check_case(backend, name, spec, device))
        if backend.name == "cudnn" and child_for_cudnn_varlen:
            rows += _cudnn_varlen_in_child([c for c in cases if c[1][-1] is not None])
    return rows


def _cudnn_varlen_in_child(cases) -> list:
    env = dict(os.environ, **{seam.CUDNN_VARLEN_ENV: "1"})
    names = ",".join(name for name, _ in cases)
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-cudnn-varlen", names],
                              capture_output=True, text=True, env=env, timeout=90)
    except subprocess.TimeoutExpired:
        return [dict(backend="cudnn", case=name, status="FAIL", reason="child timed out (90 s)") for name, _ in cases]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    rows = [json.loads(line) for line in lines]
    seen = {r["case"] for r in rows}
    tail = (done.stderr.strip().splitlines() or [""])[-1][:300]
    rows += [dict(backend="cudnn", case=name, status="FAIL", reason=f"child exited {done.returncode}: {tail}")
             for name, _ in cases if name not in seen]
    for r in rows:
        r["forced"] = f"{seam.CUDNN_VARLEN_ENV}=1"
    return rows


def summary(rows) -> dict:
    out = {}
    for r in rows:
        entry = out.setdefault(r["backend"], {"ok": 0, "FAIL": 0, "unsupported": 0, "unavailable": 0})
        entry[r["status"]] += 1
    cudnn_packed = [r for r in rows if r["backend"] == "cudnn" and r.get("docs")]
    if cudnn_packed:
        out["cudnn_varlen_trusted"] = all(r["status"] == "ok" for r in cudnn_packed)
        out["cudnn_varlen_default"] = seam.cudnn_varlen_trusted()
    return out


def print_table(rows) -> None:
    print(f"{'backend':>8} {'case':>26} {'status':>11}  {'out':>9} {'lse':>9} {'dq':>9} {'dk':>9} {'dv':>9}  reason")
    for r in rows:
        e = r.get("errors", {})
        cells = " ".join(f"{e[n]:>9.2e}" if n in e else f"{'-':>9}" for n in ("out", "lse", "dq", "dk", "dv"))
        print(f"{r['backend']:>8} {r['case']:>26} {r['status']:>11}  {cells}  {r.get('reason', '')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--backends", help="comma-separated backends to check (default: every available one)")
    parser.add_argument("--child-cudnn-varlen", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_backends_gpu.py needs a CUDA GPU")
    if args.child_cudnn_varlen:
        wanted = set(args.child_cudnn_varlen.split(","))
        for name, spec in CASES:
            if name in wanted:
                print(json.dumps(check_case(seam.backends()["cudnn"], name, spec, torch.device("cuda"))), flush=True)
        return
    start = time.time()
    names = args.backends.split(",") if args.backends else None
    rows = run_checks(names)
    print_table(rows)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "command": " ".join(["python"] + sys.argv),
              "seconds": round(time.time() - start, 1), "tolerances": dict(TOL, lse=LSE_TOL),
              "summary": summary(rows), "rows": rows}
    try:
        from benchlib import result_head
        result = dict(result_head(result["device"], result["command"]), **result)
    except Exception:  # noqa: BLE001 - the head's extras (triton, commit) are optional here
        pass
    print(json.dumps(result["summary"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out} ({result['seconds']} s)")
    # the forced cuDNN packed rows fail the run only where that path is on by default
    if any(r["status"] == "FAIL" and (not r.get("forced") or seam.cudnn_varlen_trusted()) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
