"""USP (unified sequence parallelism): Ulysses over adjacent ranks, ring attention across them.

A sequence-parallel group of U x R ranks is laid out as in yunchang's `set_seq_parallel_pg`
(Ulysses innermost): sp rank p is Ulysses rank p mod U of the Ulysses group of the U adjacent ranks
{R_i U, ..., R_i U + U - 1}, and ring rank p div U of the ring of the strided ranks {u, u + U, ...}.
Adjacent ranks sit on one node, so the all-to-all, whose traffic grows with U, stays on the fast
links and only the ring, which moves K and V shares and overlaps them with compute, crosses nodes.

The sequence: ring rank r holds the zigzag share of the ring (chunks r and 2R-1-r of 2R), cut
contiguously over its Ulysses group (`sequence.split_sequence_usp`). The Ulysses all-to-all turns a
rank's piece into the whole zigzag share for its H/U heads, which zigzag ring attention
(`ring.ring_attn_func`, over the ring group) runs on: causal work balanced round the ring, equal
over the Ulysses ranks (the same tokens, as many heads each), packed documents exact through the
ring's plan on the global `cu_seqlens`. A second all-to-all brings the output back.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from longctx.model.attention import register_attention

from .registry import SequenceMethod, register_method
from .ring import init_ring, ring_attn_func, ring_buffers, ring_bytes_per_layer
from .sequence import gather_sequence_usp, split_sequence_usp, usp_sequence_divisor
from .ulysses import (check_shards, heads_check, heads_exchange_memory, heads_to_sequence, sequence_to_heads,
                      ulysses_bytes_per_layer)

__all__ = ["usp_attn_func", "build_usp_groups", "usp_group_ranks", "usp_bytes_per_layer"]


def usp_attn_func(q, k, v, ulysses_group, ring_group, causal: bool = True,
                  cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                  softmax_scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Softmax attention of this rank's USP share over the whole sequence.

    q (B, S/(U R), H, D), k, v (B, S/(U R), Hkv, D): this rank's share of
    `split_sequence_usp(x, ulysses_group, ring_group, dim=1)`; or packed q (T/(U R), H, D), k, v
    (T/(U R), Hkv, D). `cu_seqlens` (int32): the documents of the whole flattened sequence (every
    batch row starting one, as ring attention needs). H must be divisible by U and Hkv fit it as in
    `ulysses.check_heads`. `max_seqlen` is accepted for the common signature; the ring plans its
    blocks from `cu_seqlens`. `backend`: the attention backend of the ring's blocks (a name of
    `longctx.ops.attention.backends`). Returns this rank's output share, q's shape; differentiable
    in q, k, v.
    """
    packed = check_shards(q, k, v, "USP attention")
    if packed:
        q, k, v = q[None], k[None], v[None]
    q_heads, k_heads, v_heads = sequence_to_heads(q, k, v, ulysses_group)  # the ring's zigzag share
    out = ring_attn_func(q_heads, k_heads, v_heads, ring_group, causal=causal, softmax_scale=softmax_scale,
                         cu_seqlens=cu_seqlens, backend=backend)
    out = heads_to_sequence(out, ulysses_group)
    return out[0] if packed else out


def usp_group_ranks(sp_groups: list[list[int]], ulysses: int) -> tuple[list[list[int]], list[list[int]]]:
    """(Ulysses groups, ring groups) as lists of global ranks: each sp group of U x R ranks gives R
    Ulysses groups of U adjacent ranks and U rings of R ranks U apart."""
    sp = len(sp_groups[0])
    if ulysses < 1 or sp % ulysses:
        raise ValueError(f"parallel.ulysses={ulysses} must divide the sequence-parallel size {sp} "
                         f"(sp = ulysses x ring); choose one of {[d for d in range(1, sp + 1) if sp % d == 0]}")
    ulysses_groups = [ranks[i:i + ulysses] for ranks in sp_groups for i in range(0, sp, ulysses)]
    ring_groups = [ranks[u::ulysses] for ranks in sp_groups for u in range(ulysses)]
    return ulysses_groups, ring_groups


def build_usp_groups(ulysses: int, mesh=None, dim: str = "sp"):
    """(Ulysses group, ring group) of this rank, made for every sequence-parallel group at once.

    `mesh`: a DeviceMesh with a dimension `dim` (the sp groups are its slices along it; None: the
    whole world is one sp group). Every rank of the world must call this, in the same order (it
    creates process groups).
    """
    if mesh is None:
        sp_groups = [list(range(dist.get_world_size()))]
    else:
        if dim not in (mesh.mesh_dim_names or ()):
            raise ValueError(f"the device mesh has no {dim!r} dimension (it has {mesh.mesh_dim_names}): "
                             f"pass the name of its sequence-parallel dimension as dim=")
        ranks = mesh.mesh.movedim(mesh.mesh_dim_names.index(dim), -1)
        sp_groups = ranks.reshape(-1, ranks.shape[-1]).tolist()
    ulysses_groups, ring_groups = usp_group_ranks(sp_groups, ulysses)
    ulysses_group, _ = dist.new_subgroups_by_enumeration(ulysses_groups)
    ring_group, _ = dist.new_subgroups_by_enumeration(ring_groups)
    return ulysses_group, ring_group


def usp_bytes_per_layer(seqlen: int, heads: int, kv_heads: int, head_dim: int, ulysses: int, ring: int,
                        element_bytes: int = 2, batch: int = 1) -> dict:
    """Bytes one rank sends in one softmax layer's forward and backward, by link: the all-to-alls
    inside the Ulysses group (on the ring share of S/R tokens) and the ring's K, V and dK, dV shares
    (H/U query heads, max(Hkv, U)/U KV heads)."""
    kv_per_rank = max(kv_heads, ulysses) // ulysses
    return {"ulysses": ulysses_bytes_per_layer(seqlen // ring, heads, kv_heads, head_dim, ulysses,
                                               element_bytes, batch),
            "ring": ring_bytes_per_layer(seqlen, kv_per_rank, head_dim, ring, element_bytes, batch)}


# ------------------------------------------------------------------------------------------------
# the model's mixer and the method's record (longctx/parallel/registry.py)
# ------------------------------------------------------------------------------------------------
@register_attention("usp")
def usp_attention(q, k, v, *, group=None, cu_seqlens=None, max_seqlen=None, softmax_scale=None, backend="auto"):
    """The model's `usp` token mixer; `group` is the pair (Ulysses group, ring group)."""
    ulysses_group, ring_group = group
    return usp_attn_func(q, k, v, ulysses_group, ring_group, causal=True, cu_seqlens=cu_seqlens,
                         softmax_scale=softmax_scale, backend=backend)


def _ring_size(dims) -> int:
    return dims.sp // dims.ulysses


def _check(dims, model_config) -> None:
    if dims.ulysses < 2 or dims.sp % dims.ulysses or dims.sp == dims.ulysses:
        raise ValueError(f"parallel.sp_method=usp needs parallel.ulysses (now {dims.ulysses}) between 2 and "
                         f"sp/2 dividing parallel.sp={dims.sp} (sp = ulysses x ring); for ulysses = sp use "
                         f"sp_method=ulysses, for ulysses = 1 sp_method=ring")
    heads_check(lambda d: d.ulysses)(dims, model_config)


def _groups(dims):
    """(Ulysses group, ring group) from the mesh's sp dimension (the whole world without a mesh)."""
    ulysses_group, ring_group = build_usp_groups(dims.ulysses, dims.mesh)
    init_ring(ring_group)   # the ring's communicators made and warmed up now, not in the first layer
    return ulysses_group, ring_group


def _memory(m, tokens, a, dims) -> dict:
    """The Ulysses exchange's buffers, and the ring's over the ring share (U x the rank's tokens)
    for this rank's H/U query heads and max(Hkv, U)/U KV heads."""
    u = dims.ulysses
    parts = heads_exchange_memory(u, m, tokens, a)
    parts["ring buffers"] = ring_buffers(tokens * u, m.num_attention_heads // u,
                                         max(m.num_key_value_heads, u) // u, m.head_dim, a)
    return parts


def _bytes(m, seqlen, a, dims, kind) -> float:
    return sum(usp_bytes_per_layer(seqlen, m.num_attention_heads, m.num_key_value_heads, m.head_dim,
                                   dims.ulysses, _ring_size(dims), a).values())


register_method(SequenceMethod(
    name="usp", summary="USP: Ulysses over parallel.ulysses adjacent ranks (a node) x zigzag ring across them",
    softmax="usp", linear=None,
    split=lambda x, dims, dim: split_sequence_usp(x, *dims.mixer_group, dim=dim),
    gather=lambda local, dims, dim: gather_sequence_usp(local, *dims.mixer_group, dim=dim),
    divisor=lambda dims: usp_sequence_divisor(dims.ulysses, _ring_size(dims)),
    groups=_groups, bytes_per_layer=_bytes, check=_check, memory=_memory, reads=("ulysses",)))
