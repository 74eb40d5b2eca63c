"""The time a training step spends waiting on communication, from a profile of one step in `every`.

DDP, FSDP2 and DeepSpeed issue their collectives internally, so they are measured from the outside,
with torch.profiler, the same way for every backend: communication counts as waiting where it is in
flight and no computation runs beside it (exposed, not overlapped).
- CUDA: the GPU timeline. Communication is the NCCL kernels (a kernel waiting for a late peer runs
  until the peer arrives); computation is every other kernel, memory copy and memset.
- CPU (gloo): the host timeline. Gloo records each collective's run (on its worker thread) and each
  send/recv from posting to the end of its wait; computation is the operators run by the threads
  that issue communication (the training threads; not gloo's workers, nor the collectives' own
  operators). The blocking waits themselves (`work.wait()`, the DDP reducer's) are not recorded,
  but they fall where gloo is in flight and the training thread runs no operator. The Python
  between two operators, while a transfer is in flight, counts as waiting too: microseconds per
  operator, which matter only for toy models.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def union(intervals) -> list[list[float]]:
    """Sorted, disjoint intervals covering the same points as `intervals` ((start, end) pairs)."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def exposed_time(comm, compute) -> float:
    """Length of the union of the `comm` intervals that no `compute` interval covers."""
    covered, exposed, first = union(compute), 0.0, 0
    for start, end in union(comm):
        exposed += end - start
        while first < len(covered) and covered[first][1] <= start:
            first += 1
        for covered_start, covered_end in covered[first:]:
            if covered_start >= end:
                break
            exposed -= min(end, covered_end) - max(start, covered_start)
    return exposed


def _is_comm_op(name: str) -> bool:
    return "c10d" in name  # c10d::allreduce_, _c10d_functional::wait_tensor, ...


def exposed_comm_seconds(events, device: torch.device) -> float:
    """Seconds of exposed communication in a profile's events (`prof.events()`)."""
    def interval(e):
        return e.time_range.start, e.time_range.end   # microseconds

    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        comm = [interval(e) for e in kernels if "nccl" in e.name.lower()]
        compute = [interval(e) for e in kernels if "nccl" not in e.name.lower()]
    else:
        comm = [interval(e) for e in events if e.name.startswith("gloo:")]
        comm_ops = [e for e in events if _is_comm_op(e.name)]
        # an operator that issues or waits on communication inside (a ring attention forward, a
        # DTensor norm that reduces) is not computation; the operators it calls still may be
        enclosing = set()
        for e in comm_ops:
            while e is not None:
                enclosing.add(id(e))
                e = e.cpu_parent
        training_threads = {e.thread for e in comm_ops}
        operators = [e for e in events if e.scope == 0 and e.device_type == DeviceType.CPU]  # RecordScope.FUNCTION
        compute = [interval(e) for e in operators if e.thread in training_threads and id(e) not in enclosing]
    return exposed_time(comm, compute) / 1e6


class CommProfiler:
    """Profiles every `every`-th step (0: none) and measures its communication wait.

        comm.start(step)
        ... the step ...
        comm_metrics = comm.stop(step_s)   # {"comm_wait_s", "comm_frac"} on a profiled step, else {}

    Every rank profiles the same steps: a rank slowed by its profiler alone would make the others
    wait for it and measure less wait itself. No collective is involved.
    """

    def __init__(self, every: int, device: torch.device):
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.every = every if distributed else 0   # a single process has nothing to wait for
        self.device = device
        self.profiler: Optional[profile] = None

    def start(self, step: int) -> None:
        if self.every and step % self.every == 0:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()

    def stop(self, step_s: float) -> dict:
        if self.profiler is None:
            return {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # the step's kernels finish inside the profile
        self.profiler.stop()
        wait_s = exposed_comm_seconds(self.profiler.events(), self.device)
        self.profiler = None
        return {"comm_wait_s": wait_s, "comm_frac": wait_s / step_s}
