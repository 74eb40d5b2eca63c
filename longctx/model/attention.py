"""The token mixers the model picks by name.

Softmax attention functions take `q` (B, S, H, D), `k`, `v` (B, S, Hkv, D) and return (B, S, H, D),
always causal (this is a decoder):

    fn(q, k, v, *, cu_seqlens=None, max_seqlen=None, softmax_scale=None) -> out

`cu_seqlens` (int32, starts of documents plus the total) describes the packed documents of the
whole flattened (B*S) sequence. A function that runs on a shard of the sequence (ring attention)
knows its own layout; the model passes it the same arguments.

Linear attention functions (used by `LinearAttention` layers) take q, k (B, S, H, Dk), v (B, S, H, Dv)
and a per-head decay (H,) >= 0:

    fn(q, k, v, decay, *, cu_seqlens=None) -> out

Implementations register themselves: the model registers `sdpa` and `naive` here and the ops it
imports; `longctx.parallel` registers `ring` and `lasp` when imported, so the model never imports
parallel code.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F

_SOFTMAX: dict[str, Callable] = {}
_LINEAR: dict[str, Callable] = {}
_WHERE = {"ring": "longctx.parallel.ring", "lasp": "longctx.parallel.lasp",
          "lasp_allgather": "longctx.parallel.lasp", "allgather_kv": "longctx.parallel.lasp"}


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
        hint = f"; import {_WHERE[name]} first (the trainer does)" if name in _WHERE else ""
        raise KeyError(f"unknown {kind} attention {name!r}: registered are {sorted(table)}{hint}")
    return table[name]


def get_attention(name: str) -> Callable:
    return _lookup(_SOFTMAX, name, "softmax")


def get_linear_attention(name: str) -> Callable:
    return _lookup(_LINEAR, name, "linear")


# id(device tensor) -> (weak reference, version, its values): see with_host_bounds
_HOST_BOUNDS: dict = {}


def with_host_bounds(cu_seqlens: torch.Tensor, device) -> torch.Tensor:
    """`cu_seqlens` (a CPU tensor) moved to `device`, its values remembered, so that the plans
    made from it (ring, LASP, per-document loops) read no device memory: no host sync mid-step."""
    moved = cu_seqlens.to(device, non_blocking=True)
    key = id(moved)
    _HOST_BOUNDS[key] = (weakref.ref(moved, lambda _: _HOST_BOUNDS.pop(key, None)), moved._version,
                         [int(b) for b in cu_seqlens.tolist()])
    return moved


def document_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as a list of ints: remembered by with_host_bounds, else read (a device sync
    for a GPU tensor)."""
    entry = _HOST_BOUNDS.get(id(cu_seqlens))
    if entry is not None and entry[0]() is cu_seqlens and entry[1] == cu_seqlens._version:
        return entry[2]
    return [int(b) for b in cu_seqlens.tolist()]


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
