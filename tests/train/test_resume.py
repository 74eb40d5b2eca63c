"""Resume as a user meets it: one run at a time in a run folder, settings that may not change,
config files kept, metrics without repeated steps, saves by time, and another number of processes."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from longctx.train.config import ConfigError
from longctx.train.run_folder import RunLock
from longctx.train.train import train
from test_train import SMALL, compose_config, finish, losses, torchrun

QUICK = SMALL + ["checkpoint.export_hf=false", "data.verbose=false", "checkpoint.every_minutes=0"]


def run(run_dir, *overrides):
    return train(compose_config(QUICK + [f"run_dir={run_dir}", *overrides]))


def test_a_second_run_in_a_locked_folder_stops_before_touching_it(tmp_path):
    holder = RunLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(ConfigError, match=f"run_dir={tmp_path} is in use by another run \\(process {os.getpid()}"):
            run(tmp_path, "train.steps=1")
    finally:
        holder.release()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()
    run(tmp_path, "train.steps=1", "checkpoint.at_end=false")   # released: the folder is free again


def test_the_lock_of_a_killed_run_is_taken_over_with_a_line_saying_so(tmp_path, capsys):
    dies_holding_it = ("import os, signal, sys; from longctx.train.run_folder import RunLock; "
                       "RunLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", dies_holding_it, str(tmp_path)], timeout=300)
    assert proc.returncode == -signal.SIGKILL and (tmp_path / ".lock.owner").is_file()
    holder = RunLock(tmp_path)
    holder.acquire()          # the operating system dropped the dead process's flock
    holder.release()
    assert "taking over the lock of process" in capsys.readouterr().out
    assert not (tmp_path / ".lock.owner").exists()


def test_changed_settings_stop_the_resume_unless_forced_and_config_yaml_is_kept(tmp_path, capsys):
    run(tmp_path, "train.steps=2")
    original = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"other settings: optim.lr 0.003 -> 0.001; .*train.resume_force=true"):
        run(tmp_path, "train.steps=3", "optim.lr=1e-3")
    assert sorted(losses(tmp_path)) == [1, 2]
    run(tmp_path, "train.steps=3", "optim.lr=1e-3", "train.resume_force=true")
    out = capsys.readouterr().out
    assert "resuming" in out and "optim.lr 0.003 -> 0.001" in out and "at step 2" in out
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    assert (tmp_path / "config.yaml").read_text() == original
    assert OmegaConf.load(tmp_path / "config.resume-2.yaml").optim.lr == 1e-3


def test_a_forced_resume_over_another_seq_len_starts_the_data_over(tmp_path, capsys):
    run(tmp_path, "train.steps=2")
    run(tmp_path, "train.steps=3", "train.seq_len=128", "train.resume_force=true")
    out = capsys.readouterr().out
    assert "train.seq_len 256 -> 128" in out and "the data starts from its beginning" in out
    assert sorted(losses(tmp_path)) == [1, 2, 3]


def test_metrics_keep_each_step_once_after_a_resume(tmp_path):
    run(tmp_path, "train.steps=4", "checkpoint.every=3", "checkpoint.at_end=false")
    first = losses(tmp_path)
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 5, "loss": 1.')   # a row cut short by a kill
    run(tmp_path, "train.steps=4", "checkpoint.every=3", "checkpoint.at_end=false")   # resumes at 3
    steps = [int(line.split(",")[0].split(":")[1]) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert losses(tmp_path) == first


def test_checkpoints_by_elapsed_time(tmp_path):
    run(tmp_path / "timed", "train.steps=3", "checkpoint.at_end=false", "checkpoint.every_minutes=1e-9")
    assert (tmp_path / "timed" / "checkpoints" / "latest").read_text() == "step_00000003"
    assert sorted(p.name for p in (tmp_path / "timed" / "checkpoints").glob("step_*")) == \
        ["step_00000002", "step_00000003"]
    run(tmp_path / "untimed", "train.steps=3", "checkpoint.at_end=false")   # every_minutes=0: none
    assert not any((tmp_path / "untimed" / "checkpoints").glob("step_*"))
    with pytest.raises(ConfigError, match="checkpoint.every_minutes=-1.0 must be >= 0"):
        run(tmp_path / "bad", "checkpoint.every_minutes=-1")


def assert_same_losses(resumed: dict, reference: dict):
    assert sorted(resumed) == [3, 4]
    torch.testing.assert_close([resumed[s] for s in (3, 4)], [reference[s] for s in (3, 4)], rtol=1e-5, atol=0)


def test_resume_on_fewer_and_more_processes_with_the_same_global_batch(tmp_path):
    """Saved on 2 data-parallel ranks, resumed on 1 with grad_accum=2, and back: the data position
    is global and DCP reshards model and optimizer, so the losses go on as without the change."""
    on_two = tmp_path / "on_two"
    finish(torchrun(on_two, 4))                           # checkpoint.every=2: step_2 and step_4
    run(tmp_path / "two_to_one", "train.steps=4", "optim.warmup_steps=2", "checkpoint.every=2", "train.grad_accum=2",
        f"train.resume={on_two}/checkpoints/step_00000002")
    assert_same_losses(losses(tmp_path / "two_to_one"), losses(on_two))

    on_one = tmp_path / "on_one"
    run(on_one, "train.steps=4", "optim.warmup_steps=2", "checkpoint.every=2", "train.grad_accum=2")
    torch.testing.assert_close(list(losses(on_one).values()), list(losses(on_two).values()), rtol=1e-5, atol=0)
    one_to_two = tmp_path / "one_to_two"
    finish(torchrun(one_to_two, 4, [f"train.resume={on_one}/checkpoints/step_00000002"]))
    assert_same_losses(losses(one_to_two), losses(on_one))


def test_train_resume_none_in_a_used_folder_is_refused_and_the_old_run_kept(tmp_path):
    """train.resume=none over a run used to truncate its metrics.jsonl (20 rows became 3) and leave
    its checkpoints beside the new run's: now refused, naming what is there, before anything is read."""
    run(tmp_path, "train.steps=3", "checkpoint.every=2")
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=rf"run_dir={tmp_path} holds a run \(metrics.jsonl, config.yaml, "
                                          r"checkpoints up to step_00000003\) and train.resume=none would start another "
                                          r"over it: resume it with train.resume=auto, choose another run_dir, or move it aside"):
        run(tmp_path, "train.steps=3", "train.resume=none")
    assert (tmp_path / "metrics.jsonl").read_text() == before
    run(tmp_path / "fresh", "train.steps=1", "train.resume=none", "checkpoint.at_end=false")   # an unused folder: fine


def lrs(run_dir) -> dict:
    import json
    return {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_a_resume_that_changes_the_schedule_is_refused_or_said_with_the_lr_sequence(tmp_path, capsys):
    """Saved at step 6 of a 12-step cosine schedule, resumed with train.steps=8: the rate would jump at
    step 7. Refused in one line naming the step and both rates; forced, said so, and the rates from
    step 7 on are the new schedule's."""
    from longctx.train.schedule import learning_rates
    overrides = ["optim.schedule=cosine", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1", "checkpoint.every=6"]
    straight = tmp_path / "straight"
    run(straight, "train.steps=12", *overrides)                 # step_6 is a 12-step run's checkpoint
    step_6 = f"train.resume={straight}/checkpoints/step_00000006"
    old = learning_rates(compose_config(QUICK + ["train.steps=12", *overrides]).optim, 12, 7, 8)
    new = learning_rates(compose_config(QUICK + ["train.steps=8", *overrides]).optim, 8, 7, 8)
    with pytest.raises(ConfigError, match=rf"train.steps 12 -> 8 changes the learning rate from step 7 on "
                                          rf"\({old[7]:.3g} -> {new[7]:.3g} at step 7\); resume with the saved "
                                          r"schedule, or set train.resume_force=true"):
        run(tmp_path / "shorter", "train.steps=8", *overrides, step_6)
    assert not (tmp_path / "shorter").exists()                  # refused before the folder was made
    run(tmp_path / "shorter", "train.steps=8", *overrides, step_6, "train.resume_force=true")
    assert f"from step 7 on ({old[7]:.3g} -> {new[7]:.3g} at step 7)" in capsys.readouterr().out
    assert lrs(straight)[7] == pytest.approx(old[7], rel=1e-12) and lrs(straight)[8] == pytest.approx(old[8], rel=1e-12)
    assert lrs(tmp_path / "shorter") == pytest.approx({7: new[7], 8: new[8]}, rel=1e-12)
    assert abs(new[7] - old[7]) > 0.1 * old[7]
    # the same schedule over more steps (constant after warmup): nothing changes, nothing said
    run(tmp_path / "constant", "train.steps=3", "optim.schedule=constant", "optim.warmup_steps=1")
    run(tmp_path / "constant", "train.steps=5", "optim.schedule=constant", "optim.warmup_steps=1")
    assert sorted(lrs(tmp_path / "constant")) == [1, 2, 3, 4, 5]


def test_a_forced_resume_over_another_shape_is_one_line(tmp_path):
    run(tmp_path, "train.steps=2")
    with pytest.raises(ConfigError, match=r"holds tensors of another shape \(model.head_dim 16 -> 8; model.hidden_size 64 -> 32\), which "
                                          r"train.resume_force cannot load"):
        run(tmp_path, "train.steps=3", "model.hidden_size=32", "train.resume_force=true")
