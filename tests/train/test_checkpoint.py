"""The Checkpointer alone: atomic saves under SIGKILL and injected kills, manifests that catch
damage, resume points that skip it, and loads that never run code from a file."""
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from longctx.train.checkpoint import KILL_AT, KILLED_EXIT, Checkpointer, rng_state, set_rng_state
from longctx.train.integrity import CheckpointError, hash_file

SAVER = textwrap.dedent("""
    import sys, torch
    from longctx.train.checkpoint import Checkpointer
    torch.manual_seed(int(sys.argv[2]))
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(int(sys.argv[3]))])
    optimizer = torch.optim.AdamW(model.parameters())
    Checkpointer(sys.argv[1], keep=int(sys.argv[4])).save(int(sys.argv[2]), model, optimizer,
                                                          shared={"tag": sys.argv[2]}, per_rank={})
""")


def save_in_subprocess(folder, step, layers, keep=2, kill_when_started=False, kill_at=None):
    env = dict(os.environ, **({KILL_AT: f"{kill_at}@{step}"} if kill_at else {}))
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(folder), str(step), str(layers), str(keep)],
                            start_new_session=True, env=env)
    if not kill_when_started:
        assert proc.wait(timeout=300) == (KILLED_EXIT if kill_at else 0)
        return
    tmp = folder / f"step_{step:08d}.tmp"
    deadline = time.time() + 120
    while not tmp.exists() and time.time() < deadline:
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def model_of(seed, layers=2, width=2048):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def assert_holds(checkpointer, path, seed, layers=2):
    model = model_of(999, layers)
    shared, _ = checkpointer.load(path, model, torch.optim.AdamW(model.parameters()))
    assert shared["step"] == seed
    for a, b in zip(model.parameters(), model_of(seed, layers).parameters()):
        assert torch.equal(a, b)


def test_kill_mid_save_keeps_previous_checkpoint(tmp_path):
    save_in_subprocess(tmp_path, 1, layers=2)
    save_in_subprocess(tmp_path, 2, layers=2, kill_when_started=True)
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.resume_point("auto") == tmp_path / "step_00000001"
    assert not (tmp_path / "step_00000002").exists()
    assert_holds(checkpointer, tmp_path / "step_00000001", 1)
    # the next save goes through despite the half-written folder the kill left
    save_in_subprocess(tmp_path, 3, layers=2)
    assert Checkpointer(tmp_path).resume_point("auto") == tmp_path / "step_00000003"


def test_a_replaced_checkpoint_survives_a_kill_before_its_replacement_is_in_place(tmp_path):
    """Saving a step that exists (after resuming from an older one) used to delete it first: a kill
    then left `latest` dangling and resume started over."""
    save_in_subprocess(tmp_path, 1, layers=1, keep=0)
    save_in_subprocess(tmp_path, 2, layers=1, keep=0)
    (tmp_path / "latest").write_text("step_00000001")          # as a run resumed from step 1 sees it
    save_in_subprocess(tmp_path, 2, layers=1, keep=0, kill_at="displaced")
    assert not (tmp_path / "step_00000002").exists()
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.resume_point("auto") == tmp_path / "step_00000002.replaced"
    assert_holds(checkpointer, tmp_path / "step_00000002.replaced", 2, layers=1)
    save_in_subprocess(tmp_path, 2, layers=1, keep=0)           # the rerun puts it in place and cleans up
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000001", "step_00000002"]


def test_a_kill_between_rename_and_pointer_resumes_from_the_new_checkpoint(tmp_path):
    save_in_subprocess(tmp_path, 1, layers=1)
    save_in_subprocess(tmp_path, 2, layers=1, kill_at="renamed")
    assert (tmp_path / "latest").read_text() == "step_00000001"   # the pointer lags: the scan does not
    assert Checkpointer(tmp_path).resume_point("auto") == tmp_path / "step_00000002"


def test_keeps_only_the_last_n_and_drops_checkpoints_past_the_one_saved(tmp_path):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpointer = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        checkpointer.save(step, model, optimizer, shared={}, per_rank={"x": step})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    _, mine = checkpointer.load(checkpointer.resume_point("auto"), model, optimizer)
    assert mine == {"x": 4}
    # a run resumed from step 3 saves step 4 again: the old one is replaced, never merely deleted
    checkpointer.save(4, model, optimizer, shared={}, per_rank={"x": 44})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert checkpointer.load(tmp_path / "step_00000004", model, optimizer)[1] == {"x": 44}
    # a run resumed from step 3 that saves at 3.5 (say every_minutes) leaves no step 4 behind
    (tmp_path / "step_00000004").rename(tmp_path / "step_00000005")
    checkpointer.save(4, model, optimizer, shared={}, per_rank={})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]


def flip(path, count=4096):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(max(0, middle - count // 2), min(len(data), middle + count // 2)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def saved_twice(tmp_path):
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpointer = Checkpointer(tmp_path, keep=2)
    for step in (1, 2):
        checkpointer.save(step, model, optimizer, shared={"s": step}, per_rank={"r": step})
    return model, optimizer


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "meta.pt", "rank0.pt", "manifest.json"])
@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing"])
def test_damage_to_any_file_falls_back_to_the_previous_checkpoint(tmp_path, capsys, name, damage):
    model, optimizer = saved_twice(tmp_path)
    bad = tmp_path / "step_00000002" / name
    if damage == "flipped":
        flip(bad)
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    else:
        bad.unlink()
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.resume_point("auto") == tmp_path / "step_00000001"
    warning = capsys.readouterr().err
    assert str(bad) in warning and "not resuming from" in warning
    with pytest.raises(CheckpointError, match=f"train.resume=.*{name}"):   # a named checkpoint: no fallback
        checkpointer.resume_point(str(tmp_path / "step_00000002"))
    with pytest.raises(CheckpointError, match=name):                       # nor a direct load
        checkpointer.load(tmp_path / "step_00000002", model, optimizer)


def test_no_intact_checkpoint_is_one_error_not_a_fresh_start(tmp_path):
    saved_twice(tmp_path)
    for step in (1, 2):
        flip(tmp_path / f"step_{step:08d}" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints .* is intact .*train.resume=none"):
        Checkpointer(tmp_path).resume_point("auto")
    assert Checkpointer(tmp_path / "empty").resume_point("auto") is None


def test_a_dangling_pointer_is_ignored(tmp_path):
    saved_twice(tmp_path)
    (tmp_path / "latest").write_text("step_00000099")
    assert Checkpointer(tmp_path).resume_point("auto") == tmp_path / "step_00000002"


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this ran",))


def rewrite_manifest(folder, name):
    """What someone handing over a crafted checkpoint would do: matching checksums."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = list(hash_file(folder / name))
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["meta.pt", "rank0.pt", ".metadata"])
def test_a_file_that_would_run_code_is_refused_with_one_line(tmp_path, name):
    model, optimizer = saved_twice(tmp_path)
    folder = tmp_path / "step_00000002"
    if name == ".metadata":
        (folder / name).write_bytes(pickle.dumps(RunsCode()))
    else:
        torch.save({"step": 2, "world_size": 1, "payload": RunsCode()}, folder / name)
    rewrite_manifest(folder, name)
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.resume_point("auto") == folder          # the checksums match: only loading can tell
    with pytest.raises(CheckpointError, match=f"{name} holds objects that would run code") as error:
        checkpointer.load(folder, model, optimizer)
    assert "\n" not in str(error.value)


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random
    import numpy as np
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and (expected[2] == again[2]).all()


def deepspeed_worker(rank, world_size, folder):
    """A ZeRO-2 engine saved through the Checkpointer, loaded back into a fresh one, then crafted
    optimizer files (checksums matching) refused."""
    from longctx.parallel import data_parallel
    folder = Path(folder)

    def engine(seed):
        model = model_of(seed, layers=2, width=16)
        config = data_parallel.deepspeed_config(2, micro_batch=1, grad_accum=1, precision="fp32", grad_clip=1.0)
        return data_parallel.build_deepspeed(model, torch.optim.AdamW(model.parameters(), lr=0.1), config)
    saved = engine(1)
    saved.backward(saved(torch.ones(4, 16)).square().sum())
    saved.step()
    checkpointer = Checkpointer(folder)
    checkpointer.save(1, saved, saved.optimizer, shared={}, per_rank={"rank": rank})
    manifest = json.loads((folder / "step_00000001" / "manifest.json").read_text())["files"]
    loaded = engine(2)
    shared, mine = Checkpointer(folder).load(checkpointer.resume_point("auto"), loaded, loaded.optimizer)
    same = all(torch.equal(a, b) for a, b in zip(saved.module.parameters(), loaded.module.parameters()))
    dist.barrier()
    if rank == 0:   # every rank's optimizer file: each rank reads its own
        for crafted in (folder / "step_00000001").glob("*optim_states.pt"):
            state = torch.load(crafted, weights_only=False)
            state["payload"] = RunsCode()
            torch.save(state, crafted)
            rewrite_manifest(crafted.parent, crafted.name)
    dist.barrier()
    try:
        Checkpointer(folder).load(folder / "step_00000001", engine(3), None)
        refusal = None
    except CheckpointError as error:
        refusal = str(error)
    return {"files": sorted(manifest), "step": shared["step"], "mine": mine, "same": same, "refusal": refusal}


def test_deepspeed_checkpoints_get_a_manifest_and_load_without_running_code(tmp_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results = run_distributed(deepspeed_worker, 2, str(tmp_path))
    files = results[0]["files"]
    assert any(f.endswith("optim_states.pt") for f in files) and any(f.endswith("model_states.pt") for f in files)
    for rank, result in enumerate(results):
        assert result["step"] == 1 and result["mine"] == {"rank": rank} and result["same"]
        assert "optim_states.pt holds objects that would run code" in result["refusal"]


def test_a_named_checkpoint_that_is_not_a_folder_is_named_so(tmp_path):
    with pytest.raises(CheckpointError, match=r"train.resume=.*nowhere: .*nowhere is not a folder: name a checkpoint"):
        Checkpointer(tmp_path).resume_point(str(tmp_path / "nowhere"))
