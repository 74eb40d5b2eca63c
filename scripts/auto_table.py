"""The table `model.attention=auto` reads (longctx/ops/attention/auto_table.json): for each shape
key (device capability, dtype, head dim, causal, GQA ratio, dense or packed, length bucket; see
`backends.table_key`) the backend with the shortest forward+backward measured by
`scripts/bench_attention.py --write-auto-table`, with every backend's time beside it.

Only backends that passed their GPU checks in the same run are timed (bench_attention.py). A run
replaces the entries of the keys it measured and keeps the others (other GPUs' rows).
"""
from __future__ import annotations

import json
import os

import torch

from longctx.ops.attention import backends as seam

# (seqlen, heads, kv_heads, head_dim, causal): the Llama-3.2-1B (D64, 4:1) and Llama-3-8B (D128, 4:1)
# attention and an MHA D128 shape, at 4K, 16K and 64K (auto takes the nearest measured length); the
# non-causal ones are what a ring's off-diagonal blocks run
DENSE_SHAPES = [(s, 32, kv, d, True) for s in (4096, 16384, 65536) for kv, d in ((8, 64), (8, 128), (32, 128))]
DENSE_SHAPES += [(16384, 32, 8, 64, False), (16384, 32, 8, 128, False)]
# (seqlen, docs, heads, kv_heads, head_dim, causal): documents of `seqlen` tokens, packed and dense
PACKED_SHAPES = [(4096, 4, 32, 8, 64, True), (4096, 4, 32, 8, 128, True), (16384, 4, 32, 8, 128, True)]


def entries_from_rows(rows, device) -> dict:
    """{key: {"backend", "fwd_bwd_ms": {backend: ms}, "seqlen", "heads", "kv_heads"}} from the
    benchmark's backend_* fwd_bwd rows (the fastest per key; ties go to the earlier backend)."""
    times: dict = {}
    for r in rows:
        if not r.get("impl", "").startswith("backend_") or r.get("mode") != "fwd_bwd" or "ms" not in r:
            continue
        key = seam.table_key(device, torch.bfloat16, r["head_dim"], r["causal"], r["heads"] // r["kv_heads"],
                             r.get("layout") == "packed", r["seqlen"])
        entry = times.setdefault(key, {"fwd_bwd_ms": {}, "seqlen": r["seqlen"], "heads": r["heads"],
                                       "kv_heads": r["kv_heads"]})
        name = r["impl"][len("backend_"):]
        # per token: a packed row and a dense batch of the same documents count alike
        ms = r["ms"] / max(1, r.get("batch", 1))
        entry["fwd_bwd_ms"][name] = round(min(ms, entry["fwd_bwd_ms"].get(name, float("inf"))), 4)
    for entry in times.values():
        entry["backend"] = min(entry["fwd_bwd_ms"], key=entry["fwd_bwd_ms"].get)
    return times


def write(rows, path: str, device, head: dict) -> dict:
    """Merge the measured entries into the table at `path` (created if absent); returns the table."""
    table = {"entries": {}}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    table["entries"].update(entries_from_rows(rows, device))
    table["entries"] = dict(sorted(table["entries"].items()))
    table.update({k: v for k, v in head.items() if k in ("device", "torch", "triton", "commit", "command")})
    table["note"] = ("written by scripts/bench_attention.py --write-auto-table; per key the backend with the "
                     "shortest forward+backward (ms per document for packed rows)")
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    return table
