"""Ctrl-C as a user presses it: at a random step, on one process and on two (the terminal signals
the launcher and every worker), the run saves at the end of the step, says so in one line, exits
130 and resumes to the losses of an uninterrupted run; a second Ctrl-C stops at once."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_faults import OVERRIDES as FAULT_OVERRIDES, STEPS, reference, rows  # noqa: F401 (fixture)
from test_train import compose_config, losses

from longctx.train.train import train

# no periodic saves: the only checkpoint is the one the interrupt asks for
OVERRIDES = [o for o in FAULT_OVERRIDES if not o.startswith("checkpoint.every=")] + ["checkpoint.every=0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start(run_dir, processes: int, *extra):
    launcher = ["-m", "longctx.launch", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    cmd = [sys.executable, *launcher, "-m", "longctx.train", f"run_dir={run_dir}", *OVERRIDES, *extra]
    # a session of its own: the test signals its process group as a terminal signals the foreground job
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(rows(run_dir)) >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached: {proc.communicate()[0][-3000:]}")


@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_at_a_random_step_saves_and_resumes_exactly(processes, reference, tmp_path):
    step = random.Random().randint(1, STEPS - 2)
    run_dir = tmp_path / "run"
    proc = start(run_dir, processes)
    wait_for_step(run_dir, step, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "ChildFailedError" not in out, out[-3000:]
    saved = [line for line in out.splitlines() if line.startswith("SIGINT: saved a checkpoint at step")]
    assert len(saved) == 1, out[-3000:]                      # once, not once per rank
    at = int(saved[0].split("at step ")[1].split()[0])
    assert at >= step and (run_dir / "checkpoints" / "latest").read_text() == f"step_{at:08d}"
    assert max(losses(run_dir)) == at                        # stopped at the end of the step it saved

    # resumed on one process; two ranks' global batch of 2 rows as 2 micro-batches of one
    accum = [f"train.grad_accum={processes}"]
    proc = start(run_dir, 1, *accum)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and f"at step {at}" in out, out[-3000:]
    assert [r["step"] for r in rows(run_dir)] == list(range(1, STEPS + 1))
    if processes == 1:
        assert losses(run_dir) == losses(reference)          # bitwise: the same math on one CPU thread
    else:   # the same batches through two ranks and through one: round-off apart
        straight = tmp_path / "straight"
        train(compose_config(OVERRIDES + accum + [f"run_dir={straight}"]))
        torch.testing.assert_close(list(losses(run_dir).values()), list(losses(straight).values()), rtol=1e-5, atol=0)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The first Ctrl-C asks for a save at the end of the step; a second, more than the echo window
    later (torchrun passes the terminal's on at once), ends the process without waiting for it."""
    script = ("import os, signal, time; from longctx.train.console import StopSignal\n"
              "stop = StopSignal(is_main=True, repeat_s=0.2); stop.last_saved = 40\n"
              "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT)\n"   # the echo: ignored
              "assert stop.requested and stop.name == 'SIGINT'\n"
              "time.sleep(0.3); os.kill(os.getpid(), signal.SIGINT); time.sleep(5); print('not stopped')")
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "SIGINT: saving a checkpoint at the end of this step, then stopping; Ctrl-C again to stop at once",
        "SIGINT again: stopped at once; the steps since step 40 are not saved"]
    assert "not stopped" not in proc.stdout
