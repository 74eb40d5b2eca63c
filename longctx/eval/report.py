"""`python -m longctx.eval.report <bench.json> <folder>`: the before/after table (table.md) and the
comparison figures (retrieval heat maps by stage, loss by position of both stages) of a bench JSON
that `python -m longctx.eval ... append_to=<bench.json>` filled."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import plots
from .rows import table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m longctx.eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", help="the bench JSON (long_context_eval rows)")
    parser.add_argument("out", help="the folder for table.md and the figures")
    args = parser.parse_args(argv)
    path = Path(args.bench)
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such bench JSON; run python -m longctx.eval ... append_to={path} first")
    bench = json.loads(path.read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(bench)
    (out / "table.md").write_text(text + "\n")
    print(text)
    try:
        for figure in (plots.retrieval_comparison(bench["rows"], out / "retrieval_before_after.png"),
                       plots.loss_comparison(bench["rows"], out / "loss_by_position_before_after.png")):
            print(f"wrote {figure}")
    except ImportError as error:
        print(f"no figures: {error}")


if __name__ == "__main__":
    main()
