"""What every entry point (train, check, plan, data.inspect, eval) does with a user's mistake and `--help`.

    if __name__ == "__main__":
        show_help_and_exit(__doc__)              # -h / --help: the module's docstring, exit 0
        with one_line_errors(ConfigError, DataError):
            main()                               # the mistake -> "error: ..." on stderr, exit 1

Under torchrun every rank meets the same mistake; the line is printed once, by the first rank that
fails (rank 0 when all do), and written to the launcher's error file (TORCHELASTIC_ERROR_FILE) so
that torchrun's failure report shows it instead of "To enable traceback see ...", and the thin
launcher (`python -m longctx.launch`) knows to add nothing to it. `HYDRA_FULL_ERROR=1` keeps the
traceback, as it does for Hydra's own errors.

Nothing here imports longctx's layers: data, train and eval all use it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

# exit status of a user's mistake (one line printed), and the marker of its error file
USER_ERROR_EXIT = 1
ERROR_FILE_MARK = "longctx-one-line"


def show_help_and_exit(doc: Optional[str], argv: Optional[list[str]] = None) -> None:
    """`-h` / `--help` anywhere in the arguments: print the module's docstring (its usage) and exit 0."""
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        print((doc or "").strip())
        raise SystemExit(0)


def _first_to_fail() -> bool:
    """True in the first process of a torchrun job to report a mistake (or outside torchrun).

    The ranks of one node share the folder of torchrun's attempt (the error files'
    .../attempt_<n>/<rank>/error.json): the first to create the marker there prints. Rank 0 goes
    first when every rank fails at once (the others give it a moment)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return os.environ.get("RANK", "0") == "0"
    attempt = Path(error_file).parent.parent
    if os.environ.get("RANK", "0") != "0":
        time.sleep(0.5)
    try:
        os.close(os.open(attempt / "longctx-error-printed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:
        return os.environ.get("RANK", "0") == "0"


def _write_error_file(line: str) -> None:
    """torchrun's error file for this rank, in the layout its failure report reads."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time())),
                                                        "kind": ERROR_FILE_MARK}}}
    try:
        Path(error_file).parent.mkdir(parents=True, exist_ok=True)
        Path(error_file).write_text(json.dumps(data))
    except OSError:
        pass


def exit_with_line(message: str, status: int = USER_ERROR_EXIT) -> None:
    """Print "error: <message>" once per job (see the module's docstring) and exit with `status`."""
    line = message if message.startswith("error: ") else f"error: {message}"
    _write_error_file(line)
    if _first_to_fail():
        print(line, file=sys.stderr, flush=True)
    raise SystemExit(status)


@contextmanager
def one_line_errors(*kinds: type[BaseException]):
    """Exceptions of `kinds` (a user's mistakes) end the process with their one line."""
    try:
        yield
    except kinds as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        exit_with_line(str(error))
    except KeyboardInterrupt:   # a Ctrl-C where nothing handles it (a run's steps save first): no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        exit_with_line("interrupted (Ctrl-C); nothing was saved", 130)
