"""Beyond one machine: two torchrun agents with c10d rendezvous (as on two nodes, here over
loopback with gloo) train a few steps with USP laid out so that each Ulysses group stays inside a
"node" and the ring crosses them; the losses equal one process training on the same data."""
import os
import socket
import subprocess
import sys

import pytest

from test_train import SMALL, compose_config, losses
from longctx.train.config import REPO_ROOT

STEPS = 3
# sp = 4 = Ulysses 2 (the two processes of one agent) x ring 2 (across the agents)
RUN = SMALL + [f"train.steps={STEPS}", "train.precision=fp32", "train.device=cpu", "model.attention=sdpa",
               "optim.warmup_steps=1", "checkpoint.at_end=false", "checkpoint.export_hf=false"]
USP = ["parallel.sp=4", "parallel.sp_method=usp", "parallel.ulysses=2", "parallel.dp_backend=ddp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent(port: int, run_dir) -> subprocess.Popen:
    """One node's launcher: what each node of a real job runs (with the first node's address)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "multinode-test",
           "-m", "longctx.train", f"run_dir={run_dir}", *RUN, *USP]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO_ROOT)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_agents_train_usp_like_one_process(tmp_path):
    from longctx.train.train import train
    port = _free_port()
    agents = [agent(port, tmp_path / "usp") for _ in range(2)]
    outputs = []
    for proc in agents:
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in agents:
                p.kill()
            pytest.fail("the two agents did not finish in 10 minutes")
        outputs.append(out)
        assert proc.returncode == 0, out[-3000:]
    train(compose_config(RUN + [f"run_dir={tmp_path / 'one'}"]))
    usp, one = losses(tmp_path / "usp"), losses(tmp_path / "one")
    assert sorted(usp) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(usp[step] - one[step]) <= 1e-5 * abs(one[step]), (step, usp, one)
