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
    assert list((tmp_path / "runs").iterdir()) == []   # neither the job's folder nor the sweep's


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


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder the run cannot write: a read-only tmpfs where root may mount one (root ignores
    permissions), else a folder without write permission."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("root without mount: permissions cannot make a read-only folder")
    else:
        folder.chmod(0o555)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o755)


@pytest.mark.parametrize("below", ["", "a/b"], ids=["run_dir", "inside"])
def test_an_unwritable_run_dir_is_one_line_before_the_data_is_prepared(tmp_path, read_only_folder, below):
    run_dir = read_only_folder / below
    proc = cli(tmp_path, f"run_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}")
    assert_one_line_error(proc, tmp_path, f"run_dir={run_dir} is not writable", "choose a run_dir you can write")
    assert not (tmp_path / "cache").exists()   # found before the data was prepared


@pytest.mark.parametrize("resume, words", [
    ("autoo", ["train.resume=autoo: no such folder", "train.resume=auto or none"]),
    ("/no/such/step_00000010", ["train.resume=/no/such/step_00000010: no such folder"]),
])
def test_a_bad_resume_path_is_one_line_and_leaves_no_folder(tmp_path, resume, words):
    cmd = [sys.executable, "-m", "longctx.train", *SMALL, "train.steps=2", f"train.resume={resume}",
           f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert_one_line_error(proc, tmp_path, *words)   # no runs/<time> with a .lock in it
    assert not (tmp_path / "cache").exists()


def test_a_non_finite_loss_is_one_line(tmp_path):
    proc = cli(tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "train.steps=4", "checkpoint.every=1")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "is not finite (the last checkpoint is step " in last, last
    assert "set train.on_nonfinite=skip" in last


def run_module(module, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("module, usage", [
    ("longctx.train", "longctx.train"), ("longctx.check", "torchrun --nproc_per_node 4 -m longctx.check"),
    ("longctx.train.plan", "python -m longctx.train.plan"), ("longctx.data.inspect", "python -m longctx.data.inspect"),
    ("longctx.launch", "python -m longctx.launch --nproc_per_node 2"),
])
def test_every_entry_point_has_help(module, usage, tmp_path):
    proc = run_module(module, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and usage in proc.stdout and not proc.stderr.strip(), proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module, args, words", [
    ("longctx.train.plan", ["train.stepz=1"], ["train.stepz is not a setting", "did you mean train.steps?"]),
    ("longctx.train.plan", ["+train.stepz=1"], ["train.stepz is not a setting"]),
    ("longctx.train.plan", ["--gpus", "3", "parallel.sp=2", "parallel.sp_method=ring"],
     ["--gpus 3", "parallel.sp=2"]),
    ("longctx.train.plan", ["optim.lr=-1"], ["optim.lr=-1.0 must be > 0"]),
    ("longctx.data.inspect", ["path=/nope.json"], ["data.path", "/nope.json"]),
    ("longctx.data.inspect", ["sample=10000"], ["sample=10000 is out of range"]),
    ("longctx.data.inspect", ["colour=never"], ["colour"]),
])
def test_the_planner_and_the_inspector_answer_mistakes_in_one_line(module, args, words, tmp_path):
    cache = [f"data.cache_dir={tmp_path / 'cache'}"] if "inspect" in module else []
    proc = run_module(module, *args, *cache, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, output[-3000:]
    last = proc.stderr.strip()
    assert last.startswith("error: ") and "+train.stepz" not in last, last
    for word in words:
        assert word in last, last


def test_data_readme_counts_what_a_run_reports():
    """data/README.md's figures for the sample are the data report's (it said 113 where runs print 108)."""
    import re
    _, report = read_sharegpt(REPO / "data" / "sharegpt_sample.json")
    text = " ".join((REPO / "data" / "README.md").read_text().split())
    said = re.search(r"drops (\d+) leading assistant turns .*?, (\d+) empty turns, merges (\d+) repeated roles and "
                     r"skips (\d+) records with no user turn", text)
    assert [int(n) for n in said.groups()] == [report["repaired"]["leading_assistant_dropped"],
                                               report["repaired"]["empty_turn_dropped"],
                                               report["repaired"]["repeated_role_merged"],
                                               report["skipped"]["no_user_turn"]]


def test_an_unknown_role_is_reported_as_such(tmp_path):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    _, report = read_sharegpt(path)
    assert report["skipped"] == {"unknown_role": 1} and report["kept"] == 1


def test_a_missing_tokenizer_is_named_with_its_own_fix(tmp_path):
    proc = cli(tmp_path, "data.tokenizer=/nonexistent")
    assert_one_line_error(proc, tmp_path, "data.tokenizer '/nonexistent' does not exist",
                          "point it at a Hugging Face tokenizer folder")
    assert "data.path=" not in proc.stderr


@pytest.mark.parametrize("launcher", ["torch.distributed.run", "longctx.launch"])
def test_under_torchrun_the_line_appears_once(tmp_path, launcher):
    """Every rank meets the mistake; one prints it (each used to, and torchrun added ~40 lines of
    ChildFailedError). Plain torchrun's report names the line from the error file instead of "To
    enable traceback"; the longctx launcher leaves the report out."""
    cmd = [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node", "2", "-m", "longctx.train",
           *SMALL, "train.resume=/no/such/checkpoint"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert lines == ["error: train.resume=/no/such/checkpoint: no such folder; name a checkpoint folder "
                     "(<run_dir>/checkpoints/step_N), or use train.resume=auto or none"], output[-3000:]
    if launcher == "longctx.launch":
        assert output.strip() == lines[0]
    else:
        assert "To enable traceback" not in output and "traceback : error: train.resume=" in output
    assert not (tmp_path / "runs").exists()


def test_the_check_exits_cleanly_under_torchrun(tmp_path):
    """A few rounds of the exit loop (scripts/exit_loop.sh runs 50): each exits 0 after PASS, its
    process group torn down before the interpreter's exit (left to it, a worker now and then
    aborted after PASS: "terminate called without an active exception")."""
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "longctx.check", "parallel=ring", *SMALL, "data.verbose=false"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              text=True, timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "\nPASS" in output and "terminate called" not in output, output[-3000:]
