"""The training runtime end to end on CPU: loss goes down, exact resume after SIGKILL under
torchrun, config errors, offline wandb, Hugging Face export."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from longctx.train.config import REPO_ROOT, ConfigError, register_configs, validate
from longctx.train.train import train

CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
# a smaller model than the default `tiny`, so that each run takes seconds
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "train.seq_len=256",
         "logging.progress_bar=false", "train.threads=1"]


def compose_config(overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def losses(run_dir) -> dict:
    """step -> loss; a step logged twice (run killed after logging it) keeps its last record."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def test_loss_goes_down_and_export_loads_in_transformers(tmp_path):
    cfg = compose_config(SMALL + [f"run_dir={tmp_path}/run", "train.steps=25", "optim.warmup_steps=3"])
    run_dir = train(cfg)
    by_step = losses(run_dir)
    assert sorted(by_step) == list(range(1, 26))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the logged rate is the one the step's update used: a third of it in the first warmup step
    assert [r["lr"] / cfg.optim.lr for r in records[:4]] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    first, last = sum(by_step[s] for s in (1, 2, 3)) / 3, sum(by_step[s] for s in (23, 24, 25)) / 3
    assert last < first - 1.0, f"loss did not go down: {first:.3f} -> {last:.3f}"
    # tok/s counts each step's data tokens, not the padding that fills the rows
    from longctx.data import build_loader
    loader = build_loader(cfg.data, seq_len=cfg.train.seq_len, micro_batch=cfg.train.micro_batch,
                          seed=cfg.train.seed, grad_accum=cfg.train.grad_accum)
    data = [sum(int(next(loader)["num_tokens"]) for _ in range(cfg.train.grad_accum)) for _ in records]
    assert [r["tok_s"] * r["step_s"] for r in records] == pytest.approx(data)
    import transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(run_dir / "hf")
    assert hf.config.num_hidden_layers == 2 and hf.config.tie_word_embeddings
    ids = torch.randint(0, 1000, (1, 16))
    from longctx.model import load_hf
    ours = load_hf(run_dir / "hf", attention="sdpa")
    torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids).logits, atol=1e-4, rtol=0)


def torchrun(run_dir, steps, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "longctx.train", f"run_dir={run_dir}", f"train.steps={steps}", "checkpoint.every=2",
           "checkpoint.export_hf=false", "optim.warmup_steps=2", *SMALL, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_all(proc, sig, workers_only=False):
    """Signal torchrun and every worker (torchrun starts its workers in sessions of their own)."""
    import psutil
    launcher = psutil.Process(proc.pid)
    for p in ([] if workers_only else [launcher]) + launcher.children(recursive=True):
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_process_run_killed_and_resumed_gives_identical_losses(tmp_path):
    straight = tmp_path / "straight"
    finish(torchrun(straight, 6))
    interrupted = tmp_path / "interrupted"
    proc = torchrun(interrupted, 6)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill the whole process group once step 3 is logged
        if (interrupted / "metrics.jsonl").is_file() and len(losses(interrupted)) >= 3:
            break
        time.sleep(0.05)
    kill_all(proc, signal.SIGKILL)
    proc.wait()
    assert (interrupted / "checkpoints" / "latest").read_text() == "step_00000002"
    out = finish(torchrun(interrupted, 6))
    assert "resumed from" in out and "step 2" in out
    assert losses(interrupted) == losses(straight)  # bitwise on CPU


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = torchrun(tmp_path, 500)
    deadline = time.time() + 240
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").is_file() and losses(tmp_path)):
        time.sleep(0.05)
    kill_all(proc, signal.SIGTERM, workers_only=True)  # a scheduler preempting the job signals every process
    out = finish(proc)
    assert "SIGTERM: saved a checkpoint" in out
    step = max(losses(tmp_path))
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{step:08d}"


@pytest.mark.parametrize("overrides, world, message", [
    (["train.seq_len=1002", "parallel.sp=2", "parallel.sp_method=ring"], 2,
     "train.seq_len=1002 is not a multiple of 4"),
    (["parallel.sp=3", "parallel.sp_method=ring"], 4, "parallel.sp=3 must divide the number of processes"),
    (["parallel.dp=3"], 2, r"parallel.dp \(3\) x parallel.sp \(1\) = 3 must equal the number of processes \(2\)"),
    (["data.path=/no/such/file.json"], 1, "/no/such/file.json"),
    (["train.precision=fp8"], 1, "train.precision='fp8': choose one of"),
    (["parallel.lasp_variant=allgather"], 1, "parallel.lasp_variant=allgather is gone: the variant is the method now, "
                                             "set parallel.sp_method=lasp"),
    (["train.activation_offload=true"], 1, "set train.activation_checkpoint=full"),
    (["logging.comm_every=-1"], 1, r"logging.comm_every=-1 must be >= 0"),
])
def test_config_errors_name_the_problem(overrides, world, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_unknown_key_is_rejected_by_the_cli():
    proc = subprocess.run([sys.executable, "-m", "longctx.train", "train.sequence_len=5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "sequence_len" in proc.stderr


def test_offline_wandb_writes_its_run_files(tmp_path):
    cfg = compose_config(SMALL + [f"run_dir={tmp_path}", "train.steps=2", "logging.wandb=offline",
                                  "checkpoint.at_end=false", "checkpoint.export_hf=false"])
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].rglob("*.wandb"))


def test_auto_checkpointing_runs_without_recompute_on_a_cpu(tmp_path):
    cfg = compose_config(SMALL + [f"run_dir={tmp_path}", "train.steps=1", "train.activation_checkpoint=auto",
                                  "checkpoint.at_end=false", "checkpoint.export_hf=false"])
    train(cfg)
    assert cfg.train.activation_checkpoint == "none" and sorted(losses(tmp_path)) == [1]


def test_runs_without_run_dir_get_folders_of_their_own(tmp_path, monkeypatch):
    """Two runs started in the same second (the jobs of a sweep) must not share a folder, or the
    second would resume the first's checkpoint."""
    from longctx.train.train import decide_run_dir
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([])
    (first, first_lock), (second, second_lock) = decide_run_dir(cfg), decide_run_dir(cfg)
    assert first != second and first.parent == second.parent == Path("runs")
    assert (first / ".lock.owner").is_file() and (second / ".lock.owner").is_file()   # each run holds its own
    first_lock.release(), second_lock.release()


def test_max_minutes_ends_the_run_as_its_last_step(tmp_path, capsys):
    """A time budget stops at a step boundary and still saves and exports (a SIGTERM would not export)."""
    cfg = compose_config(SMALL + [f"run_dir={tmp_path}/run", "train.steps=50", "optim.warmup_steps=1",
                                  "train.max_minutes=0.0001"])
    run_dir = train(cfg)
    assert sorted(losses(run_dir)) == [1]
    assert "train.max_minutes=0.0001: stopping after step 1 of 50" in capsys.readouterr().out
    assert (run_dir / "hf" / "config.json").is_file()
    assert [int(p.name[len("step_"):]) for p in (run_dir / "checkpoints").iterdir()
            if p.name.startswith("step_")] == [1]
