"""User mistakes end in one line naming the key or file and the fix: a non-zero exit, no Python
traceback (unless HYDRA_FULL_ERROR=1) and no run folder for a run that never started."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import SMALL, compose_config

from longctx.data import read_sharegpt
from longctx.train.config import ConfigError, validate
from longctx.train.errors import override_error

REPO = Path(__file__).resolve().parents[2]


def cli(cwd: Path, *overrides, env=None, module=("-m", "longctx.train")):
    """The trainer's command line, run in `cwd` (where runs/ would appear)."""
    cmd = [sys.executable, *module, *SMALL, "train.steps=2", f"run_dir={cwd / 'run'}", *overrides]
    environment = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, cwd: Path, *words):
    """Exit 1, a last line "error: ..." holding `words`, no traceback, no run folder."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), output[-3000:]
    for word in words:
        assert word in last, last
    assert "Traceback" not in output, output[-3000:]
    assert not (cwd / "run").exists() and not (cwd / "runs").exists()


def random_bytes(folder):
    path = folder / "random.json"
    path.write_bytes(os.urandom(4096))
    return path


def empty(folder):
    path = folder / "empty.json"
    path.write_text("")
    return path


def wrongly_typed(folder):
    path = folder / "typed.json"
    path.write_text(json.dumps([1, "text", [2], {"conversations": 5}, {"messages": "hi"}]))
    return path


@pytest.mark.parametrize("make, words", [
    (random_bytes, ["data.path=", "random.json is not JSON or JSON Lines"]),
    (empty, ["data.path=", "empty.json is empty"]),
    (wrongly_typed, ["data.path=", "none of its 5 records", "not_an_object 3", "unknown_layout 2"]),
], ids=["random-bytes", "empty", "wrongly-typed"])
def test_unusable_data_file_is_one_line(tmp_path, make, words):
    path = make(tmp_path)
    proc = cli(tmp_path, f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}")
    assert_one_line_error(proc, tmp_path, *words, "point data.path at ShareGPT records")


@pytest.mark.parametrize("override", ["+train.stepz=3", "train.stepz=3", "++train.stepz=3"])
def test_unknown_key_is_refused_with_or_without_plus(tmp_path, override):
    proc = cli(tmp_path, override)
    assert_one_line_error(proc, tmp_path, "train.stepz is not a setting", "did you mean train.steps?")


@pytest.mark.parametrize("override, message", [
    ("+train.stepz=3", "train.stepz is not a setting"), ("optim.lr=-1", "optim.lr=-1.0 must be > 0")])
def test_the_check_command_refuses_mistakes_as_the_trainer_does(tmp_path, override, message):
    proc = cli(tmp_path, override, module=("-m", "longctx.check"))
    assert_one_line_error(proc, tmp_path, message)


def test_a_sweep_job_that_never_starts_leaves_no_job_folder(tmp_path):
    cmd = [sys.executable, "-m", "longctx.train", "-m", *SMALL, "train.steps=1", "optim.lr=-1,-2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: optim.lr=-1.0 must be > 0", output[-3000:]
    assert "Traceback" not in output
    sweep, = (tmp_path / "runs").iterdir()   # the sweep's own folder, with its multirun.yaml
    assert [p.name for p in sweep.iterdir() if p.is_dir()] == []


def test_value_of_the_wrong_type_is_one_line(tmp_path):
    proc = cli(tmp_path, "train.steps=abc")
    assert_one_line_error(proc, tmp_path, "train.steps=abc: Value 'abc' of type 'str' could not be converted to Integer")


@pytest.mark.parametrize("argv, message", [
    (["+train.steps=3"], "train.steps is already a setting: drop the + (train.steps=3)"),
    (["train.steps=4.5"], "train.steps=4.5: Value '4.5' of type 'float' could not be converted to Integer"),
    (["optim.betas=[a,b]"], "optim.betas=[a,b]: Value 'a' of type 'str' could not be converted to Float"),
    (["checkpoint.export_hf=maybe"], "checkpoint.export_hf=maybe: Value 'maybe' is not a valid bool"),
    (["-m", "optim.lr=1,2", "data.pathh=x"], "data.pathh is not a setting: did you mean data.path?"),
])
def test_override_mistakes_are_named(argv, message):
    assert override_error(argv).startswith(message)


def test_good_overrides_pass_the_check():
    argv = ["-m", "model=tiny", "experiment=llama3-8b_sharegpt_512k", "++train.steps=3", "~train.seed",
            "optim.lr=1e-3,3e-3", "train.seed=range(3)", "run_dir=null", "optim.betas=[0.9,0.99]",
            "model.rope_scaling={rope_type:llama3,factor:8.0}", "train.threads=${oc.env:THREADS}",
            "hydra.run.dir=x", "hydra/launcher=basic"]
    assert override_error(argv) is None


def test_bad_number_stops_before_the_run_folder(tmp_path):
    proc = cli(tmp_path, "optim.lr=-1")
    assert_one_line_error(proc, tmp_path, "optim.lr=-1.0 must be > 0")


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    proc = cli(tmp_path, "model.vocab_size=1000")
    assert_one_line_error(proc, tmp_path, "data.tokenizer=", "model.vocab_size=1000", "set model.vocab_size=")


def test_full_traceback_with_hydra_full_error(tmp_path):
    proc = cli(tmp_path, "optim.lr=-1", env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError: optim.lr=-1.0 must be > 0" in proc.stderr


def test_eval_script_without_model_path(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_long.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.path is not set")
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", r"optim.lr=0.0 must be > 0"),
    ("optim.lr=nan", r"optim.lr=nan must be > 0"),
    ("optim.betas=[0.9,1.0]", r"optim.betas\[1\]=1.0 must be in \[0, 1\)"),
    ("optim.betas=[-0.1,0.9]", r"optim.betas\[0\]=-0.1 must be in \[0, 1\)"),
    ("optim.betas=[0.9]", r"optim.betas=\[0.9\] must be two numbers"),
    ("optim.eps=0", r"optim.eps=0.0 must be > 0"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1 must be >= 0"),
    ("optim.warmup_steps=-1", r"optim.warmup_steps=-1 must be >= 0"),
    ("optim.min_lr_ratio=1.5", r"optim.min_lr_ratio=1.5 must be in \[0, 1\]"),
    ("optim.grad_clip=-1", r"optim.grad_clip=-1.0 must be >= 0"),
    ("train.steps=0", r"train.steps=0 must be >= 1"),
    ("train.threads=-2", r"train.threads=-2 must be >= 0"),
    ("checkpoint.keep=-1", r"checkpoint.keep=-1 must be >= 0"),
    ("checkpoint.every=-5", r"checkpoint.every=-5 must be >= 0"),
    ("logging.every=0", r"logging.every=0 must be >= 1"),
])
def test_numbers_out_of_range_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([override]), 1)


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    no_value = {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([good, no_value, 7, {"conversations": {"from": "human"}}, good]))
    conversations, report = read_sharegpt(path)
    assert len(conversations) == 2 and report["records"] == 5
    assert report["skipped"] == {"missing_value": 1, "not_an_object": 1, "unknown_layout": 1}


def test_waiting_ranks_report_the_data_error_in_one_line(tmp_path, monkeypatch):
    """In a distributed run local rank 0 reads the data; the others see its DataError, not a RuntimeError."""
    from longctx.data import DataConfig, DataError, cache_path, prepare
    cfg = DataConfig(path=str(empty(tmp_path)), cache_dir=str(tmp_path / "cache"), prepare_timeout_s=30)
    with pytest.raises(DataError) as first:
        prepare(cfg)   # local rank 0: reads, fails, leaves the marker
    assert cache_path(cfg).with_name(cache_path(cfg).name + ".failed").is_file()
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DataError) as waiting:
        prepare(cfg)
    assert str(waiting.value) == str(first.value)
