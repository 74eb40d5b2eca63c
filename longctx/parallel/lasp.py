"""LASP: linear-attention sequence parallelism (Sun et al., 2024), and the softmax attention that
runs beside it in hybrid models.

Each rank of the sequence-parallel group holds a contiguous shard of L tokens. Lightning attention
needs from the earlier shards only their d x d state per head, and the state's share is linear:

    out_t   = out0_t + lam^(t+1) q_t S_in          for the tokens before the shard's first document start
    S_out   = S0 + lam^L S_in                      if no document starts in the shard (else S_out = S0)

where out0, S0 are the shard's results from a zero state. So the work that does not need S_in runs
first, with no communication, and only a small step waits for it. Two implementations:
- with the Triton kernel (GPU, or kernel=True under the interpreter): its own phases with the exchange in between.
  (1) each segment's state from zero (a pass over k, v); (2) S_in arrives, the scan over segments
  (a tiny kernel) gives the segment start states and S_out, which goes on at once; (3) the outputs.
  No extra pass over the sequence: the incoming state enters through the segment start states,
  which the backward reuses (LASP's state caching) instead of receiving the state again.
- otherwise (`lightning_attn_func`'s PyTorch path: a CPU, float64, or kernel=False): the
  kernel from a zero state, then the formulas above as separate corrections.
The communication is one fp32 state per rank (B*H*Dk*Dv*4 bytes: 1 MiB at 16 heads of 128) and
never stands in front of work that does not need it: no barrier, no host sync, no blocking
receive ahead of the zero-state pass.

Two variants (`variant=`, or the registered mixers `lasp` and `lasp_allgather`):
- "ring" (LASP): the state travels rank to rank, S_out of rank r is S_in of rank r + 1. The receive
  is posted before the kernel runs; the chain of small updates costs N - 1 hops.
- "allgather" (LASP-2 with decay): one all-gather of every rank's zero-start state S0; each rank
  combines the prefix itself in fp32.
The backward mirrors it with the state gradient (dS_in = G + lam^L dS_out, where G is what the
shard's own outputs ask of the incoming state), and reuses the incoming state kept from the forward
(LASP's state caching) instead of passing it again. The decay is a fixed per-head constant here
(as in TransNormerLLM): it gets no gradient.

Documents: `cu_seqlens` describes the whole (global) packed sequence. A document that crosses into
this shard continues from the incoming state; a document that starts here resets it. The shard's
local document bounds are worked out once per `cu_seqlens` tensor (a host read, shared by all layers
of a step; none when `cu_seqlens` lives on the CPU).

Hybrid models run their softmax layers on the same contiguous shards with `allgather_kv.py`.
(Ring attention wants the zigzag layout, which the linear layers cannot use.) Registered as the
sequence-parallel methods `lasp` and `lasp_allgather` (the records at the end).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from longctx.model.attention import document_ranges, per_step, register_linear_attention
from longctx.ops.linear import forward as kernel
from longctx.ops.linear import lightning_attn_func, uses_kernel

from .registry import SequenceMethod, register_method
from .sequence import layout_over_sp

__all__ = ["lasp_attn_func", "VARIANTS", "ShardDocuments", "shard_documents"]

VARIANTS = ("ring", "allgather")
# Tokens per slice of the state corrections: bounds their fp32 temporaries at long context.
_CORRECTION_CHUNK = 16384


# ----------------------------------------------------------------------------------------------
# The shard's view of the packed documents


@dataclass(frozen=True)
class ShardDocuments:
    """How the global documents fall on each shard of `length` tokens."""
    length: int
    kernel_bounds: Optional[tuple]   # local document bounds for the kernel; None: one document
    carry_end: int                   # leading tokens that continue the previous shard's document
    last_start: int                  # local start of the last document (whose state leaves the shard)
    passes: tuple                    # per rank: no document starts there, the state passes through
    past_start: int = 0              # global start of the document that continues into the shard


def _documents_of_shard(bounds: list[int], rank: int, world: int, length: int) -> ShardDocuments:
    def starts_in(r):
        lo = r * length
        return [s - lo for s in bounds[:-1] if lo <= s < lo + length]

    mine = starts_in(rank)
    inner = [s for s in mine if s > 0]
    kernel_bounds = tuple([0] + inner + [length]) if inner else None
    carry_end = min(mine) if mine else length
    earlier = [s for s in bounds[:-1] if s < rank * length]
    return ShardDocuments(length=length, kernel_bounds=kernel_bounds, carry_end=carry_end,
                          last_start=max(mine) if mine else 0,
                          passes=tuple(not starts_in(r) for r in range(world)),
                          past_start=max(earlier) if carry_end and earlier else rank * length)


def shard_documents(cu_seqlens: Optional[torch.Tensor], rank: int, world: int, length: int) -> ShardDocuments:
    """This shard's view of the global `cu_seqlens` (cached per tensor: one host read per step)."""
    if cu_seqlens is None:
        return ShardDocuments(length, None, length, 0, tuple([True] * world))

    def compute():
        total = world * length
        bounds = [start for start, _ in document_ranges(cu_seqlens, total)] + [total]
        return _documents_of_shard(bounds, rank, world, length)
    return per_step(cu_seqlens, ("lasp", rank, world, length), compute)


# ----------------------------------------------------------------------------------------------
# Small pieces: decays, the corrections, communication


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b with fp32 (or wider) results; 16-bit operands stay 16-bit on the GPU (fp32
    accumulation, no TF32 tiles)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = a.expand(*shape, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = b.to(a.dtype).expand(*shape, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        try:
            return torch.bmm(a3, b3, out_dtype=torch.float32).view(*shape, a.shape[-2], b.shape[-1])
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.matmul(a.to(dtype), b.to(dtype))


def _decay_powers(decay: torch.Tensor, start: int, end: int, offset: int, sign: int = 1) -> torch.Tensor:
    """exp(-decay * (offset + sign * t)) for t in [start, end): (T, H) fp32, non-positive exponents."""
    t = torch.arange(start, end, device=decay.device, dtype=torch.float32)
    return torch.exp(-(offset + sign * t)[:, None] * decay.float()[None, :])


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[2], dim=2) if x.shape[2] != heads else x


def _add_incoming_output(out, q, state_in, decay, end):
    """out[:, t] += lam^(t+1) q_t S_in for t < end, in place (q, out (B, L, H, D); S_in (B, H, Dk, Dv))."""
    for start in range(0, end, _CORRECTION_CHUNK):
        stop = min(start + _CORRECTION_CHUNK, end)
        w = _decay_powers(decay, start, stop, offset=1)                     # [T, H]
        qs = q[:, start:stop].transpose(1, 2)                               # [B, H, T, Dk]
        term = _mm_fp32(qs, state_in).transpose(1, 2) * w[None, :, :, None]  # [B, T, H, Dv]
        out[:, start:stop] += term.to(out.dtype)


def _incoming_gradient(q, dout, decay, end):
    """G = sum over t < end of lam^(t+1) q_t^T dO_t: (B, H, Dk, Dv) fp32."""
    batch, _, heads, dk = q.shape
    grad = torch.zeros(batch, heads, dk, dout.shape[-1], device=q.device,
                       dtype=torch.promote_types(q.dtype, torch.float32))
    for start in range(0, end, _CORRECTION_CHUNK):
        stop = min(start + _CORRECTION_CHUNK, end)
        w = _decay_powers(decay, start, stop, offset=1)
        qs = (q[:, start:stop] * w[None, :, :, None].to(q.dtype)).permute(0, 2, 3, 1)  # [B, H, Dk, T]
        grad += _mm_fp32(qs, dout[:, start:stop].transpose(1, 2))
    return grad


def _add_query_gradient(dq, dout, state_in, decay, end):
    """dq[:, t] += lam^(t+1) dO_t S_in^T for t < end, in place."""
    for start in range(0, end, _CORRECTION_CHUNK):
        stop = min(start + _CORRECTION_CHUNK, end)
        w = _decay_powers(decay, start, stop, offset=1)
        term = _mm_fp32(dout[:, start:stop].transpose(1, 2), state_in.transpose(-1, -2))  # [B, H, T, Dk]
        dq[:, start:stop] += (term.transpose(1, 2) * w[None, :, :, None]).to(dq.dtype)


def _add_outgoing_gradients(dk, dv, k, v, grad_out, decay, begin, length):
    """The shard's last document feeds S_out = sum_t lam^(L-1-t) k_t^T v_t: add what dS_out asks of
    its k and v, in place (summed over the query heads of a GQA group)."""
    heads = grad_out.shape[1]
    for start in range(begin, length, _CORRECTION_CHUNK):
        stop = min(start + _CORRECTION_CHUNK, length)
        w = _decay_powers(decay, start, stop, offset=length - 1, sign=-1)[None, :, :, None]  # [1, T, H, 1]
        ks = _expand_heads(k[:, start:stop], heads).transpose(1, 2)        # [B, H, T, Dk]
        vs = _expand_heads(v[:, start:stop], heads).transpose(1, 2)        # [B, H, T, Dv]
        grad_k = _mm_fp32(vs, grad_out.transpose(-1, -2)).transpose(1, 2) * w  # [B, T, H, Dk]
        grad_v = _mm_fp32(ks, grad_out).transpose(1, 2) * w                   # [B, T, H, Dv]
        dk[:, start:stop] += _sum_groups(grad_k, dk.shape[2]).to(dk.dtype)
        dv[:, start:stop] += _sum_groups(grad_v, dv.shape[2]).to(dv.dtype)


def _sum_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    batch, length, heads, dim = x.shape
    if heads == kv_heads:
        return x
    return x.view(batch, length, kv_heads, heads // kv_heads, dim).sum(3, dtype=torch.float32).to(x.dtype)


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _chain(terms: list[torch.Tensor], passes: list[bool], block_decay: torch.Tensor) -> torch.Tensor:
    """Fold x = term_i + [passes_i] lam^L x over the terms in order, in fp32."""
    x = torch.zeros_like(terms[0])
    for term, through in zip(terms, passes):
        x = term + block_decay * x if through else term.clone()
    return x


# ----------------------------------------------------------------------------------------------
# The autograd function


class _LaspGeneric(torch.autograd.Function):
    """Any `lightning_attn_func` (the PyTorch path on a CPU): the kernel from a zero state, then the
    incoming state's share added by separate corrections."""

    @staticmethod
    def forward(ctx, q, k, v, decay, group, docs: ShardDocuments, variant: str, needs_grad: bool):
        rank, world = _group_info(group)
        batch, length, heads, dk = q.shape
        dv = v.shape[-1]
        state_shape = (batch, heads, dk, dv)
        decay = decay.detach().float()
        block_decay = torch.exp(-decay * length)[None, :, None, None]  # lam^L, [1, H, 1, 1]

        state_in, receive = _post_state_receive(variant, group, rank, state_shape, q.device)
        bounds = kernel_bounds(docs, q.device)
        leaves = [x.detach().requires_grad_(needs_grad and x.requires_grad) for x in (q, k, v)]
        with torch.set_grad_enabled(needs_grad):
            out, state0 = lightning_attn_func(*leaves, decay, initial_state=None, cu_seqlens=bounds, kernel=False)
        state0 = state0.detach().float()

        send = None
        if variant == "ring":
            if receive is not None:
                receive.wait()
            else:
                state_in = torch.zeros(state_shape, device=q.device, dtype=torch.float32)
            if rank < world - 1:
                state_out = state0 + block_decay * state_in if docs.passes[rank] else state0
                send = dist.isend(state_out.contiguous(), dst=_global_rank(group, rank + 1), group=group)
        else:
            states = [state0]
            if world > 1:
                states = [torch.empty_like(state0) for _ in range(world)]
                dist.all_gather(states, state0.contiguous(), group=group)
            state_in = _chain(states[:rank], list(docs.passes[:rank]), block_decay) if rank else torch.zeros_like(state0)

        result = out.detach()
        if rank > 0 and docs.carry_end > 0:
            _add_incoming_output(result, q, state_in, decay, docs.carry_end)
        if send is not None:
            send.wait()

        ctx.group, ctx.docs, ctx.variant = group, docs, variant
        ctx.graph = (out, leaves) if needs_grad else None
        ctx.save_for_backward(q, k, v, decay, state_in)
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, decay, state_in = ctx.saved_tensors
        group, docs, variant = ctx.group, ctx.docs, ctx.variant
        rank, world = _group_info(group)
        length = q.shape[1]
        dout = dout.contiguous()
        block_decay = torch.exp(-decay * length)[None, :, None, None]

        # what this shard's own outputs ask of the incoming state: needs only q and dO
        grad_in = _incoming_gradient(q, dout, decay, docs.carry_end if rank > 0 else 0)
        receive = gather = None
        if variant == "ring" and rank < world - 1:
            grad_out = torch.empty_like(grad_in)
            receive = dist.irecv(grad_out, src=_global_rank(group, rank + 1), group=group)
        elif variant == "allgather" and world > 1:
            grads = [torch.empty_like(grad_in) for _ in range(world)]
            gather = dist.all_gather(grads, grad_in.contiguous(), group=group, async_op=True)

        out, leaves = ctx.graph
        wanted = [x for x in leaves if x.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, dout))
        dq, dk, dv = (next(found) if x.requires_grad else None for x in leaves)
        ctx.graph = None

        send = None
        grad_out_known = rank < world - 1
        if variant == "ring":
            if receive is not None:
                receive.wait()
            if rank > 0:
                send_grad = grad_in + block_decay * grad_out if (grad_out_known and docs.passes[rank]) else grad_in
                send = dist.isend(send_grad.contiguous(), dst=_global_rank(group, rank - 1), group=group)
        elif gather is not None:
            gather.wait()
            if grad_out_known:
                # dS_out(r) = dS_in(r + 1), folded from the last rank down
                later = list(range(world - 1, rank, -1))
                grad_out = _chain([grads[j] for j in later], [docs.passes[j] for j in later], block_decay)

        if dq is not None and rank > 0 and docs.carry_end > 0:
            _add_query_gradient(dq, dout, state_in, decay, docs.carry_end)
        if grad_out_known and (dk is not None or dv is not None):
            dk = dk if dk is not None else torch.zeros_like(k)
            dv = dv if dv is not None else torch.zeros_like(v)
            _add_outgoing_gradients(dk, dv, k, v, grad_out, decay, docs.last_start, length)
            dk = dk if ctx.needs_input_grad[1] else None
            dv = dv if ctx.needs_input_grad[2] else None
        if send is not None:
            send.wait()
        return dq, dk, dv, None, None, None, None, None


def _post_state_receive(variant: str, group, rank: int, shape: tuple, device):
    """The ring variant's receive of the previous rank's state, posted before any work so that it
    completes while this shard's own kernel runs: (buffer, work), or (None, None)."""
    if variant != "ring" or rank == 0:
        return None, None
    state_in = torch.empty(shape, dtype=torch.float32, device=device)
    return state_in, dist.irecv(state_in, src=_global_rank(group, rank - 1), group=group)


def kernel_bounds(docs: ShardDocuments, device) -> Optional[torch.Tensor]:
    """This shard's document bounds for the kernels (int32), or None for one document."""
    if docs.kernel_bounds is None:
        return None
    return torch.tensor(docs.kernel_bounds, dtype=torch.int32, device=device)


def _plan(q, v, bounds):
    """The kernel's chunk table and segment count, as `lightning_attn_forward` plans them."""
    batch, length, heads, _ = q.shape
    chunks = kernel.Chunks(batch, length, kernel.CHUNK_SIZE, bounds, q.device)
    return chunks, kernel.plan_segments(chunks, heads, v.shape[-1], q.device)


class _LaspPhased(torch.autograd.Function):
    """The Triton kernel's own phases with the state exchange between them: (1) every segment's
    state from zero, needing nothing from other ranks; (2) the incoming state, then the scan over
    segments, which yields the outgoing state; (3) the outputs. Only the tiny scan waits for the
    state; the incoming state enters the segment start states, which the backward reuses."""

    @staticmethod
    def forward(ctx, q, k, v, decay, group, docs: ShardDocuments, variant: str):
        rank, world = _group_info(group)
        batch, length, heads, dk = q.shape
        state_shape = (batch, heads, dk, v.shape[-1])
        q, k, v = (x.contiguous() for x in (q, k, v))
        decay = decay.detach().float().contiguous()
        block_decay = torch.exp(-decay * length)[None, :, None, None]
        uses_incoming = rank > 0 and docs.carry_end > 0  # a document starting at token 0 ignores it

        state_in, receive = _post_state_receive(variant, group, rank, state_shape, q.device)
        bounds = kernel_bounds(docs, q.device)
        chunks, segments = _plan(q, v, bounds)
        states, mult = kernel.chunk_local_states(k, v, decay, chunks, segments, reverse=False)

        incoming = None
        if variant == "ring":
            if uses_incoming:
                receive.wait()
                incoming = state_in
        elif world > 1:
            zero_final = kernel.scan_states(states.clone(), mult, None, reverse=False).view(state_shape)
            gathered = [torch.empty_like(zero_final) for _ in range(world)]
            dist.all_gather(gathered, zero_final, group=group)
            if uses_incoming:
                incoming = _chain(gathered[:rank], list(docs.passes[:rank]), block_decay)
        final = kernel.scan_states(states, mult, incoming, reverse=False)  # states: segment starts now
        send = None
        if variant == "ring" and rank < world - 1:
            send = dist.isend(final.view(state_shape), dst=_global_rank(group, rank + 1), group=group)
        out = kernel.chunk_outputs(q, k, v, decay, states, chunks, reverse=False)
        for work in (receive if not uses_incoming else None, send):
            if work is not None:
                work.wait()

        ctx.group, ctx.docs, ctx.variant, ctx.chunks = group, docs, variant, chunks
        ctx.save_for_backward(q, k, v, decay, states, mult)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, decay, states, mult = ctx.saved_tensors
        group, docs, variant, chunks = ctx.group, ctx.docs, ctx.variant, ctx.chunks
        rank, world = _group_info(group)
        batch, length, heads, dk = q.shape
        state_shape = (batch, heads, dk, v.shape[-1])
        dout = dout.contiguous()
        block_decay = torch.exp(-decay * length)[None, :, None, None]
        uses_incoming = rank > 0 and docs.carry_end > 0

        receive = None
        if variant == "ring" and rank < world - 1:
            grad_out = torch.empty(state_shape, device=q.device, dtype=torch.float32)
            receive = dist.irecv(grad_out, src=_global_rank(group, rank + 1), group=group)
        grad_states, _ = kernel.chunk_local_states(q, dout, decay, chunks, states.shape[0], reverse=True)

        outgoing = None  # the gradient of the state this shard passed on
        if variant == "ring":
            if receive is not None:
                receive.wait()
                outgoing = grad_out
        elif world > 1:
            zero_grad = kernel.scan_states(grad_states.clone(), mult, None, reverse=True).view(state_shape)
            if not uses_incoming:
                zero_grad.zero_()
            gathered = [torch.empty_like(zero_grad) for _ in range(world)]
            dist.all_gather(gathered, zero_grad, group=group)
            if rank < world - 1:
                later = list(range(world - 1, rank, -1))
                outgoing = _chain([gathered[j] for j in later], [docs.passes[j] for j in later], block_decay)
        grad_in = kernel.scan_states(grad_states, mult, outgoing, reverse=True).view(state_shape)
        send = None
        if variant == "ring" and rank > 0:
            grad_in = grad_in if uses_incoming else torch.zeros_like(grad_in)
            send = dist.isend(grad_in, dst=_global_rank(group, rank - 1), group=group)

        dq = kernel.chunk_outputs(dout, v, k, decay, states, chunks, reverse=False, transpose_states=True)
        dk_heads = kernel.chunk_outputs(v, dout, q, decay, grad_states, chunks, reverse=True, transpose_states=True)
        dv_heads = kernel.chunk_outputs(k, q, dout, decay, grad_states, chunks, reverse=True)
        if send is not None:
            send.wait()
        kv_heads = k.shape[2]
        return dq, _sum_groups(dk_heads, kv_heads), _sum_groups(dv_heads, kv_heads), None, None, None, None


def lasp_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, group=None, *,
                   cu_seqlens: Optional[torch.Tensor] = None, variant: str = "ring",
                   kernel: Optional[bool] = None) -> torch.Tensor:
    """Lightning attention over a sequence split contiguously across `group` (None: the default group).

    q, k (B, L, H, Dk) (k may have fewer, grouped heads), v (B, L, Hkv, Dv): this rank's shard, every
    rank's of the same length L (layout "contiguous" of `split_sequence`). decay (H,) >= 0, fixed.
    `cu_seqlens` (int32): document bounds of the whole sequence of world * L tokens (B = 1).
    Returns this rank's output (B, L, H, Dv), equal to the single-device output's shard.
    `kernel`: the Triton kernels' phases or the PyTorch form, chosen as `lightning_attn_func` does.
    """
    if variant not in VARIANTS:
        raise ValueError(f"LASP variant {variant!r} is unknown; choose one of {VARIANTS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(f"q, k, v must be (B, L, H, D) with the same B and L; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if decay.shape != (q.shape[2],):
        raise ValueError(f"decay must have one value per query head ({q.shape[2]},); got {tuple(decay.shape)}")
    if decay.requires_grad:
        raise ValueError("LASP treats the decay as a fixed per-head constant; pass decay.detach() "
                         "(or keep it in a buffer)")
    rank, world = _group_info(group)
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"packed documents (cu_seqlens) need batch size 1, got {q.shape[0]}: pack the "
                         f"batch into one row")
    docs = shard_documents(cu_seqlens, rank, world, q.shape[1])
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if uses_kernel(q, v, kernel):
        return _LaspPhased.apply(q, k, v, decay, group, docs, variant)
    return _LaspGeneric.apply(q, k, v, decay, group, docs, variant, needs_grad)


@register_linear_attention("lasp")
def lasp_ring(q, k, v, decay, *, group=None, cu_seqlens=None):
    """LASP with the state passed rank to rank, over `group`."""
    return lasp_attn_func(q, k, v, decay, group, cu_seqlens=cu_seqlens, variant="ring")


@register_linear_attention("lasp_allgather")
def lasp_allgather(q, k, v, decay, *, group=None, cu_seqlens=None):
    """LASP-2 style: one all-gather of the zero-start states, over `group`."""
    return lasp_attn_func(q, k, v, decay, group, cu_seqlens=cu_seqlens, variant="allgather")


# ----------------------------------------------------------------------------------------------
# The records of the two variants (softmax layers of a hybrid run `allgather_kv`)


def _lasp_bytes(variant: str):
    def bytes_per_layer(m, seqlen, a, dims, kind) -> float:
        """A linear layer moves one fp32 (H, Dk, Dv) state per rank each way (ring: to the next
        rank; allgather: to the N - 1 others); a softmax layer all-gathers K and V in the forward
        and reduce-scatters their gradients in the backward."""
        n, d = dims.sp, m.head_dim
        if kind == "softmax":
            return 2 * (n - 1) * seqlen / n * 2 * m.num_key_value_heads * d * a
        peers = 1 if variant == "ring" else n - 1
        return 2 * peers * m.num_attention_heads * d * d * 4
    return bytes_per_layer


def _allgather_kv_memory(m, tokens, a, dims) -> dict:
    """A hybrid's softmax layers gather every rank's K and V (one layer at a time)."""
    if m.layer_types is None or "softmax" not in m.layer_types:
        return {}
    return {"gathered K, V": dims.sp * tokens * 2 * m.num_key_value_heads * m.head_dim * a}


_split, _gather, _divisor = layout_over_sp("contiguous")
for _name, _variant, _summary in (
        ("lasp", "ring", "LASP: linear-attention layers pass a d x d state rank to rank (contiguous shares)"),
        ("lasp_allgather", "allgather", "LASP-2: linear-attention layers all-gather the d x d states")):
    register_method(SequenceMethod(
        name=_name, summary=_summary, softmax="allgather_kv", linear=_name, split=_split, gather=_gather,
        divisor=_divisor, groups=lambda dims: dims.sp_group, bytes_per_layer=_lasp_bytes(_variant),
        memory=_allgather_kv_memory))
