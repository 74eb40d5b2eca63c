"""AdamW with its fp32 master weights and moments in host memory, stepped on the CPU in chunks.

    model = Llama(config).cuda(); bf16_parameters(model)          # bf16 weights on the GPU (parallelize.py)
    optimizer = OffloadedAdamW(groups, lr=..., betas=..., eps=..., weight_decay=...)
    loss.backward(); clip_grad_norm_(...)                         # bf16 gradients, norm on the GPU
    optimizer.step()                                              # the update on the CPU, streamed

What stays on the GPU: the bf16 weights and their bf16 gradients (2 + 2 bytes a parameter). What
lives on the host: an fp32 master copy of each weight and AdamW's two fp32 moments (12 bytes a
parameter, 96 GB for 8B parameters), plus a few fixed pinned buffers. There is no host copy of
all the gradients: they are streamed through the buffers, one chunk of `chunk_size` elements at a
time. For each chunk, in a pipeline `depth` chunks deep:

    side stream:  gradient chunk i+depth  GPU -> pinned buffer          (D2H)
    CPU:          chunk i: bf16 -> fp32, fused AdamW on master/moments, fp32 -> bf16 pinned buffer
    side stream:  updated bf16 chunk i  pinned buffer -> the GPU weight  (H2D)

so the copies both ways run under the CPU's arithmetic, and the compute stream waits only once,
at the end of the step. Gradient clipping stays the train step's (`clip_grad_norm_` on the GPU,
before `step`), as with every other backend.

On the H200 machine (16 cores) the step of the 8B shape takes 3.4-3.5 s, 4-14 % of a training
step at 64K-512K tokens (bench/results/train_8b_h200.json, `optim_ms`).

Why not the libraries: DeepSpeed's ZeRO-Offload steps with its compiled CPU Adam (`cpu_adam`, a
C++/AVX extension built at install or first use), which the GPU image, where nothing can be
installed and DeepSpeed comes as a wheel built with DS_BUILD_OPS=0, is not known to build; FSDP2's
`CPUOffloadPolicy` moves the fp32 gradients to the host as whole tensors (32 GB more host memory
for 8B parameters, beyond the 128 GiB the one-GPU machine has once the 96 GB of state are there)
and keeps fp32 parameters on the host for every forward. This optimizer needs neither: torch's
own fused CPU AdamW kernel does the arithmetic.

It is a `torch.optim.Optimizer` over the GPU parameters: `state[param]` holds `master`, `exp_avg`,
`exp_avg_sq` (host fp32) and `step`, so `state_dict()`, DCP's `get_state_dict` and the
Checkpointer save and load it as any AdamW (the master weights travel with the optimizer state;
`load_state_dict` copies into the host tensors instead of moving them to the parameters' device,
and puts the loaded masters' bf16 rounding back into the GPU weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.adamw import adamw


CHUNK_SIZE = 1 << 25   # elements a chunk: 64 MiB of bf16 per pinned buffer, 128 MiB of fp32 scratch
DEPTH = 2              # chunks in flight each way


@dataclass
class _Chunk:
    param: torch.Tensor
    group: dict
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class OffloadedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, chunk_size: int = CHUNK_SIZE, depth: int = DEPTH):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.chunk_size, self.depth = chunk_size, depth
        self._chunks = []
        for group in self.param_groups:
            for param in group["params"]:
                if not param.is_contiguous():
                    raise ValueError("OffloadedAdamW streams parameters as flat chunks: they must be contiguous")
                self.state[param] = self._new_state(param)
                self._chunks += [_Chunk(param, group, start, min(start + chunk_size, param.numel()))
                                 for start in range(0, param.numel(), chunk_size)]
        device = self.param_groups[0]["params"][0].device
        self._cuda = device.type == "cuda"
        largest = max((c.size for c in self._chunks), default=0)
        dtype = self.param_groups[0]["params"][0].dtype
        if any(p.dtype != dtype or p.device != device for g in self.param_groups for p in g["params"]):
            raise ValueError("OffloadedAdamW streams one dtype from one device (bf16 weights on the GPU): "
                             "cast the model first (parallelize.bf16_parameters)")
        # `depth` slots each way; on a CPU (the tests) the same pipeline runs with plain tensors
        self._grads_in = [torch.empty(largest, dtype=dtype, pin_memory=self._cuda) for _ in range(depth)]
        self._weights_out = [torch.empty(largest, dtype=dtype, pin_memory=self._cuda) for _ in range(depth)]
        self._grad32 = torch.empty(largest, dtype=torch.float32)
        self._stream = torch.cuda.Stream(device) if self._cuda else None

    @staticmethod
    def _new_state(param) -> dict:
        # pageable host memory: 12 bytes a parameter is too much to pin, and only the pinned
        # buffers take part in the asynchronous copies
        master = torch.empty(param.shape, dtype=torch.float32)
        master.copy_(param.detach())
        return {"step": torch.zeros((), dtype=torch.float32), "master": master,
                "exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}

    def host_bytes(self) -> int:
        """Host memory held: master weights, moments and the pinned buffers."""
        state = sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values())
        buffers = self._grads_in + self._weights_out + [self._grad32]
        return state + sum(b.numel() * b.element_size() for b in buffers)

    # -- the copies of the pipeline (the side stream on a GPU; plain copies on a CPU) ------------
    def _copy(self, destination, source):
        """Start copying on the side stream; returns the event that marks its end (None on a CPU)."""
        if not self._cuda:
            destination.copy_(source)
            return None
        with torch.cuda.stream(self._stream):
            destination.copy_(source, non_blocking=True)
            return self._stream.record_event()

    def _fetch_gradient(self, chunks, i, arrived):
        c = chunks[i]
        arrived[i % self.depth] = self._copy(self._grads_in[i % self.depth][:c.size],
                                             c.param.grad.view(-1)[c.start:c.end])

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("OffloadedAdamW.step takes no closure")
        chunks = [c for c in self._chunks if c.param.grad is not None]
        if self._cuda:   # the gradients were written by the backward on the compute stream
            self._stream.wait_stream(torch.cuda.current_stream())
        arrived, sent = [None] * self.depth, [None] * self.depth
        for i in range(min(self.depth, len(chunks))):
            self._fetch_gradient(chunks, i, arrived)
        for i, c in enumerate(chunks):
            slot = i % self.depth
            if arrived[slot] is not None:
                arrived[slot].synchronize()
            grad = self._grad32[:c.size]
            grad.copy_(self._grads_in[slot][:c.size])
            if i + self.depth < len(chunks):   # the slot is free again: the next copy runs under the math
                self._fetch_gradient(chunks, i + self.depth, arrived)
            state, group = self.state[c.param], c.group
            master, exp_avg, exp_avg_sq = (state[k].view(-1)[c.start:c.end] for k in ("master", "exp_avg", "exp_avg_sq"))
            # the fused kernel counts the step itself: each chunk of a parameter gets its own count
            # from the step before this one; the parameter's count moves on after its last chunk
            adamw([master], [grad], [exp_avg], [exp_avg_sq], [], [state["step"].clone()], fused=True,
                  amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            if c.end == c.param.numel():
                state["step"] += 1
            if sent[slot] is not None:
                sent[slot].synchronize()   # the buffer's previous chunk has reached the GPU
            out = self._weights_out[slot][:c.size]
            out.copy_(master)
            sent[slot] = self._copy(c.param.view(-1)[c.start:c.end], out)
        if self._cuda:
            torch.cuda.current_stream().wait_stream(self._stream)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Copy a saved state into the host tensors (torch's loader would move them to the GPU),
        the hyperparameters into the groups, and the masters' bf16 rounding into the weights."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError("the saved optimizer state has other parameter groups than this model")
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            for index, param in zip(saved["params"], group["params"]):
                for key, value in state_dict["state"][index].items():
                    mine = self.state[param][key]
                    if mine.data_ptr() != value.data_ptr():   # DCP loads into these very tensors
                        mine.copy_(value)
                param.copy_(self.state[param]["master"])
