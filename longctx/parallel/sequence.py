"""Splitting a sequence across the ranks of a sequence-parallel group, and gathering it back.

Two layouts:
- "contiguous": rank r holds the r-th of N equal chunks (LASP needs this: a zigzag order breaks
  the linear-attention recurrence).
- "zigzag": the sequence is cut into 2N chunks and rank r holds chunks r and 2N-1-r, so that
  under a causal mask every rank does the same attention work (ring attention uses this).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def sequence_divisor(world_size: int, layout: str) -> int:
    """The number a sequence length must be a multiple of to be split over `world_size` ranks."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; expected one of {LAYOUTS}")
    return 2 * world_size if layout == "zigzag" else world_size


def zigzag_chunk_ids(rank: int, world_size: int) -> tuple[int, int]:
    """The two of the 2N chunks that `rank` holds in the zigzag layout."""
    return rank, 2 * world_size - 1 - rank


def split_sequence(x: torch.Tensor, group=None, dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """This rank's share of `x` along `dim` (a new contiguous tensor)."""
    rank, world = _group_info(group)
    divisor = sequence_divisor(world, layout)
    length = x.shape[dim]
    if length % divisor:
        raise ValueError(
            f"sequence length {length} cannot be split {layout} over {world} ranks: it must be a "
            f"multiple of {divisor}; pad it (labels -100) to the next multiple of {divisor}")
    if layout == "contiguous":
        return x.chunk(world, dim=dim)[rank].contiguous()
    chunks = x.chunk(2 * world, dim=dim)
    first, second = zigzag_chunk_ids(rank, world)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def gather_sequence(local: torch.Tensor, group=None, dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """The whole sequence from every rank's share, in the original order (not differentiable)."""
    rank, world = _group_info(group)
    sequence_divisor(world, layout)
    if world == 1:
        return local
    shares = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shares, local.contiguous(), group=group)
    if layout == "contiguous":
        return torch.cat(shares, dim=dim)
    chunks: list[torch.Tensor | None] = [None] * (2 * world)
    for r, share in enumerate(shares):
        first, second = zigzag_chunk_ids(r, world)
        chunks[first], chunks[second] = share.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def layout_over_sp(layout: str):
    """(split, gather, divisor) of `layout` over a ParallelDims' sp group, as a method record
    takes them."""
    sequence_divisor(1, layout)
    return (lambda x, dims, dim: split_sequence(x, dims.sp_group, dim=dim, layout=layout),
            lambda local, dims, dim: gather_sequence(local, dims.sp_group, dim=dim, layout=layout),
            lambda dims: sequence_divisor(dims.sp, layout))


# USP (Ulysses inside a ring): the ring's zigzag share of each ring rank, cut contiguously over the
# Ulysses ranks that share it; the Ulysses all-to-all rebuilds the zigzag share for the ring.
def usp_sequence_divisor(ulysses: int, ring: int) -> int:
    """What a sequence length must be a multiple of to be split over `ulysses` x `ring` ranks."""
    zigzag = sequence_divisor(ring, "zigzag")
    return zigzag * ulysses // 2 if ulysses % 2 == 0 else zigzag * ulysses


def split_sequence_usp(x: torch.Tensor, ulysses_group, ring_group, dim: int = 1) -> torch.Tensor:
    """This rank's USP share of `x` along `dim`: its ring rank's zigzag share, then its Ulysses
    rank's contiguous piece of that."""
    ulysses, ring = _group_info(ulysses_group)[1], _group_info(ring_group)[1]
    divisor = usp_sequence_divisor(ulysses, ring)
    if x.shape[dim] % divisor:
        raise ValueError(
            f"sequence length {x.shape[dim]} cannot be split over {ulysses} (Ulysses) x {ring} (ring) "
            f"ranks: it must be a multiple of {divisor}; pad it (labels -100) to the next multiple of {divisor}")
    share = split_sequence(x, ring_group, dim, "zigzag")
    return split_sequence(share, ulysses_group, dim, "contiguous")


def gather_sequence_usp(local: torch.Tensor, ulysses_group, ring_group, dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's USP share, in the original order (not differentiable)."""
    share = gather_sequence(local, ulysses_group, dim, "contiguous")
    return gather_sequence(share, ring_group, dim, "zigzag")
