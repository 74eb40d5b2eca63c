"""Ring attention: softmax attention over a sequence split across a sequence-parallel group.

Each of the N ranks holds its zigzag share of q, k, v (chunks r and 2N-1-r of 2N equal chunks, see
`parallel/sequence.py`). The key/value shares travel round the ring: at step s rank r holds those
of rank (r - s) mod N, and while it attends its queries to them it is already sending them on to
rank r+1 and receiving the next ones from rank r-1 (K and V packed in one preallocated double buffer,
reused by every layer; a received block is dropped once used). The partial outputs are merged
through their log-sum-exp in fp32 (float64 on float64 inputs): no rounding to the input dtype
between steps, so the error does not grow with the ring.

Backward: a second ring passes K, V and, one step behind, the fp32 dK, dV that accumulate as they
go round; each block pair is recomputed with the kernel's low-level backward against the final
log-sum-exp; dQ stays local, and dK, dV reach their owner after N hops.

Causal balance (zigzag): with chunk size c, step 0 is the local causal block; from rank src < r the
whole local q sees the first chunk of the received k (c x 2c work); from src > r the second local
q chunk sees all of it (c x 2c again). Wholly future blocks are skipped; the halves are views, and
the causal cases are kernel arguments. Packed documents (`cu_seqlens` of the whole, unsplit
sequence) cut these blocks further: a pair of different chunks shares at most one document (a dense
sub-block), and the local causal block is one varlen call over the local documents.

Each block runs on the attention backend the caller names (`backend=`, the model's
`config.attention`: "auto", "triton", "cudnn", "torch", ...), selected per block shape through the
seam (`longctx.ops.attention.backends`); the partial results are folded with the seam's one merge.
Registered as the model's `ring` token mixer and as the sequence-parallel method `ring` (its record
at the end).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx.model.attention import document_bounds, per_step, register_attention
from longctx.ops.attention import backends as seam
from longctx.ops.attention import naive

from .registry import SequenceMethod, register_method
from .sequence import layout_over_sp


# ------------------------------------------------------------------------------------------------
# the ring: peers, warm-up, exchanges, buffers
# ------------------------------------------------------------------------------------------------
class RingComm:
    """Send to the next rank and receive from the previous one, every rank in the same order."""

    def __init__(self, group=None, device: torch.device | str = "cpu"):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        else:
            self.rank, self.world_size = 0, 1
        if self.world_size > 1:
            whole = group if group is not None else dist.group.WORLD
            self.next_rank = dist.get_global_rank(whole, (self.rank + 1) % self.world_size)
            self.prev_rank = dist.get_global_rank(whole, (self.rank - 1) % self.world_size)
            self._warm_up(torch.device(device))

    def _warm_up(self, device):
        # Create the communicator now, with a collective every rank joins, then go once round the
        # ring: the first real exchange then cannot hang on a lazily created peer connection.
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe, group=self.group)
        received = torch.empty_like(probe)
        for work in self.exchange(probe, received):
            work.wait()

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, tag: int = 0) -> list:
        """Start sending `send` to the next rank and receiving `recv` from the previous one."""
        ops = [dist.P2POp(dist.isend, send, self.next_rank, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev_rank, self.group, tag)]
        return dist.batch_isend_irecv(ops)


class LoopbackComm(RingComm):
    """A ring of one process pretending to be rank `rank` of `world_size`: every "received" block
    is a copy of the one sent. Does the computation of a real ring without its communication, for
    timing (scripts/bench_ring.py); its results are not attention over any sequence."""

    def __init__(self, world_size: int, rank: int = 0):
        self.group, self.rank, self.world_size = None, rank, world_size

    def exchange(self, send, recv, tag=0):
        recv.copy_(send)
        return []


_RINGS: dict = {}
_BUFFERS: dict = {}


def init_ring(group=None, device: torch.device | str | None = None) -> RingComm:
    """The ring of `group` (None: the default group), created and warmed up on first use. Call it
    once at start-up on every rank of the group to create the communicators eagerly."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if _backend_is_nccl(group) else "cpu"
    key = (group if group is not None else "default", str(device))
    if key not in _RINGS:
        _RINGS[key] = RingComm(group, device)
    return _RINGS[key]


def _backend_is_nccl(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl"


def _buffer(name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A persistent buffer, reused by every layer's ring attention (never returned to callers).
    One per name: a new shape replaces the old buffer rather than adding to memory."""
    held = _BUFFERS.get(name)
    if held is None or held.shape != tuple(shape) or held.dtype != dtype or held.device != torch.device(device):
        _BUFFERS.pop(name, None)
        held = _BUFFERS[name] = torch.empty(shape, dtype=dtype, device=device)
    return held


def free_ring_buffers() -> None:
    """Drop the double buffers (they are reallocated on the next call)."""
    _BUFFERS.clear()


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def ring_bytes_per_layer(seqlen: int, kv_heads: int, head_dim: int, world_size: int,
                         element_bytes: int = 2, batch: int = 1) -> int:
    """Bytes one rank sends in one layer's forward and backward: its K, V share N - 1 hops in each
    ring, and the fp32 dK, dV accumulators N hops (see ring_backward)."""
    if world_size == 1:
        return 0
    kv_share = 2 * batch * (seqlen // world_size) * kv_heads * head_dim  # K and V, elements
    return kv_share * (2 * (world_size - 1) * element_bytes + world_size * max(element_bytes, 4))


# ------------------------------------------------------------------------------------------------
# the plan: which block pairs each step computes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One kernel call: local query rows x rows of the key/value block in hand."""
    q_rows: tuple[int, int]
    k_rows: tuple[int, int]
    causal: bool
    batch: int | None = None                # one batch row (packed documents), or all rows
    cu_seqlens: torch.Tensor | None = None  # varlen over local documents (q and k rows alike)
    max_seqlen: int | None = None


def _chunk_documents(bounds: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """(document index, start, end) of the documents meeting [start, end), clipped to it."""
    first = bisect.bisect_right(bounds, start) - 1
    pieces = []
    for doc in range(first, len(bounds) - 1):
        if bounds[doc] >= end:
            break
        pieces.append((doc, max(bounds[doc], start), min(bounds[doc + 1], end)))
    return pieces


def _local_chunks(rank: int, world_size: int, chunk: int) -> list[tuple[int, int]]:
    """(chunk index, local start) of the two zigzag chunks a rank holds."""
    return [(rank, 0), (2 * world_size - 1 - rank, chunk)]


def _plan_documents(rank, world_size, chunk, causal, bounds, batch, device) -> list[list[Block]]:
    """The blocks of one batch row whose documents are `bounds` (row-local starts plus the end)."""
    steps = []
    local = _local_chunks(rank, world_size, chunk)
    # step 0: the local block; local order follows global order, and a document that spans both
    # local chunks is contiguous in it, so one varlen call with the local documents is exact
    pieces = []
    for index, local_start in local:
        for doc, start, end in _chunk_documents(bounds, index * chunk, (index + 1) * chunk):
            lo, hi = start - index * chunk + local_start, end - index * chunk + local_start
            if pieces and pieces[-1][0] == doc:
                pieces[-1] = (doc, pieces[-1][1], hi)
            else:
                pieces.append((doc, lo, hi))
    if len(pieces) == 1:
        steps.append([Block((0, 2 * chunk), (0, 2 * chunk), causal, batch)])
    else:
        starts = [lo for _, lo, _ in pieces] + [2 * chunk]
        cu = torch.tensor(starts, dtype=torch.int32, device=device)
        longest = max(hi - lo for _, lo, hi in pieces)
        steps.append([Block((0, 2 * chunk), (0, 2 * chunk), causal, batch, cu, longest)])
    # other steps: two different chunks share at most the one document that spans the gap
    for step in range(1, world_size):
        source = (rank - step) % world_size
        blocks = []
        for q_index, q_local in local:
            for k_index, k_local in _local_chunks(source, world_size, chunk):
                if causal and k_index > q_index:
                    continue
                early, late = min(q_index, k_index), max(q_index, k_index)
                doc = bisect.bisect_right(bounds, (early + 1) * chunk - 1) - 1
                if bounds[doc + 1] <= late * chunk:
                    continue
                spans = {early: (max(bounds[doc], early * chunk), (early + 1) * chunk),
                         late: (late * chunk, min(bounds[doc + 1], (late + 1) * chunk))}
                (q0, q1), (k0, k1) = spans[q_index], spans[k_index]
                blocks.append(Block((q0 - q_index * chunk + q_local, q1 - q_index * chunk + q_local),
                                    (k0 - k_index * chunk + k_local, k1 - k_index * chunk + k_local),
                                    False, batch))
        steps.append(blocks)
    return steps


def ring_plan(rank: int, world_size: int, local_len: int, causal: bool, batch: int = 1,
              cu_seqlens: torch.Tensor | None = None, device=None) -> list[list[Block]]:
    """For each ring step, the blocks rank `rank` computes with the key/value share of rank
    (rank - step) mod world_size. `cu_seqlens`: documents of the whole flattened (batch x
    world_size x local_len) sequence."""
    chunk = local_len // 2
    if cu_seqlens is None:
        if not causal:
            return [[Block((0, local_len), (0, local_len), False)] for _ in range(world_size)]
        steps = [[Block((0, local_len), (0, local_len), True)]]
        for step in range(1, world_size):
            if (rank - step) % world_size < rank:
                steps.append([Block((0, local_len), (0, chunk), False)])   # all queries, first chunk
            else:
                steps.append([Block((chunk, local_len), (0, local_len), False)])  # last chunk, all keys
        return steps
    seqlen = local_len * world_size
    bounds = document_bounds(cu_seqlens)
    if bounds[0] != 0 or bounds[-1] != batch * seqlen or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"cu_seqlens must rise from 0 to the token count of the whole (unsplit) sequence, "
            f"{batch} x {seqlen} = {batch * seqlen}; got {bounds[:6]}...{bounds[-1]}: pass the "
            f"documents of the whole sequence, not of this rank's share")
    steps = [[] for _ in range(world_size)]
    for row in range(batch):
        row_start, row_end = row * seqlen, (row + 1) * seqlen
        inside = [b - row_start for b in bounds if row_start < b < row_end]
        first = bisect.bisect_right(bounds, row_start) - 1
        if bounds[first] != row_start:
            raise ValueError(
                f"a packed document crosses from batch row {row - 1} into row {row} (cu_seqlens "
                f"{bounds[first]}..): ring attention needs every row to start a document; pack "
                f"documents into batch=1 or cut them at the row boundaries")
        row_steps = _plan_documents(rank, world_size, chunk, causal, [0] + inside + [seqlen], row, device)
        for step, blocks in enumerate(row_steps):
            steps[step].extend(blocks)
    return steps


# ------------------------------------------------------------------------------------------------
# the block math: through the seam, on the backend the caller names
# ------------------------------------------------------------------------------------------------
def _block_backend(name: str, block: "Block", q, k, local_len: int) -> seam.Backend:
    """The backend `name` means for this block's shape (selected once per shape: cached)."""
    return seam.select_for(name, q, k, causal=block.causal, varlen=block.cu_seqlens is not None,
                           seqlen=block.max_seqlen if block.cu_seqlens is not None else local_len)


def _rows(block: Block, x: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
    """The block's rows of a (B, S, ...) tensor: (b, S', ...) dense, (S', ...) varlen."""
    if block.batch is None:
        return x[:, rows[0]:rows[1]]
    if block.cu_seqlens is not None:
        return x[block.batch, rows[0]:rows[1]]
    return x[block.batch:block.batch + 1, rows[0]:rows[1]]


def _lse_rows(block: Block, lse: torch.Tensor) -> torch.Tensor:
    """The block's query rows of a (B, H, S) log-sum-exp: (b, H, S') dense, (H, S') varlen."""
    lo, hi = block.q_rows
    if block.batch is None:
        return lse[:, :, lo:hi]
    if block.cu_seqlens is not None:
        return lse[block.batch, :, lo:hi]
    return lse[block.batch:block.batch + 1, :, lo:hi]


def _varlen_args(block: Block) -> dict:
    return dict(cu_seqlens=block.cu_seqlens, max_seqlen=block.max_seqlen)


def _check(q, k, v, world_size):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ring attention takes {name} as (batch, local_seqlen, heads, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share batch, "
                         f"local sequence length and head dim (k and v one shape)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] % 2:
        raise ValueError(
            f"local sequence length {q.shape[1]} is odd: a zigzag share is two equal chunks, so the "
            f"whole sequence must be a multiple of 2 x {world_size} (the ring size); pad it "
            f"(labels -100) to the next multiple of {2 * world_size} before split_sequence")


# ------------------------------------------------------------------------------------------------
# forward and backward rings
# ------------------------------------------------------------------------------------------------
def _kv_blocks(ring: RingComm, k, v):
    """Yield (step, K block, V block) for each ring step: this rank's own first, then each other
    rank's. K and V share one double buffer that every layer reuses; when a block is yielded the
    next one is already travelling, so the transfer overlaps the caller's work on this one."""
    world = ring.world_size
    kv = _buffer("kv", (2, 2, *k.shape), k.dtype, k.device) if world > 1 else None
    pending = []
    for step in range(world):
        slot = step % 2
        if step == 0:
            k_now, v_now = k, v
            if world > 1:
                kv[0, 0].copy_(k)
                kv[0, 1].copy_(v)
        else:
            _wait(pending)
            k_now, v_now = kv[slot, 0], kv[slot, 1]
        if step < world - 1:
            pending = ring.exchange(kv[slot], kv[1 - slot], tag=0)
        yield step, k_now, v_now


def ring_forward(ring: RingComm, plan, q, k, v, scale, backend: str = "auto"):
    """(out, lse): out like q, lse (B, H, S_local) in the accumulation dtype."""
    accum = naive.accumulation_dtype(q.dtype)
    batch, seqlen, heads, _ = q.shape
    out = lse = None  # the running state, fp32; the first block that covers every row starts it
    for step, k_now, v_now in _kv_blocks(ring, k, v):
        for block in plan[step]:
            forward = _block_backend(backend, block, q, k, seqlen).forward
            block_out, block_lse = forward(
                _rows(block, q, block.q_rows), _rows(block, k_now, block.k_rows),
                _rows(block, v_now, block.k_rows), softmax_scale=scale, causal=block.causal,
                out_dtype=accum, **_varlen_args(block))
            if out is None and block.batch is None and block.q_rows == (0, seqlen):
                out, lse = block_out, block_lse.to(accum)
                continue
            if out is None:
                out = torch.zeros(q.shape, dtype=accum, device=q.device)
                lse = torch.full((batch, heads, seqlen), float("-inf"), dtype=accum, device=q.device)
            seam.merge_into(_rows(block, out, block.q_rows), _lse_rows(block, lse), block_out, block_lse)
    return out.to(q.dtype), lse


def ring_backward(ring: RingComm, plan, dout, q, k, v, out, lse, scale, backend: str = "auto"):
    """(dq, dk, dv) for this rank's shares; dk, dv gathered from every rank's queries."""
    accum = naive.accumulation_dtype(q.dtype)
    world = ring.world_size
    delta = (dout.to(accum) * out.to(accum)).sum(-1).transpose(1, 2).contiguous()  # [B, H, S] rowsum(dO * O)
    dq = torch.zeros(q.shape, dtype=accum, device=q.device)
    dkv = _buffer("dkv", (2, 2, *k.shape), accum, k.device)
    dkv_pending = []
    for step, k_now, v_now in _kv_blocks(ring, k, v):
        slot = step % 2
        grads = []
        for block in plan[step]:
            q_rows = block.q_rows
            backward = _block_backend(backend, block, q, k, q.shape[1]).backward
            block_dq, block_dk, block_dv = backward(
                _rows(block, dout, q_rows), _rows(block, q, q_rows), _rows(block, k_now, block.k_rows),
                _rows(block, v_now, block.k_rows), _rows(block, out, q_rows), _lse_rows(block, lse),
                softmax_scale=scale, causal=block.causal, delta=_lse_rows(block, delta),
                grad_dtype=accum, **_varlen_args(block))
            _rows(block, dq, q_rows).add_(block_dq)
            grads.append((block, block_dk, block_dv))
        # the dK, dV of this key/value block, accumulated by the ranks it has visited, come in
        # one step behind it: added to here and sent on, they reach the owner after N hops
        if step == 0:
            dkv[0].zero_()
        else:
            _wait(dkv_pending)
        for block, block_dk, block_dv in grads:
            _rows(block, dkv[slot, 0], block.k_rows).add_(block_dk)
            _rows(block, dkv[slot, 1], block.k_rows).add_(block_dv)
        if world > 1:
            dkv_pending = ring.exchange(dkv[slot], dkv[1 - slot], tag=1)
    _wait(dkv_pending)
    own = dkv[world % 2] if world > 1 else dkv[0]
    # copies: the buffer is reused by the next layer
    return dq.to(q.dtype), own[0].to(k.dtype, copy=True), own[1].to(v.dtype, copy=True)


def _cached_plan(ring, local_len, causal, batch, cu_seqlens, device):
    """The ring plan, made once per step's `cu_seqlens` (reading it may cost a device sync)."""
    make = lambda: ring_plan(ring.rank, ring.world_size, local_len, causal, batch, cu_seqlens, device)  # noqa: E731
    if cu_seqlens is None:
        return make()
    return per_step(cu_seqlens, ("ring", ring.rank, ring.world_size, local_len, causal, batch, str(device)), make)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, plan, scale, backend):
        out, lse = ring_forward(ring, plan, q, k, v, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.plan, ctx.scale, ctx.backend = ring, plan, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.ring, ctx.plan, dout.contiguous(), q, k, v, out, lse, ctx.scale,
                                   ctx.backend)
        return dq, dk, dv, None, None, None, None


def ring_attn_func(q, k, v, group=None, causal: bool = True, softmax_scale: float | None = None,
                   cu_seqlens: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of this rank's zigzag share of the queries to the whole sequence's keys/values.

    q (B, S_local, H, D); k, v (B, S_local, Hkv, D), each split with
    `split_sequence(x, group, dim=1, layout="zigzag")`; the output (B, S_local, H, D) is in the same
    layout. `cu_seqlens` (int32): starts of the packed documents of the whole, unsplit, flattened
    (B x S) sequence, plus its total. `backend`: the attention backend every block runs on (a name
    of `longctx.ops.attention.backends`, selected per block shape). Differentiable in q, k, v.
    """
    seam.check_name(backend)
    ring = init_ring(group, q.device if q.is_cuda else "cpu")
    _check(q, k, v, ring.world_size)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    plan = _cached_plan(ring, q.shape[1], causal, q.shape[0], cu_seqlens, q.device)
    return _RingAttention.apply(q, k, v, ring, plan, scale, backend)


@register_attention("ring")
def ring_attention(q, k, v, *, group=None, cu_seqlens=None, max_seqlen=None, softmax_scale=None, backend="auto"):
    """The model's `ring` token mixer: causal ring attention over `group` (None: the default group)."""
    return ring_attn_func(q, k, v, group, causal=True, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                          backend=backend)


# ------------------------------------------------------------------------------------------------
# the method's record
# ------------------------------------------------------------------------------------------------
def _bytes_per_layer(m, seqlen, a, dims, kind) -> float:
    return ring_bytes_per_layer(seqlen, m.num_key_value_heads, m.head_dim, dims.sp, a)


def ring_buffers(tokens: int, heads: int, kv_heads: int, head_dim: int, a: int) -> int:
    """K and V in a double buffer, the travelling fp32 dK and dV (double buffered), the fp32 dQ."""
    kv = tokens * kv_heads * head_dim
    return 2 * 2 * kv * a + 2 * 2 * kv * 4 + tokens * heads * head_dim * 4


def _memory(m, tokens, a, dims) -> dict:
    return {"ring buffers": ring_buffers(tokens, m.num_attention_heads, m.num_key_value_heads, m.head_dim, a)}


def _init_ring(dims):
    init_ring(dims.sp_group)   # communicators made and warmed up now, not in the first layer
    return dims.sp_group


_split, _gather, _divisor = layout_over_sp("zigzag")
register_method(SequenceMethod(
    name="ring", summary="ring attention: K, V go round the sp group (zigzag shares balance the causal work)",
    softmax="ring", linear=None, split=_split, gather=_gather, divisor=_divisor, groups=_init_ring,
    bytes_per_layer=_bytes_per_layer, memory=_memory))
