"""The registry of sequence-parallel methods: one record per method, read by everything else.

A method (ring attention, LASP, Ulysses, ...) is one `SequenceMethod` record, registered by the
module that implements it with `register_method`. The mesh (`ParallelDims`), the trainer's batch
split, the model's token mixers, the memory planner, evaluation and the config checks read the
record; none of them matches a method's name. Adding a method is one new file in
`longctx/parallel/` that calls `register_method` (found by `methods()`), plus its tests.

What a record says:
- `softmax` / `linear`: the names of the token mixers (registered with `longctx.model.attention`)
  that run the model's softmax and linear-attention layers on this method's shards; None when the
  method cannot run that kind of layer (a one-line config error names the methods that can).
- `split` / `gather`: this rank's share of a sequence and the whole sequence back, given the
  `ParallelDims` (its groups); `divisor(dims)`: what a sequence length must be a multiple of.
- `groups(dims)`: the process group(s) its mixers take, made from the device mesh once.
- `check(dims, model_config)`: head and size constraints, raising ValueError with one line.
- `memory(m, tokens, a, dims)`: its own buffers for the memory planner, {name: bytes per rank}.
- `needs_kernel`: it has no PyTorch path, so a CPU run without TRITON_INTERPRET=1 is a config error
  (no method sets it since softmax attention runs through the seam, whose `torch` backend runs
  anywhere).
- `reads`: the `parallel.*` sizes besides `sp` it takes (USP: "ulysses"); another method given one
  of them is a config error rather than a silently ignored key.
- `bytes_per_layer(m, seqlen, a, dims, kind)`: bytes one rank sends per layer of `kind`
  ("softmax" or "linear") in a forward and backward, for a sequence of `seqlen` tokens.
Shape arguments `m` are anything with the fields of `longctx.model.ModelConfig`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional

_METHODS: dict[str, "SequenceMethod"] = {}
_DISCOVERED: list[bool] = []   # non-empty once the package's modules have been imported


def _no_check(dims, model_config) -> None:
    return None


def _no_memory(m, tokens, a, dims) -> dict:
    return {}


@dataclass(frozen=True)
class SequenceMethod:
    name: str
    summary: str                       # one line: what it does and when to pick it
    softmax: Optional[str]             # mixer name for softmax layers, or None
    linear: Optional[str]              # mixer name for linear-attention layers, or None
    split: Callable                    # split(x, dims, dim) -> this rank's share
    gather: Callable                   # gather(local, dims, dim) -> the whole sequence (not differentiable)
    divisor: Callable                  # divisor(dims) -> int
    groups: Callable                   # groups(dims) -> what the mixers take as `group`
    bytes_per_layer: Callable          # bytes_per_layer(m, seqlen, a, dims, kind) -> float
    check: Callable = _no_check        # check(dims, model_config) raises ValueError (one line)
    memory: Callable = _no_memory      # memory(m, tokens, a, dims) -> {part: bytes}
    reads: tuple = ()                  # the parallel.* sizes besides sp it reads (e.g. "ulysses")
    needs_kernel: bool = False         # runs Triton kernels only (no PyTorch path): CUDA, or the interpreter

    def mixer_for(self, kind: str) -> Optional[str]:
        return self.softmax if kind == "softmax" else self.linear


def register_method(method: SequenceMethod) -> SequenceMethod:
    _METHODS[method.name] = method
    return method


def methods() -> dict[str, SequenceMethod]:
    """Every registered method by name, after importing the modules of `longctx.parallel` (each
    method's module registers its record when imported)."""
    if not _DISCOVERED:
        import longctx.parallel as package
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
        _DISCOVERED.append(True)
    return dict(_METHODS)


def get_method(name: str) -> SequenceMethod:
    known = methods()
    if name not in known:
        raise ValueError(f"parallel.sp_method={name!r}: choose one of none, {', '.join(sorted(known))}")
    return known[name]


def methods_for(kind: str) -> list[str]:
    """The methods that can run layers of `kind` ("softmax" or "linear")."""
    return sorted(name for name, method in methods().items() if method.mixer_for(kind))


def check_model(method: SequenceMethod, dims, model_config) -> None:
    """The method runs every kind of layer the model has, and its own constraints hold."""
    kinds = {model_config.layer_type(i) for i in range(model_config.num_hidden_layers)}
    for kind in sorted(kinds):
        if method.mixer_for(kind) is None:
            raise ValueError(f"parallel.sp_method={method.name} cannot run the model's {kind} attention layers: "
                             f"use one of {', '.join(methods_for(kind))}")
    method.check(dims, model_config)
