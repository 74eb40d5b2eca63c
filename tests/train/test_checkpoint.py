"""Checkpoints are atomic: a SIGKILL in the middle of a save leaves the previous one loadable."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from longctx.train.checkpoint import Checkpointer

SAVER = textwrap.dedent("""
    import sys, torch
    from longctx.train.checkpoint import Checkpointer
    torch.manual_seed(int(sys.argv[2]))
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(int(sys.argv[3]))])
    optimizer = torch.optim.AdamW(model.parameters())
    Checkpointer(sys.argv[1]).save(int(sys.argv[2]), model, optimizer, shared={"tag": sys.argv[2]}, per_rank={})
""")


def save_in_subprocess(folder, step, layers, kill_when_started=False):
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(folder), str(step), str(layers)],
                            start_new_session=True)
    if not kill_when_started:
        assert proc.wait(timeout=300) == 0
        return
    tmp = folder / f"step_{step:08d}.tmp"
    deadline = time.time() + 120
    while not tmp.exists() and time.time() < deadline:
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_mid_save_keeps_previous_checkpoint(tmp_path):
    save_in_subprocess(tmp_path, 1, layers=2)
    save_in_subprocess(tmp_path, 2, layers=2, kill_when_started=True)
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.latest() == tmp_path / "step_00000001"
    assert not (tmp_path / "step_00000002").exists()
    torch.manual_seed(1)
    expected = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(2)])
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(2)])
    optimizer = torch.optim.AdamW(model.parameters())
    shared, _ = checkpointer.load(checkpointer.latest(), model, optimizer)
    assert shared["tag"] == "1" and shared["step"] == 1
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)
    # the next save goes through despite the half-written folder the kill left
    save_in_subprocess(tmp_path, 3, layers=2)
    assert Checkpointer(tmp_path).latest() == tmp_path / "step_00000003"


def test_keeps_only_the_last_n(tmp_path):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpointer = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        checkpointer.save(step, model, optimizer, shared={}, per_rank={"x": step})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    _, mine = checkpointer.load(checkpointer.latest(), model, optimizer)
    assert mine == {"x": 4}
