"""torchrun for longctx: the same arguments, and a run that ends on a user's mistake or a Ctrl-C ends
in the workers' one line, without the launcher's failure report after it.

    python -m longctx.launch --nproc_per_node 2 -m longctx.train experiment=... [key=value ...]
    python -m longctx.launch --nproc_per_node 2 -m longctx.check parallel=ring

Plain torchrun works too: its workers print the line once, and write it to torchrun's error file,
so its report (a Python traceback of ChildFailedError and a table of the failed ranks) names it.
This launcher leaves that report out when every failed worker either reported a mistake of the
user's (its error file says so), was interrupted by SIGINT/SIGTERM after saving (exit 130/143), or
was stopped by the launcher once another had failed; anything else (a crash) is reported in full.

Ctrl-C: the terminal signals the workers itself; torchrun would raise in the launcher and give the
workers 30 s before killing them. Here the launcher passes the signal on (a `kill -INT` of the
launcher alone reaches the workers too) and waits for them to save and exit.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from longctx.cli import ERROR_FILE_MARK, show_help_and_exit

INTERRUPTED = {128 + signal.SIGINT, 128 + signal.SIGTERM}


def _forward_to_workers(signum, frame) -> None:
    import psutil
    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def _users_mistake(failure) -> bool:
    data = failure.error_file_data or {}
    message = data.get("message") if isinstance(data, dict) else None
    return isinstance(message, dict) and message.get("extraInfo", {}).get("kind") == ERROR_FILE_MARK


def quiet_exit_code(failures: dict) -> int | None:
    """The exit status to end with silently, or None when the failure report should be shown."""
    failures = [failures[rank] for rank in sorted(failures)]
    ours = [f for f in failures if f.exitcode > 0 and (_users_mistake(f) or f.exitcode in INTERRUPTED)]
    # the others were signalled by the launcher once the first had failed
    if not ours or not all(f in ours or f.exitcode < 0 for f in failures):
        return None
    return ours[0].exitcode


class _DropWorkerFailureLines(logging.Filter):
    """torchrun's "failed (exitcode: 1) local_rank: 0 ..." and "Sending process ... closing signal"
    lines: the workers' own line, or the failure report below them, says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("failed (exitcode", "Sending process"))


def main(argv: list[str] | None = None) -> int:
    show_help_and_exit(__doc__, (sys.argv[1:] if argv is None else argv)[:1])
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api as process_api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    process_api._terminate_process_handler = _forward_to_workers   # installed by torchrun when workers start
    for handler in logging.getLogger().handlers + logging.getLogger("torch.distributed.elastic").handlers:
        handler.addFilter(_DropWorkerFailureLines())
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropWorkerFailureLines())
    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        torchrun.run(args)
    except ChildFailedError as error:
        code = quiet_exit_code(error.failures)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
