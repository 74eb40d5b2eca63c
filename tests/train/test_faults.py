"""Fault injection: training killed at every point of a save, and checkpoints damaged in every kind
of file, must still end with the losses of an uninterrupted run, and never start over when a
complete checkpoint existed.

One uninterrupted reference run (in this process) gives the losses. The kills are real: the same
command `python -m longctx.train ...` runs again and again, each time with the checkpointer's hook
(LONGCTX_CHECKPOINT_KILL_AT=<point>@<step>) ending the process with os._exit at the next point of
a save, so each run resumes from what the previous kill left. The damage is done to copies of the
reference run's folder, each then resumed in this process.
"""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx.train.integrity import CheckpointError
from longctx.train.checkpoint import KILL_AT, KILLED_EXIT, SAVE_POINTS
from test_train import compose_config, losses
from longctx.train.train import train

STEPS = 7
# a step per save point, and a small model: the vocabulary (Llama 3's) makes most of a checkpoint
OVERRIDES = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
             "model.num_attention_heads=2", "model.num_key_value_heads=1", "train.seq_len=256",
             f"train.steps={STEPS}", "optim.warmup_steps=2", "checkpoint.every=1", "checkpoint.keep=2",
             "checkpoint.every_minutes=0", "checkpoint.export_hf=false", "logging.progress_bar=false",
             "train.threads=1", "data.verbose=false"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(compose_config(OVERRIDES + [f"run_dir={run_dir}"]))
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run_dir, reference):
    """Each step once, with the reference run's loss (bitwise: the same math on one CPU thread)."""
    steps = [r["step"] for r in rows(run_dir)]
    assert steps == list(range(1, STEPS + 1)), steps
    assert losses(run_dir) == losses(reference)


def cli(run_dir, kill_at=None):
    env = {k: v for k, v in os.environ.items() if k != KILL_AT}
    if kill_at:
        env[KILL_AT] = kill_at
    proc = subprocess.run([sys.executable, "-m", "longctx.train", f"run_dir={run_dir}", *OVERRIDES],
                          env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def started_at(output: str) -> int:
    """The step the run resumed from (0: started over), from the line every run prints."""
    if re.search(r"no checkpoint in \S+: starting at step 1", output):
        return 0
    found = re.search(r"resumed from \S+step_0*(\d+)\S* at step (\d+)", output)
    assert found.group(1) == found.group(2)
    return int(found.group(2))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.unlink()   # the copy's files are hard links to the reference's: never write through them
    if how == "flip":
        middle, count = len(data) // 2, min(4096, len(data) // 2)
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + count]) + data[middle + count:]
    elif how == "truncate":
        data = data[:len(data) // 2]
    if how != "delete":
        path.write_bytes(data)


def test_killed_at_every_point_of_a_save_ends_as_the_uninterrupted_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    # (kill point, the step whose save it hits, the step this run must resume from: the newest
    # complete checkpoint the previous kills left)
    plan = [("model", 1, 0), ("rank", 2, 0), ("meta", 3, 1), ("manifest", 4, 2), ("renamed", 4, 3),
            ("pointer", 5, 4), ("pruning", 6, 5), ("displaced", 6, 5)]
    assert sorted(point for point, _, _ in plan) == sorted(SAVE_POINTS)
    for point, step, start in plan:
        if point == "displaced":   # it needs a step_N there to replace: the newest, damaged, so that
            damage(run_dir / "checkpoints" / f"step_{step:08d}" / "__0_0.distcp", "flip")   # the run goes back
        code, output = cli(run_dir, kill_at=f"{point}@{step}")
        assert code == KILLED_EXIT, f"{point}@{step} was not reached:\n{output[-3000:]}"
        assert started_at(output) == start, output[-3000:]
    code, output = cli(run_dir)
    assert code == 0, output[-3000:]
    assert started_at(output) == 5   # step_6 was displaced by the kill, and the displaced one is damaged
    assert "step_00000006.replaced" in output and "does not match its checksum" in output
    assert_same_run(run_dir, reference)
    folders = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert folders == ["latest", "step_00000006", "step_00000007"]

    # nothing intact left: one line, a non-zero exit, and the metrics stay as they were
    for step in (6, 7):
        damage(run_dir / "checkpoints" / f"step_{step:08d}" / "meta.pt", "truncate")
    code, output = cli(run_dir)
    assert code != 0 and "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith("error: none of the 2 checkpoints")
    assert_same_run(run_dir, reference)


CORRUPTIONS = [(name, how) for name in ("__0_0.distcp", ".metadata", "meta.pt", "rank0.pt", "manifest.json")
               for how in ("flip", "truncate")] + [("__0_0.distcp", "delete"), ("latest", "dangle")]


@pytest.mark.parametrize("name, how", CORRUPTIONS, ids=[f"{how}-{name}" for name, how in CORRUPTIONS])
def test_a_damaged_checkpoint_falls_back_and_ends_as_the_uninterrupted_run(reference, tmp_path, capsys, name, how):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, copy_function=os.link)
    newest = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    if how == "dangle":
        pointer = run_dir / "checkpoints" / "latest"
        pointer.unlink()
        pointer.write_text("step_00000099")
    else:
        damage(newest / name, how)
    train(compose_config(OVERRIDES + [f"run_dir={run_dir}"]))
    output = capsys.readouterr()
    if how == "dangle":   # the pointer is not what resume trusts
        assert started_at(output.out) == STEPS and not output.err.count("warning")
    else:
        assert f"{newest / name}" in output.err and "not resuming from" in output.err
        assert started_at(output.out) == STEPS - 1
    assert_same_run(run_dir, reference)


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_save_keeps_the_old_checkpoint_and_leaves_no_tmp(reference, tmp_path, monkeypatch, capsys):
    """The disk fills while step 3 is written (every write fails from then on, as on a full disk):
    the run stops in one line naming the space, the .tmp goes, step 2 stays, and once space is back
    the resume ends as the uninterrupted run."""
    run_dir = tmp_path / "run"
    real_save = torch.save

    def fills_at_step_3(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == "step_00000003.tmp":
            Path(f).write_bytes(b"\0" * 100)   # a partial file, as a write that ran out of space leaves
            enospc()
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", fills_at_step_3)
    with pytest.raises(CheckpointError) as error:
        train(compose_config(OVERRIDES + [f"run_dir={run_dir}"]))
    line = str(error.value)
    assert "\n" not in line and "saving checkpoint step_00000003" in line and "No space left on device" in line
    assert "step_00000002 is intact" in line and "train.resume=auto" in line
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    monkeypatch.setattr(torch, "save", real_save)
    train(compose_config(OVERRIDES + [f"run_dir={run_dir}"]))
    assert losses(run_dir) == losses(reference)


def test_too_little_free_space_refuses_the_save_before_writing(tmp_path, monkeypatch):
    """The checkpoint's size is known (the previous one's, or the state's before the first): a disk
    with less free space than that stops the run before a byte is written, saying how much is missing."""
    import shutil
    run_dir = tmp_path / "run"
    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=1000)
    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(CheckpointError, match=r"no space for checkpoint step_00000001 in \S+checkpoints: it needs "
                                              r"about [\d.]+ MiB, 1000 B is free \([\d.]+ MiB missing\); no checkpoint "
                                              r"was saved yet; free space there"):
        train(compose_config(OVERRIDES + [f"run_dir={run_dir}"]))
    assert list((run_dir / "checkpoints").iterdir()) == []


def test_a_start_removes_the_tmp_of_a_dead_save_and_names_it(reference, tmp_path, capsys):
    """A save killed midway leaves step_N.tmp (as large as a checkpoint, on a disk it may have
    filled); the next start removes it, naming it, and resumes from the intact checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, copy_function=os.link)
    stale = run_dir / "checkpoints" / "step_00000009.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"\0" * 1000)
    capsys.readouterr()
    train(compose_config(OVERRIDES + [f"run_dir={run_dir}"]))   # resumes at the last step: nothing to train
    out = capsys.readouterr().out
    assert f"removed 1 unfinished checkpoint(s) of a save that did not complete: step_00000009.tmp in {run_dir / 'checkpoints'}" in out
    assert not stale.exists()
