"""Scoring generated answers and tabulating accuracy by context length and depth."""
from __future__ import annotations

import re
from collections import defaultdict

_NUMBER = re.compile(r"\d+")


def first_number(text: str) -> str | None:
    """The first run of digits in `text` (None when there is none)."""
    match = _NUMBER.search(text)
    return match.group(0) if match else None


def score_answer(generated: str, answer: str) -> bool:
    """Correct when the first number the model wrote is the expected one (as LongChat scores)."""
    return first_number(generated) == answer


def accuracy_by(results: list[dict], *keys: str) -> list[dict]:
    """Mean of `correct` over the results grouped by `keys`, sorted by them.

    results: dicts with a boolean `correct` and the keys, e.g. {"length": 4096, "depth": 0.5, ...}.
    Returns [{key: value, ..., "accuracy": a, "count": n}, ...].
    """
    if not keys:
        raise ValueError("name at least one key to group by, e.g. accuracy_by(results, 'length')")
    groups: dict[tuple, list[bool]] = defaultdict(list)
    for r in results:
        missing = [k for k in keys + ("correct",) if k not in r]
        if missing:
            raise KeyError(f"result {r} lacks {missing}")
        groups[tuple(r[k] for k in keys)].append(bool(r["correct"]))
    return [dict(zip(keys, group), accuracy=sum(v) / len(v), count=len(v))
            for group, v in sorted(groups.items())]


def accuracy_grid(results: list[dict], rows: str = "depth", columns: str = "length"):
    """Accuracy as a grid for a heat map: (row values, column values, grid[row][column] or None)."""
    table = accuracy_by(results, rows, columns)
    row_values = sorted({t[rows] for t in table})
    column_values = sorted({t[columns] for t in table})
    cell = {(t[rows], t[columns]): t["accuracy"] for t in table}
    grid = [[cell.get((r, c)) for c in column_values] for r in row_values]
    return row_values, column_values, grid
