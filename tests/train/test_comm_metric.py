"""The communication wait metric: the interval arithmetic, real gloo waits measured by the
profiler (a rank arriving late makes the other wait; computation overlapping a transfer is not
waiting), and comm_wait_s in metrics.jsonl on the profiled steps of a two-process run."""
import json
import time

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from longctx.train.comm import CommProfiler, exposed_time

LATE_S = 0.3        # how late the late rank arrives
COMPUTE_S = 0.15    # computation between posting a ring exchange and waiting on it


@pytest.mark.parametrize("comm, compute, expected", [
    ([(0, 10)], [], 10),
    ([(0, 10)], [(2, 5)], 7),                        # compute nested in communication
    ([(2, 5)], [(0, 10)], 0),                        # communication nested in compute
    ([(0, 10)], [(5, 15)], 5),                       # overlapping
    ([(0, 10)], [(10, 20), (-5, 0)], 10),            # touching, not overlapping
    ([(0, 4), (2, 6), (8, 10)], [(3, 9)], 4),        # overlapping communication counted once
    ([(0, 10), (20, 30)], [(1, 2), (3, 4), (25, 40)], 13),
    ([(0, 10)], [(1, 3), (2, 4), (6, 7)], 6),        # overlapping compute counted once
    ([], [(0, 10)], 0),
], ids=["alone", "compute-inside", "comm-inside", "overlap", "touching", "comm-union", "disjoint",
        "compute-union", "no-comm"])
def test_exposed_time(comm, compute, expected):
    assert exposed_time(comm, compute) == expected


def compute_for(seconds: float) -> None:
    a = torch.randn(128, 128)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.tanh(a @ a, out=a)


def _measure_waits():
    from longctx.parallel.ring import RingComm
    ring = RingComm(None, "cpu")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
    x = torch.randn(8, 64)

    def all_reduce():
        dist.all_reduce(torch.ones(4))

    def ddp_backward():
        model(x).sum().backward()

    def ring_exchange():
        send = torch.ones(4)
        works = ring.exchange(send, torch.empty_like(send))
        compute_for(COMPUTE_S)
        for work in works:
            work.wait()

    profiler = CommProfiler(every=1, device=torch.device("cpu"))
    waits = {}
    for name, run in [("all_reduce", all_reduce), ("ddp", ddp_backward), ("ring", ring_exchange)]:
        run()   # warm up (DDP rebuilds its buckets after the first backward)
        for late in (False, True):
            dist.barrier()
            start = time.perf_counter()
            profiler.start(step=1)
            if late and dist.get_rank() == 1:
                time.sleep(LATE_S)
            run()
            waits[name, late] = profiler.stop(time.perf_counter() - start)["comm_wait_s"]
    return waits


def _worker(rank, world_size, run_dir):
    from test_train import SMALL, compose_config
    from longctx.train.train import train
    waits = _measure_waits()
    train(compose_config(SMALL + [f"run_dir={run_dir}", "train.steps=2", "logging.comm_every=2",
                                  "checkpoint.at_end=false", "checkpoint.export_hf=false"]))
    return waits


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One two-process job (spawning is the slow part): every rank's measured waits, and the run
    folder of a short training run with a profiled step."""
    run_dir = tmp_path_factory.mktemp("run")
    return run_distributed(_worker, 2, str(run_dir)), run_dir


def test_late_rank_makes_the_other_wait(two_ranks):
    waits, _ = two_ranks
    rank0 = waits[0]
    for name in ("all_reduce", "ddp"):
        assert rank0[name, True] >= LATE_S - 0.05, waits
        assert rank0[name, False] < LATE_S / 4, waits
    # the ring exchange was in flight while rank 0 computed: only the rest of the delay is waiting
    assert LATE_S - COMPUTE_S - 0.05 <= rank0["ring", True] <= LATE_S - 0.05, waits
    assert rank0["ring", False] < COMPUTE_S / 2, waits
    # the late rank itself waited for nobody
    assert all(waits[1][name, True] < LATE_S / 4 for name in ("all_reduce", "ddp", "ring")), waits


def test_metrics_have_comm_wait_on_profiled_steps(two_ranks):
    _, run_dir = two_ranks
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert "comm_wait_s" not in records[0] and "comm_frac" not in records[0]
    profiled = records[1]
    assert 0 < profiled["comm_wait_s"] < profiled["step_s"]
    assert profiled["comm_frac"] == pytest.approx(profiled["comm_wait_s"] / profiled["step_s"])
