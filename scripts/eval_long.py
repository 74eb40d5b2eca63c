"""Kept for old command lines: the evaluation is `python -m longctx.eval` (longctx/eval/__main__.py).

    python scripts/eval_long.py model.path=runs/<run>      # the same as python -m longctx.eval model.path=...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longctx.eval.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
