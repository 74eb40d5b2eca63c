"""Figures of the evaluation (matplotlib, imported only here and only when drawing)."""
from __future__ import annotations

from pathlib import Path

from .scoring import accuracy_by, accuracy_grid


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("drawing the evaluation figures needs matplotlib, which is not installed: "
                          "pip install matplotlib (the results JSON is written without it)") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def needle_heatmap(results: list[dict], path: str | Path, title: str = "Needle in a haystack") -> Path:
    """Accuracy over context length (x) and needle depth (y) as a red-to-green heat map."""
    plt = _pyplot()
    depths, lengths, grid = accuracy_grid(results, rows="asked_depth", columns="length")
    values = [[float("nan") if v is None else v for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.8 * len(lengths)), max(3.0, 1.0 + 0.45 * len(depths))))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save(fig, plt, path)


def accuracy_by_depth(results: list[dict], path: str | Path, title: str = "Line retrieval") -> Path:
    """Accuracy against the answer's depth, one line per context length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    table = accuracy_by(results, "length", "asked_depth")
    for length in sorted({t["length"] for t in table}):
        rows = [t for t in table if t["length"] == length]
        ax.plot([t["asked_depth"] for t in rows], [t["accuracy"] for t in rows], marker="o", label=_tokens(length))
    ax.set_xlabel("depth of the asked line in the context")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(title="context")
    return _save(fig, plt, path)


def loss_by_position_plot(rows: list[dict], path: str | Path, trained_length: int | None = None,
                          title: str = "Loss by token position") -> Path:
    """Mean loss per position bucket (log x axis); a dashed line at the trained context length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    centres = [(r["start"] * max(r["end"] - 1, r["start"])) ** 0.5 for r in rows]
    ax.plot(centres, [r["loss"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    if trained_length:
        ax.axvline(trained_length, linestyle="--", color="grey", label=f"trained length {_tokens(trained_length)}")
        ax.legend()
    ax.set_xlabel("tokens of context before the predicted token")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    return _save(fig, plt, path)


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# before / after, from bench rows (longctx.eval.rows)
# ------------------------------------------------------------------------------------------------
def retrieval_comparison(rows: list[dict], path: str | Path, title: str = "Retrieval before and after") -> Path:
    """One heat map (depth x length) per task and stage: tasks in rows, stages in columns."""
    plt = _pyplot()
    cells = [r for r in rows if "depth" in r and "accuracy" in r]
    tasks = [t for t in ("needle", "passkey", "line_retrieval") if any(r["task"] == t for r in cells)]
    stages = [s for s in ("base", "trained") if any(r["stage"] == s for r in cells)]
    lengths = sorted({r["seqlen"] for r in cells})
    depths = sorted({r["depth"] for r in cells})
    fig, axes = plt.subplots(len(tasks), len(stages), squeeze=False, layout="constrained",
                             figsize=(2.4 + 0.9 * len(lengths) * len(stages), 0.8 + (1.4 + 0.35 * len(depths)) * len(tasks)))
    value = {(r["task"], r["stage"], r["depth"], r["seqlen"]): r["accuracy"] for r in cells}
    image = None
    for i, task in enumerate(tasks):
        for j, stage in enumerate(stages):
            ax = axes[i][j]
            grid = [[value.get((task, stage, d, n), float("nan")) for n in lengths] for d in depths]
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
            for y, row in enumerate(grid):
                for x, v in enumerate(row):
                    if v == v:
                        ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            trained = next((r["trained_seq_len"] for r in cells if r["stage"] == stage), None)
            ax.set_title(f"{task.replace('_', ' ')}, {stage}" + (f" (trained {_tokens(trained)})" if trained else ""),
                         fontsize=9)
            if i == len(tasks) - 1:
                ax.set_xlabel("context length (tokens)")
            if j == 0:
                ax.set_ylabel("depth")
    fig.suptitle(title)
    if image is not None:
        fig.colorbar(image, ax=axes, label="accuracy", shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_comparison(rows: list[dict], path: str | Path, title: str = "Loss by token position") -> Path:
    """Loss by position, one line per stage; dashed lines at each stage's trained length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for stage in ("base", "trained"):
        mine = sorted((r for r in rows if r["task"] == "loss" and r.get("kind") == "by_position" and r["stage"] == stage),
                      key=lambda r: r["start"])
        if not mine:
            continue
        centres = [(r["start"] * max(r["end"] - 1, r["start"])) ** 0.5 for r in mine]
        line, = ax.plot(centres, [r["loss"] for r in mine], marker="o", label=stage)
        ax.axvline(mine[0]["trained_seq_len"], linestyle="--", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of context before the predicted token (dashed: trained length)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.legend()
    return _save(fig, plt, path)
