"""Bytes each sequence-parallel method sends per layer and GPU, from the method records.

    python scripts/sp_bytes.py --gpus 8 --seqlens 131072 524288

Prints a Markdown table (the one in the README) for the Llama-3.2-1B and Llama-3-8B shapes: per
method, the MiB one GPU sends in one layer's forward and backward (bf16 activations), for softmax
layers and, where the method runs them, linear-attention layers of the same shape. USP is laid out
as Ulysses over `--ulysses` GPUs (default: the KV heads, the most that need no replication, and
at most half the GPUs, so that a ring remains) times a ring over the rest. Counts, not timings: what a link must carry.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from longctx.parallel.registry import methods  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import model_config  # noqa: E402

SHAPES = {"1B": "llama3.2-1b", "8B": "llama3-8b"}
MIB = 2**20


def table(gpus: int, seqlens: list[int], ulysses: int | None, a: int = 2) -> str:
    shapes = {label: model_config(name) for label, name in SHAPES.items()}
    columns = [(label, n) for label in shapes for n in seqlens]
    head = "| method | layer | " + " | ".join(f"{label} {n // 1024}K" for label, n in columns) + " |"
    lines = [head, "|" + " --- |" * (2 + len(columns))]
    for name, method in sorted(methods().items()):
        for kind in ("softmax", "linear"):
            if method.mixer_for(kind) is None:
                continue
            cells = []
            for label, n in columns:
                m = shapes[label]
                u = ulysses or min(m.num_key_value_heads, gpus // 2)
                dims = SimpleNamespace(sp=gpus, ulysses=u if name == "usp" else 1)
                cells.append(f"{method.bytes_per_layer(m, n, a, dims, kind) / MIB:,.0f}")
            label = f"{name} ({ulysses or 'KV heads, <= sp/2'} x ring)" if name == "usp" else name
            lines.append(f"| {label} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs sharing one sequence (parallel.sp)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[131072, 524288])
    parser.add_argument("--ulysses", type=int, default=None, help="USP's Ulysses degree")
    args = parser.parse_args(argv)
    print(f"MiB sent per GPU per layer (forward + backward, bf16), sp={args.gpus}")
    print(table(args.gpus, args.seqlens, args.ulysses))


if __name__ == "__main__":
    main()
