"""What a run leaves the user: clean logs with a closing summary, a Hugging Face export that
AutoTokenizer and pipeline open, sweeps in folders of their own, no orphaned workers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_train import SMALL

from longctx.train import console

TOKENS_PER_STEP = 256   # train.seq_len of SMALL, one sequence a step


def run_cli(cwd: Path, *args, launcher=("-m", "longctx.train"), timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    flags = [a for a in args if a.startswith("-")]   # Hydra takes its flags before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    proc = subprocess.run([sys.executable, *launcher, *flags, *SMALL, "data.verbose=false", *overrides],
                          cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def assert_no_noise(output: str):
    for noise in ("UserWarning", "USDT", "gpuGetDeviceCount", "STAGE:", "Traceback", "it/s]", "\r", ".tmp"):
        assert noise not in output, f"{noise!r} in the log:\n{output[-3000:]}"


def test_cli_log_summary_and_hf_export_with_tokenizer(tmp_path):
    run_dir = tmp_path / "run"
    # logging.progress_bar=true, but the output is a pipe: plain lines, no bar
    output = run_cli(tmp_path, f"run_dir={run_dir}", "train.steps=2", "logging.progress_bar=true", "logging.every=1",
                     "train.activation_checkpoint=auto")
    assert_no_noise(output)
    # every automatic setting resolved once, logged, and config.yaml records what ran
    from omegaconf import OmegaConf
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert (saved.train.device, saved.train.precision, saved.train.activation_checkpoint, saved.parallel.dp_backend) == \
        ("cpu", "fp32", "none", "none")
    assert "train.activation_checkpoint=auto -> none" in output and "train.precision=auto -> fp32" in output
    assert not any(name.startswith(".hf.") for name in output.split()), output   # the export's temporary folder
    assert "step 1 loss" in output and "step 2 loss" in output
    final_loss = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    summary = output[output.index("done: "):].splitlines()
    assert summary[0] == (f"done: steps 1-2 (2 in this run), {2 * TOKENS_PER_STEP:,} tokens in "
                          f"{summary[0].split(' tokens in ')[1].split(',')[0]}, final loss {final_loss:.4f}")
    assert summary[1] == f"  checkpoint: {run_dir / 'checkpoints' / 'step_00000002'}"
    assert summary[2] == f"  Hugging Face export: {run_dir / 'hf'}"

    import transformers
    hf = run_dir / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    eot, end = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    generation = transformers.GenerationConfig.from_pretrained(hf)
    assert set(generation.eos_token_id) == {eot, end}
    # the chat template is the format the model was trained on (data.chat_template=auto: Llama-3)
    from longctx.data.template import render_llama3
    messages = [{"role": "user", "content": "Which port?"}, {"role": "assistant", "content": "8080."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render_llama3(messages).text
    generate = transformers.pipeline("text-generation", model=str(hf), device="cpu")
    reply = generate(messages[:1], max_new_tokens=3, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


def test_two_process_run_prints_no_profiler_noise(tmp_path):
    # logging.comm_every=1: every step is profiled, which is what started Kineto's lines
    output = run_cli(tmp_path, f"run_dir={tmp_path / 'run'}", "train.steps=2", "logging.comm_every=1",
                     "logging.every=1", "checkpoint.export_hf=false",
                     launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "longctx.train"))
    assert_no_noise(output)
    assert "comm " in output and "done: steps 1-2" in output


def test_sweep_folders_name_job_and_overrides(tmp_path):
    run_cli(tmp_path, "-m", "optim.lr=1e-3,2e-3", "train.steps=1", "checkpoint.export_hf=false")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]   # no multirun.yaml here
    sweep, = (tmp_path / "runs").iterdir()
    assert sweep.name.startswith("sweep-") and (sweep / "multirun.yaml").is_file()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0-optim.lr=0.001", "1-optim.lr=0.002"]
    for job in jobs:
        assert (sweep / job / "metrics.jsonl").is_file() and (sweep / job / "config.yaml").is_file()


@pytest.mark.parametrize("enabled, terminal, wanted", [(True, True, True), (True, False, False),
                                                       (False, True, False)])
def test_progress_bar_only_on_a_terminal(monkeypatch, enabled, terminal, wanted):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert console.progress_bar_wanted(enabled) is wanted


def test_worker_exits_when_its_launcher_is_killed(tmp_path):
    """A launcher (as torchrun) that is SIGKILLed: its worker must not train on as an orphan."""
    run_dir = tmp_path / "run"
    launcher = ("import os, subprocess, sys\n"
                "child = subprocess.Popen([sys.executable, '-m', 'longctx.train', *sys.argv[1:]],\n"
                "                         env=dict(os.environ, LOCAL_RANK='0', OMP_NUM_THREADS='1'))\n"
                "print(child.pid, flush=True)\n"
                "child.wait()\n")
    parent = subprocess.Popen([sys.executable, "-c", launcher, *SMALL, f"run_dir={run_dir}", "train.steps=100000",
                               "data.verbose=false", "checkpoint.export_hf=false"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = psutil.Process(int(parent.stdout.readline()))
    try:
        deadline = time.time() + 240
        while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline:   # training
            time.sleep(0.1)
        assert alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 30
        while alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(worker), "the worker trains on after its launcher was killed"
        assert "the launcher of this worker" in parent.stderr.read()
    finally:
        if alive(worker):
            worker.kill()


def alive(process: psutil.Process) -> bool:
    """Running, not a zombie that its new parent has not reaped yet."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_export_is_readable_as_the_umask_says(tmp_path):
    """hf/ was made by mkdtemp (0700, and 0600 weights): other users of a shared cluster could not
    read it whatever the umask. Now the modes a plain mkdir and open give."""
    import stat
    from longctx.model import Llama, ModelConfig, save_hf
    model = Llama(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1))
    old = os.umask(0o022)
    try:
        save_hf(model, tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o755
    files = [p for p in (tmp_path / "hf").rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
