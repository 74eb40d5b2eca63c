"""scripts/auto_table.py turns bench_attention's backend rows into the table `model.attention=auto`
reads, and the seam then picks the fastest backend per shape (the GPU rows are faked on the CPU:
the table's keys name the device, here "cpu")."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import auto_table  # noqa: E402
from longctx.ops.attention import backends as seam  # noqa: E402


def row(impl, ms, seqlen=4096, kv_heads=8, head_dim=64, layout=None, batch=1, mode="fwd_bwd"):
    r = dict(bench="attention", impl=impl, seqlen=seqlen, heads=32, kv_heads=kv_heads, head_dim=head_dim,
             causal=True, batch=batch, dtype="bfloat16", mode=mode, ms=ms)
    return r if layout is None else dict(r, layout=layout)


def test_rows_become_entries_and_auto_picks_the_fastest(tmp_path):
    rows = [row("backend_triton", 2.0), row("backend_cudnn", 1.5), row("backend_cudnn", 0.1, mode="fwd"),
            row("auto", 0.01),                                         # auto's own rows never count
            row("backend_triton", 4.0, layout="packed", batch=4), row("backend_cudnn", 3.0, layout="dense", batch=4),
            row("backend_triton", 9.0, head_dim=128), dict(row("backend_cudnn", 0, head_dim=128), unsupported="x")]
    del rows[-1]["ms"]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": {"sm80|bfloat16|d64|causal|g4|dense|s4096": {"backend": "triton"}}}))
    table = auto_table.write(rows, str(path), torch.device("cpu"), {"device": "cpu", "commit": "abc", "other": 1})
    entries = table["entries"]
    dense = entries["cpu|bfloat16|d64|causal|g4|dense|s4096"]
    assert dense["backend"] == "cudnn" and dense["fwd_bwd_ms"] == {"triton": 2.0, "cudnn": 0.75}  # per document
    assert entries["cpu|bfloat16|d64|causal|g4|packed|s4096"]["backend"] == "triton"
    assert entries["cpu|bfloat16|d128|causal|g4|dense|s4096"]["fwd_bwd_ms"] == {"triton": 9.0}
    assert "sm80|bfloat16|d64|causal|g4|dense|s4096" in entries                   # other devices' entries stay
    assert table["commit"] == "abc" and "other" not in table
    assert json.loads(path.read_text()) == table
    seam.clear_selection()
    picked = seam.select("auto", device="cpu", dtype=torch.bfloat16, head_dim=128, gqa=4, seqlen=4096,
                         table_path=str(path))
    assert picked.name == "triton"     # the table's choice (the CPU runs it under the interpreter)
