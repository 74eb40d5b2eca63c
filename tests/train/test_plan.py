"""The memory planner: each memory switch lowers its estimate where it should, and the CLI says
whether a config fits and what to change."""
import copy
import subprocess
import sys

from longctx.plan import estimate
from test_train import compose_config

LONG = ["model=llama3.2-1b", "train.seq_len=131072", "parallel.sp=2", "parallel.sp_method=ring"]


def total(cfg, world=2):
    return estimate(cfg, world).total


def test_each_switch_lowers_the_estimate():
    base = compose_config(LONG)
    steps = [("train", "activation_checkpoint", "full"), ("train", "activation_offload", True),
             ("model", "mlp_chunk_size", 8192), ("parallel", "dp_backend", "fsdp"),
             ("parallel", "cpu_offload", True)]
    cfg, previous = copy.deepcopy(base), total(base)
    for section, key, value in steps:
        setattr(getattr(cfg, section), key, value)
        now = total(cfg)
        assert now < previous, f"{section}.{key}={value}: {previous / 2**30:.1f} -> {now / 2**30:.1f} GiB"
        previous = now
    # sequence parallelism over more GPUs shares the activations
    wider = copy.deepcopy(cfg)
    wider.parallel.sp = 4
    assert total(wider, 4) < total(cfg, 2)


def test_cli_says_whether_it_fits_and_what_to_change():
    run = lambda *args: subprocess.run([sys.executable, "-m", "longctx.plan", *args], capture_output=True,
                                       text=True, timeout=120)
    small = run("model=llama3.2-1b", "train.seq_len=8192", "train.activation_checkpoint=full", "--gpus", "1")
    assert small.returncode == 0 and "-> fits in 80 GiB" in small.stdout, small.stdout + small.stderr
    big = run("experiment=llama3.2-1b_sharegpt_512k", "parallel=default", "data=sharegpt_sample",
              "train.seq_len=1048576", "--gpus", "1", "--gpu-gib", "80")
    assert "does NOT fit" in big.stdout and "to fit: train.activation_offload=true" in big.stdout, big.stdout
