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

Implementations register themselves: the model registers `sdpa`, `flash` and `lightning`; each
sequence-parallel method of `longctx.parallel` registers its mixers when imported, so the model
never imports parallel code.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F

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


@register_attention("sdpa")
def sdpa_attention(q, k, v, *, cu_seqlens=None, max_seqlen=None, softmax_scale=None):
    """PyTorch's scaled_dot_product_attention; packed documents run one at a time."""
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


@register_attention("flash")
def flash_attention(q, k, v, *, cu_seqlens=None, max_seqlen=None, softmax_scale=None):
    """The Triton FlashAttention-2 kernel (longctx.ops.attention); packed documents in one launch."""
    from longctx.ops.attention import flash_attn_func, flash_attn_varlen_func
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, causal=True, softmax_scale=softmax_scale)
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]   # [B*S, H, D]
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 causal=True, softmax_scale=softmax_scale)
    return out.view(q.shape)
