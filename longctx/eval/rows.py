"""The evaluation as bench rows (DESIGN.md, "long_context_eval"), and a bench JSON that collects them.

    {"bench": "long_context_eval", "impl": "longctx", "model": "smollm2-135m-instruct",
     "stage": "base" | "trained", "trained_seq_len": 8192, "task": "needle", "seqlen": 32768,
     "accuracy": 0.95, "samples": 100}                    # and "depth": d for the cell of one depth
    {..., "task": "loss", "kind": "by_position", "seqlen": 65536, "start": 4096, "end": 8192, "loss": 2.1, "tokens": ...}
    {..., "task": "loss", "kind": "short_context", "seqlen": 2048, "loss": 1.9, "tokens": ...}

A bench JSON is {"bench": "long_context_eval", "commands": [...], "devices": [...], "rows": [...]};
merging replaces the rows of the same (model, stage) and keeps the others, so a baseline and a
trained evaluation written by separate commands end up side by side.
"""
from __future__ import annotations

import json
from pathlib import Path

RETRIEVAL = ("needle", "passkey", "line_retrieval")


def bench_rows(report: dict) -> list[dict]:
    base = {"bench": "long_context_eval", "impl": "longctx", "model": report["name"], "stage": report["stage"],
            "trained_seq_len": report["trained_seq_len"]}
    rows = []
    for task in RETRIEVAL:
        if task not in report:
            continue
        for cell in report[task]["by_length"]:
            rows.append({**base, "task": task, "seqlen": cell["length"], "accuracy": cell["accuracy"],
                         "samples": cell["count"]})
        for cell in report[task]["by_length_depth"]:
            rows.append({**base, "task": task, "seqlen": cell["length"], "depth": cell["asked_depth"],
                         "accuracy": cell["accuracy"], "samples": cell["count"]})
    if "loss" in report:
        for r in report["loss"]["by_position"]:
            rows.append({**base, "task": "loss", "kind": "by_position", "seqlen": report["loss"]["length"],
                         "start": r["start"], "end": r["end"], "loss": r["loss"], "tokens": r["tokens"]})
    if "short_loss" in report:
        short = report["short_loss"]
        rows.append({**base, "task": "loss", "kind": "short_context", "seqlen": short["length"],
                     "loss": short["loss"], "tokens": short["tokens"], "sequences": short["sequences"]})
    return rows


def merge_rows(path: str | Path, rows: list[dict], command: str, device: str) -> dict:
    """Put `rows` into the bench JSON at `path` (made if absent), replacing earlier rows of the same
    (model, stage); the command and device are listed once each."""
    path = Path(path)
    bench = json.loads(path.read_text()) if path.is_file() else {"bench": "long_context_eval", "commands": [],
                                                                "devices": [], "rows": []}
    replaced = {(r["model"], r["stage"]) for r in rows}
    bench["rows"] = [r for r in bench.get("rows", []) if (r.get("model"), r.get("stage")) not in replaced] + rows
    for key, value in (("commands", command), ("devices", device)):
        if value not in bench.setdefault(key, []):
            bench[key].append(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bench, indent=1))
    return bench


def table(bench: dict) -> str:
    """A markdown table: accuracy by task and length, base against trained; then the losses."""
    rows = [r for r in bench["rows"] if r["task"] in RETRIEVAL and "depth" not in r]
    lengths = sorted({r["seqlen"] for r in rows})
    cell = {(r["task"], r["stage"], r["seqlen"]): r["accuracy"] for r in rows}
    lines = ["| task | stage | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for task in RETRIEVAL:
        for stage in ("base", "trained"):
            if any((task, stage, n) in cell for n in lengths):
                values = [cell.get((task, stage, n)) for n in lengths]
                lines.append(f"| {task} | {stage} | " + " | ".join("-" if v is None else f"{v:.0%}" for v in values) + " |")
    short = {r["stage"]: r["loss"] for r in bench["rows"] if r["task"] == "loss" and r.get("kind") == "short_context"}
    if short:
        lines.append("")
        lines.append("short-context loss: " + ", ".join(f"{stage} {loss:.4f}" for stage, loss in short.items()))
    return "\n".join(lines)
