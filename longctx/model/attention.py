"""The token mixers the model picks by name.

Softmax attention functions take `q` (B, S, H, D), `k`, `v` (B, S, Hkv, D) and return (B, S, H, D),
always causal (this is a decoder):

    fn(q, k, v, *, cu_seqlens=None, max_seqlen=None, softmax_scale=None) -> out

`cu_seqlens` (int32, starts of documents plus the total) describes the packed documents of the
whole flattened (B*S) sequence. A function that runs on a shard of the sequence (ring attention)
knows its own layout; the model passes it the same arguments, and `group=` (the process group(s)
it runs over, set on the layer by `longctx.parallel`).

Linear attention functions (used by `LinearAttention` layers) take q, k (B, S, H, Dk), v (B, S, H, Dv)
and a per-head decay (H,) >= 0:

    fn(q, k, v, decay, *, cu_seqlens=None) -> out      (sequence-parallel ones: and group=)

Softmax attention itself runs through the seam of `longctx.ops.attention.backends`: `config.attention`
names a backend (`auto`, `triton`, `cudnn`, `torch`, or the aliases `flash` = triton and `sdpa` =
cuDNN where it runs), and `softmax_attention` runs it over whole sequences. A
sequence-parallel method of `longctx.parallel` registers its mixers here when imported (so the model
never imports parallel code); `apply_sequence_parallel` names the method's mixer on each layer
(`sequence_mixer`), and the mixer is called with `backend=config.attention`: the user's backend
choice holds under every method. A name registered here that is not a backend (a test's spy) is
called as it is. The model registers the linear mixer `lightning`.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from longctx.ops.attention import backends as seam

_SOFTMAX: dict[str, Callable] = {}
_LINEAR: dict[str, Callable] = {}


def register_attention(name: str, fn: Callable | None = None):
    """Register a softmax attention function under `name` (usable as a decorator)."""
    def add(f):
        _SOFTMAX[name] = f
        return f
    return add(fn) if fn is not None else add


def register_linear_attention(name: str, fn: Callable | None = None):
    """Register a linear attention function under `name` (usable as a decorator)."""
    def add(f):
        _LINEAR[name] = f
        return f
    return add(fn) if fn is not None else add


def _lookup(table: dict, name: str, kind: str) -> Callable:
    if name not in table:
        raise KeyError(f"unknown {kind} attention {name!r}: registered are {sorted(table)}; the sequence-"
                       f"parallel ones come with longctx.parallel (set parallel.sp_method, or call "
                       f"longctx.parallel.parallelize.apply_sequence_parallel)")
    return table[name]


def get_attention(name: str) -> Callable:
    return _lookup(_SOFTMAX, name, "softmax")


def is_registered(name: str) -> bool:
    """Whether `name` is a registered softmax mixer (a sequence-parallel method's, or a test's)."""
    return name in _SOFTMAX


def check_attention(name: str, sequence_parallel: bool = False) -> None:
    """One line for a `model.attention` that names no backend (nor, without sequence parallelism,
    a registered mixer): called when the config is validated, before anything runs."""
    if name in seam.names() or (not sequence_parallel and name in _SOFTMAX):
        return
    what = ("the backend the sequence-parallel method runs its attention on" if sequence_parallel
            else "the attention backend")
    raise ValueError(f"model.attention={name!r} is not {what}: choose one of {', '.join(seam.names())} "
                     f"(flash = triton; sdpa = cudnn where it runs; auto picks by shape)")


def get_linear_attention(name: str) -> Callable:
    return _lookup(_LINEAR, name, "linear")


# id(cu_seqlens tensor) -> (weak reference, version, {key: value}): see per_step
_PER_STEP: dict = {}


def per_step(cu_seqlens: torch.Tensor, key, compute: Callable):
    """`compute()` once per `cu_seqlens` tensor and `key`: every layer of a step gets the same
    tensor, so the values made from it (its host copy, the ring and LASP plans) are made once.
    Entries go with the tensor (a weak reference); an in-place change of the tensor drops them."""
    ident = id(cu_seqlens)
    entry = _PER_STEP.get(ident)
    if entry is None or entry[0]() is not cu_seqlens or entry[1] != cu_seqlens._version:
        entry = _PER_STEP[ident] = (weakref.ref(cu_seqlens, lambda _: _PER_STEP.pop(ident, None)),
                                    cu_seqlens._version, {})
    values = entry[2]
    if key not in values:
        values[key] = compute()
    return values[key]


def with_host_bounds(cu_seqlens: torch.Tensor, device) -> torch.Tensor:
    """`cu_seqlens` (a CPU tensor) moved to `device`, its values remembered, so that the plans
    made from it (ring, LASP, per-document loops) read no device memory: no host sync mid-step."""
    moved = cu_seqlens.to(device, non_blocking=True)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    per_step(moved, "bounds", lambda: bounds)
    return moved


def document_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as a list of ints: remembered by with_host_bounds, else read once per tensor
    (a device sync for a GPU tensor)."""
    return per_step(cu_seqlens, "bounds", lambda: [int(b) for b in cu_seqlens.tolist()])


def document_ranges(cu_seqlens: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    """(start, end) of each packed document; the whole sequence when `cu_seqlens` is None."""
    if cu_seqlens is None:
        return [(0, total)]
    bounds = document_bounds(cu_seqlens)
    if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must rise from 0 to the token count {total}; got {bounds[:8]}...")
    return list(zip(bounds[:-1], bounds[1:]))


def softmax_attention(q, k, v, *, backend: str = "auto", cu_seqlens=None, max_seqlen=None, softmax_scale=None,
                      causal: bool = True):
    """Softmax attention of whole sequences through the seam: q (B, S, H, D), k, v (B, S, Hkv, D);
    `cu_seqlens` (int32) the packed documents of the flattened B*S tokens, in one call."""
    if cu_seqlens is None:
        return seam.attention(q, k, v, backend=backend, causal=causal, softmax_scale=softmax_scale)
    if max_seqlen is None:
        bounds = document_bounds(cu_seqlens)
        max_seqlen = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]   # [B*S, H, D] (views)
    out = seam.attention(*flat, backend=backend, causal=causal, softmax_scale=softmax_scale,
                         cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return out.view(q.shape)


def sdpa_attention(q, k, v, *, cu_seqlens=None, max_seqlen=None, softmax_scale=None):
    """PyTorch's scaled_dot_product_attention, packed documents one at a time: not a backend (it
    gives no log-sum-exp), a plain causal reference for tests and for mixers that wrap it."""
    batch, seqlen = q.shape[:2]
    gqa = q.shape[2] != k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D]
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    if batch != 1:
        # documents index the flattened sequence: fold the batch into one row
        flat = [x.reshape(1, batch * seqlen, *x.shape[2:]) for x in (q, k, v)]
        out = sdpa_attention(*flat, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale)
        return out.reshape(q.shape)
    out = torch.empty_like(qt)
    for start, end in document_ranges(cu_seqlens, seqlen):
        out[:, :, start:end] = F.scaled_dot_product_attention(
            qt[:, :, start:end], kt[:, :, start:end], vt[:, :, start:end],
            is_causal=True, scale=softmax_scale, enable_gqa=gqa)
    return out.transpose(1, 2)
