"""Ulysses: attention over a sequence split across a group, by exchanging sequence shards for heads.

Each of the U ranks holds a contiguous shard of S/U tokens of q, k, v with all their heads (layout
"contiguous" of `parallel/sequence.py`). One all-to-all, q, k and v packed in one buffer, turns it
into the whole sequence for H/U query heads (and their key/value heads); each rank runs softmax
attention over the whole sequence for its heads on the backend the caller names (`backend=`, the
model's `config.attention`, through the seam `longctx.ops.attention.backends`: any device and dtype
the backend takes, float64 on a CPU with `torch`), packed documents exact in one call with the
global `cu_seqlens`; one all-to-all brings the output back to
the rank's sequence shard with all heads. The backward runs the same two exchanges the other way
round: the output gradient to head shards, then dq, dk, dv together back to sequence shards.

Per layer and rank, forward plus backward, each exchange keeps 1/U of its buffer and sends the
rest: (q + k + v + out) x 2 x (U - 1)/U of the rank's share (see `ulysses_bytes_per_layer`), which
stays constant as S and U grow together; ring attention sends whole K, V shares round the ring.

Key/value heads (GQA): with Hkv divisible by U each rank gets Hkv/U of them; with fewer KV heads than
U (U a multiple of Hkv) each is replicated to the U/Hkv ranks whose query heads read it (as ALST
does) and the gradients of the replicas are summed on the way back. Every rank does the same work,
causal or not: the whole sequence for H/U heads.

Linear-attention layers of hybrid models split their heads the same way (`ulysses_lightning_func`):
each rank runs lightning attention over the whole sequence for its heads, with no state passed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx.model.attention import (document_bounds, per_step, register_attention, register_linear_attention,
                                     softmax_attention)
from longctx.ops.linear import lightning_attn_func

from .registry import SequenceMethod, register_method
from .sequence import layout_over_sp

__all__ = ["ulysses_attn_func", "ulysses_lightning_func", "check_heads", "ulysses_bytes_per_layer",
           "sequence_to_heads", "heads_to_sequence"]


@dataclass(frozen=True)
class LoopbackGroup:
    """One process standing in for rank `rank` of a group of `world_size`: every piece an
    all-to-all "receives" is a copy of the one it sent. Does one rank's computation (the kernel on
    the whole sequence for its heads, the exchanges' copies) without communication, for timing
    (scripts/bench_ring.py --part ulysses); its results are not attention over any sequence."""
    world_size: int
    rank: int = 0


def _world_size(group) -> int:
    if isinstance(group, LoopbackGroup):
        return group.world_size
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _rank(group) -> int:
    if isinstance(group, LoopbackGroup):
        return group.rank
    return dist.get_rank(group) if _world_size(group) > 1 else 0


def check_heads(heads: int, kv_heads: int, ulysses: int) -> None:
    """Raise a one-line ValueError unless `heads` query and `kv_heads` key/value heads can be split
    over `ulysses` ranks: H divisible by U, and Hkv either divisible by U or dividing it."""
    if heads % ulysses:
        raise ValueError(f"Ulysses splits the {heads} query heads over {ulysses} ranks: the Ulysses size "
                         f"must divide the query heads; choose one of {_divisors(heads)}")
    if kv_heads % ulysses and ulysses % kv_heads:
        raise ValueError(f"Ulysses over {ulysses} ranks cannot split {kv_heads} key/value heads (it must "
                         f"divide them, or be a multiple of them to replicate each): choose a Ulysses size "
                         f"dividing {heads} among {_divisors(kv_heads)} or multiples of {kv_heads}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _kv_replicas(kv_heads: int, ulysses: int) -> int:
    """How many ranks share each key/value head: 1 when they are split, U/Hkv when replicated."""
    return ulysses // kv_heads if kv_heads < ulysses else 1


# ------------------------------------------------------------------------------------------------
# the two exchanges (no autograd): each packs its tensors into one buffer for one all-to-all
# ------------------------------------------------------------------------------------------------
def _all_to_all(send: torch.Tensor, group) -> torch.Tensor:
    """send [U, ...]: piece j goes to rank j; returns [U, ...] where piece j came from rank j."""
    if isinstance(group, LoopbackGroup):
        return send.clone()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _sequence_to_heads(parts: list[torch.Tensor], group) -> list[torch.Tensor]:
    """This rank's sequence shard of each part, [B, S/U, H_i, D_i], to the whole sequence for its
    head shard, [B, S, H_i/U, D_i]: rank r gets heads [r H_i/U, (r+1) H_i/U). One all-to-all for all
    parts. The results are views of one buffer (the head dim stays contiguous)."""
    world = _world_size(group)
    batch, shard = parts[0].shape[:2]
    # [U, B, S/U, H_i/U * D_i] per part: destination rank first, its heads flattened
    send = torch.cat([x.unflatten(2, (world, -1)).movedim(2, 0).flatten(3) for x in parts], dim=-1)
    recv = _all_to_all(send, group)                          # [U, B, S/U, F]: piece j = sequence shard j
    whole = recv.movedim(0, 1).reshape(batch, world * shard, -1)  # [B, S, F], a view when B = 1
    out, start = [], 0
    for x in parts:
        heads, dim = x.shape[2] // world, x.shape[3]
        out.append(whole[..., start:start + heads * dim].unflatten(-1, (heads, dim)))
        start += heads * dim
    return out


def _heads_to_sequence(parts: list[torch.Tensor], group) -> list[torch.Tensor]:
    """The inverse of `_sequence_to_heads`: each part's whole sequence for this rank's head shard,
    [B, S, h_i, D_i], to this rank's sequence shard with every rank's heads, [B, S/U, U h_i, D_i]."""
    world = _world_size(group)
    batch, seqlen = parts[0].shape[:2]
    # [U, B, S/U, F]: destination rank = which sequence shard; contiguous (no copy) when B = 1
    send = torch.cat([x.flatten(2) for x in parts], dim=-1).unflatten(1, (world, seqlen // world)).movedim(1, 0)
    recv = _all_to_all(send.contiguous(), group)             # piece j = head shard j
    out, start = [], 0
    for x in parts:
        heads, dim = x.shape[2], x.shape[3]
        piece = recv[..., start:start + heads * dim].unflatten(-1, (heads, dim))  # [U, B, S/U, h, D]
        out.append(piece.movedim(0, 2).flatten(2, 3))        # [B, S/U, U h, D], rank j's heads j-th
        start += heads * dim
    return out


class _SequenceToHeads(torch.autograd.Function):
    """q, k, v sequence shards -> whole-sequence head shards; KV heads replicated `replicas` times
    first when there are fewer than ranks (the backward sums the replicas' gradients)."""

    @staticmethod
    def forward(ctx, q, k, v, group, replicas):
        ctx.group, ctx.replicas = group, replicas
        if replicas > 1:
            k, v = k.repeat_interleave(replicas, dim=2), v.repeat_interleave(replicas, dim=2)
        return tuple(_sequence_to_heads([q, k, v], group))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        dq, dk, dv = _heads_to_sequence([dq, dk, dv], ctx.group)
        if ctx.replicas > 1:
            dk, dv = (x.unflatten(2, (-1, ctx.replicas)).sum(3) for x in (dk, dv))
        return dq, dk, dv, None, None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, group):
        ctx.group = group
        return _heads_to_sequence([out], group)[0]

    @staticmethod
    def backward(ctx, dout):
        return _sequence_to_heads([dout], ctx.group)[0], None


def sequence_to_heads(q, k, v, group):
    """This rank's sequence shards of q, k, v, [B, S/U, H|Hkv, D], to the whole sequence for its head
    shard, [B, S, H/U, D] (KV heads: Hkv/U, or 1 replicated): one all-to-all, differentiable."""
    world = _world_size(group)
    check_heads(q.shape[2], k.shape[2], world)
    if world == 1:
        return q, k, v
    return _SequenceToHeads.apply(q, k, v, group, _kv_replicas(k.shape[2], world))


def heads_to_sequence(out, group):
    """The output of this rank's heads over the whole sequence back to its sequence shard with
    every head, [B, S/U, H, D]: one all-to-all, differentiable."""
    return out if _world_size(group) == 1 else _HeadsToSequence.apply(out, group)


# ------------------------------------------------------------------------------------------------
# the public functions
# ------------------------------------------------------------------------------------------------
def check_shards(q, k, v, what: str) -> bool:
    """Raise a one-line ValueError for shards that do not fit together; True when they are packed
    (T/U, H, D), False for (B, S/U, H, D)."""
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"{what} takes q, k, v as (batch, seqlen/U, heads, head_dim) or packed "
                         f"(tokens/U, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:-2] != q.shape[:-2] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"{what}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share "
                         f"batch and local sequence length, and k, v their heads")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"{what}: query heads ({q.shape[-2]}) must be a multiple of key/value heads ({k.shape[-2]})")
    return q.dim() == 3


def _longest_document(cu_seqlens, tokens: int, what: str) -> int:
    """Check that `cu_seqlens` spans the whole sequence of `tokens` (not a rank's share): read on
    the host (remembered by `with_host_bounds`, else a sync), before any exchange."""
    bounds = document_bounds(cu_seqlens)
    if bounds[0] != 0 or bounds[-1] != tokens:
        raise ValueError(f"{what}: cu_seqlens must rise from 0 to the token count of the whole (unsplit) "
                         f"sequence, {tokens}; got {bounds[:4]}...{bounds[-1]}: pass the documents of the "
                         f"whole sequence, not of this rank's share")
    # once per step, not in every layer and recompute: a packed row may hold thousands of documents
    return per_step(cu_seqlens, "longest_document", lambda: max(b - a for a, b in zip(bounds, bounds[1:])))


def ulysses_attn_func(q, k, v, group=None, causal: bool = True, cu_seqlens: torch.Tensor | None = None,
                      max_seqlen: int | None = None, softmax_scale: float | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """Softmax attention of this rank's contiguous sequence shard over the whole sequence (Ulysses).

    q (B, S/U, H, D), k, v (B, S/U, Hkv, D): this rank's shard of `split_sequence(x, group, dim=1,
    layout="contiguous")`; or packed q (T/U, H, D), k, v (T/U, Hkv, D). `cu_seqlens` (int32): the
    starts of the documents of the whole flattened (B x S, or T) sequence plus its total;
    `max_seqlen` the longest of them (read from `cu_seqlens` when None). H must be divisible by the
    group size U, and Hkv divisible by U or dividing it (see `check_heads`). `backend`: the
    attention backend of the whole-sequence call (a name of `longctx.ops.attention.backends`).
    Returns this rank's output shard, q's shape. Differentiable in q, k, v.
    """
    packed = check_shards(q, k, v, "ulysses attention")
    if packed:
        q, k, v = q[None], k[None], v[None]
    if cu_seqlens is not None:
        longest = _longest_document(cu_seqlens, q.shape[0] * q.shape[1] * _world_size(group), "ulysses attention")
        max_seqlen = longest if max_seqlen is None else max_seqlen
    q_heads, k_heads, v_heads = sequence_to_heads(q, k, v, group)
    out = softmax_attention(q_heads, k_heads, v_heads, backend=backend, causal=causal, cu_seqlens=cu_seqlens,
                            max_seqlen=max_seqlen, softmax_scale=softmax_scale)
    out = heads_to_sequence(out, group)
    return out[0] if packed else out


def ulysses_lightning_func(q, k, v, decay: torch.Tensor, group=None,
                           cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Lightning (linear) attention of this rank's contiguous sequence shard, heads split as in
    `ulysses_attn_func`: each rank runs `lightning_attn_func` over the whole sequence for its H/U
    heads (and their decays), from a zero state; no state passes between ranks.

    q, k (B, S/U, H|Hkv, Dk), v (B, S/U, Hkv, Dv), decay (H,) >= 0 (a fixed constant, every rank the
    whole of it); `cu_seqlens`: documents of the whole sequence (B = 1), the state restarting at
    each. Returns this rank's output shard (B, S/U, H, Dv).
    """
    if q.dim() != 4:
        raise ValueError(f"ulysses lightning attention takes q, k, v as (batch, seqlen/U, heads, head_dim); "
                         f"got {tuple(q.shape)}")
    check_shards(q, k, v, "ulysses lightning attention")
    if decay.shape != (q.shape[2],):
        raise ValueError(f"decay must have one value per query head ({q.shape[2]},); got {tuple(decay.shape)}")
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"ulysses lightning attention: packed documents (cu_seqlens) need batch size 1, "
                             f"got {q.shape[0]}: pack the batch into one row")
        _longest_document(cu_seqlens, q.shape[1] * _world_size(group), "ulysses lightning attention")
    q_heads, k_heads, v_heads = sequence_to_heads(q, k, v, group)
    heads = q_heads.shape[2]
    rank = _rank(group)
    out, _ = lightning_attn_func(q_heads, k_heads, v_heads, decay[rank * heads:(rank + 1) * heads],
                                 cu_seqlens=cu_seqlens)
    return heads_to_sequence(out, group)


def ulysses_bytes_per_layer(seqlen: int, heads: int, kv_heads: int, head_dim: int, ulysses: int,
                            element_bytes: int = 2, batch: int = 1) -> int:
    """Bytes one rank sends in one softmax layer's forward and backward: the q, k, v exchange and the
    output's, each once each way; every rank keeps 1/U of each buffer."""
    if ulysses == 1:
        return 0
    shard = batch * (seqlen // ulysses) * head_dim
    kv_sent = max(kv_heads, ulysses)  # replicated KV heads travel once per rank that reads them
    qkv, out = shard * (heads + 2 * kv_sent), shard * heads
    return 2 * (qkv + out) * element_bytes * (ulysses - 1) // ulysses


# ------------------------------------------------------------------------------------------------
# the model's mixers and the method's record (longctx/parallel/registry.py)
# ------------------------------------------------------------------------------------------------
@register_attention("ulysses")
def ulysses_attention(q, k, v, *, group=None, cu_seqlens=None, max_seqlen=None, softmax_scale=None,
                      backend="auto"):
    """The model's `ulysses` token mixer: causal Ulysses attention over `group`, on `backend`."""
    return ulysses_attn_func(q, k, v, group, causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                             softmax_scale=softmax_scale, backend=backend)


@register_linear_attention("ulysses_lightning")
def ulysses_lightning(q, k, v, decay, *, group=None, cu_seqlens=None):
    """The model's `ulysses_lightning` linear mixer: heads split over `group`, no state passed."""
    return ulysses_lightning_func(q, k, v, decay, group, cu_seqlens=cu_seqlens)


def heads_check(size_of):
    """A record's head check for a Ulysses group of `size_of(dims)` ranks (one line, naming the key)."""
    def check(dims, model_config):
        if model_config is None:
            return
        try:
            check_heads(model_config.num_attention_heads, model_config.num_key_value_heads, size_of(dims))
        except ValueError as error:
            raise ValueError(f"parallel.sp_method={dims.sp_method} over {size_of(dims)} Ulysses ranks: {error}") from None
    return check


def heads_exchange_memory(ulysses: int, m, tokens: int, a: int) -> dict:
    """The all-to-all's send and receive buffers of q, k, v (one layer at a time), and the KV heads
    that replication adds to what every layer keeps for its backward."""
    kv_sent = max(m.num_key_value_heads, ulysses)
    parts = {"all-to-all buffers": 2 * tokens * (m.num_attention_heads + 2 * kv_sent) * m.head_dim * a}
    if kv_sent > m.num_key_value_heads:
        parts["replicated KV heads"] = (m.num_hidden_layers * tokens * 2 * (kv_sent - m.num_key_value_heads)
                                        * m.head_dim * a)
    return parts


def _bytes(m, seqlen, a, dims, kind) -> float:
    # a linear layer exchanges the same q, k, v and output as a softmax layer of its shape
    return ulysses_bytes_per_layer(seqlen, m.num_attention_heads, m.num_key_value_heads, m.head_dim, dims.sp, a)


_split, _gather, _divisor = layout_over_sp("contiguous")
register_method(SequenceMethod(
    name="ulysses", summary="Ulysses: all-to-all from sequence to head shards, the whole sequence per rank "
                            "for H/U heads (softmax and linear layers)",
    softmax="ulysses", linear="ulysses_lightning", split=_split, gather=_gather, divisor=_divisor,
    groups=lambda dims: dims.sp_group, bytes_per_layer=_bytes, check=heads_check(lambda dims: dims.sp),
    memory=lambda m, tokens, a, dims: heads_exchange_memory(dims.sp, m, tokens, a)))
