"""What a run prints: only its own lines (no library chatter), and a closing summary.

Also the worker's tie to its launcher: a worker whose torchrun was killed exits instead of
training on as an orphan that holds the GPUs and writes into the run folder.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional


def quiet_libraries() -> None:
    """Silence messages that say nothing to the user of a run; call before the first step."""
    # torch.profiler (the communication profile of every logging.comm_every-th step) starts
    # Kineto, which prints USDT/STAGE lines, and on a machine without a GPU an ERROR line about
    # gpuGetDeviceCount, at every profile. Read when Kineto starts; a level the user set wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    # DCP warns at every save and load in a single process that it assumes a single process
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                            category=UserWarning)
    # on a CPU: FSDP2's DTensors warn at every random op of a CPU mesh, DeepSpeed's ZeRO calls a
    # collective torch deprecates, DeepSpeed guesses the accelerator with a warning (told here, it
    # does not), and torch's extension builder warns that there is no CUDA
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
    warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated")
    import logging
    import torch
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def progress_bar_wanted(enabled: bool) -> bool:
    """A live bar on a terminal; in a log file (a batch job, a pipe) it is noise: plain lines instead."""
    return enabled and sys.stderr.isatty()


def closing_summary(first_step: int, last_step: int, tokens: int, seconds: float, final_loss: Optional[float],
                    checkpoint: Optional[Path], export: Optional[Path]) -> str:
    """The lines a run ends with: what it did and where its results are."""
    steps = last_step - first_step + 1
    if steps < 1:
        lines = [f"done: nothing to train, step {last_step} of train.steps was reached before"]
    else:
        loss = f", final loss {final_loss:.4f}" if final_loss is not None else ""
        lines = [f"done: steps {first_step}-{last_step} ({steps} in this run), {tokens:,} tokens in "
                 f"{_duration(seconds)}{loss}"]
    lines.append(f"  checkpoint: {checkpoint}" if checkpoint is not None else "  checkpoint: none written")
    if export is not None:
        lines.append(f"  Hugging Face export: {export}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """In a process started by a launcher (torchrun and accelerate set LOCAL_RANK), exit once the
    launcher is gone: the worker is then reparented, and its peers are gone or going too.

    A thread polls the parent's pid rather than prctl(PR_SET_PDEATHSIG): that signal fires when the
    launcher's thread that started the worker ends, not only the launcher, and exists on Linux only.
    A plain `python -m longctx.train` (no LOCAL_RANK) is left alone: under nohup its shell may go.
    """
    if "LOCAL_RANK" not in os.environ:
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(poll_s)
        print(f"error: the launcher of this worker (pid {launcher}) is gone; exiting (rank "
              f"{os.environ.get('RANK', '0')}, pid {os.getpid()}) instead of training on alone",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


# exit status of a run stopped by a signal after its checkpoint, as a shell reports a process ended by it
def interrupted_exit(signum: int) -> int:
    return 128 + signum


class StopSignal:
    """SIGTERM (a preempted job) and SIGINT (Ctrl-C) ask for a checkpoint at the end of the step and
    an exit; a second Ctrl-C stops at once (without a checkpoint of the steps since the last one).

    Under torchrun a Ctrl-C reaches each worker twice, from the terminal and forwarded by the
    launcher, within a moment: a repeat within `repeat_s` of the first is that echo, not the user."""

    def __init__(self, is_main: bool, repeat_s: float = 1.0):
        self.signum: Optional[int] = None
        self.is_main, self.repeat_s = is_main, repeat_s
        self._first_at = 0.0
        self.last_saved: Optional[int] = None   # the step of the newest checkpoint, for the second Ctrl-C's line
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if self.is_main:
                again = "; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
                print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
                      f"stopping{again}", file=sys.stderr, flush=True)
            return
        if signum == signal.SIGINT and now - self._first_at > self.repeat_s:
            if self.is_main:
                since = f"since step {self.last_saved}" if self.last_saved else "of this run"
                print(f"SIGINT again: stopped at once; the steps {since} are not saved", file=sys.stderr, flush=True)
            os._exit(interrupted_exit(signal.SIGINT))

    def restore(self) -> None:
        """The handlers from before (a run started in a process that goes on, as a test's)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
