"""Causal softmax attention over contiguous sequence shards: the softmax layers of a hybrid model
under LASP (registered as the `allgather_kv` token mixer).

K and V are gathered from every rank (small with GQA) while the shard's own causal block runs; then
the queries of the document that continues from earlier shards attend to its earlier keys, and the
two results are merged by their log-sum-exp. The backward returns those keys' gradients with a
reduce-scatter that overlaps the diagonal block's backward. `cu_seqlens` describes the whole
sequence, as for LASP, whose view of the shard's documents (`shard_documents`) this reuses.
Both blocks run on the attention backend the caller names (the model's `config.attention`) through
the seam (`longctx.ops.attention.backends`), merged with its one merge: any device and dtype the
backend takes (float64 on a CPU with `torch`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from longctx.model.attention import register_attention
from longctx.ops.attention import backends as seam
from longctx.ops.attention.naive import accumulation_dtype

from .lasp import ShardDocuments, _group_info, kernel_bounds, shard_documents


def _reduce_scatter_rows(rows: torch.Tensor, group, rank: int, async_op: bool = False):
    """Sum `rows` (N, ...) over the group and keep row `rank`: reduce-scatter (NCCL), or all-reduce
    and pick (gloo has no reduce-scatter). With `async_op`: (result, work or None)."""
    if dist.get_backend(group) == "gloo":
        rows = rows.contiguous()
        work = dist.all_reduce(rows, group=group, async_op=async_op)
        return (rows[rank], work) if async_op else rows[rank]
    mine = torch.empty(rows.shape[1:], dtype=rows.dtype, device=rows.device)
    work = dist.reduce_scatter_tensor(mine, rows.contiguous(), group=group, async_op=async_op)
    return (mine, work) if async_op else mine


def _diagonal_args(docs: ShardDocuments, device) -> dict:
    if docs.kernel_bounds is None:
        return {}
    bounds = kernel_bounds(docs, device)
    longest = max(b - a for a, b in zip(docs.kernel_bounds[:-1], docs.kernel_bounds[1:]))
    return dict(cu_seqlens=bounds, max_seqlen=longest)


def _backends(name, q, k, docs: ShardDocuments):
    """(diagonal block's backend, earlier keys' backend) that `name` means for these shapes."""
    packed = docs.kernel_bounds is not None
    longest = (max(b - a for a, b in zip(docs.kernel_bounds[:-1], docs.kernel_bounds[1:])) if packed
               else q.shape[1])
    return (seam.select_for(name, q, k, causal=True, varlen=packed, seqlen=longest),
            seam.select_for(name, q, k, causal=False, seqlen=q.shape[1]))


class _AllGatherKVAttention(torch.autograd.Function):
    """Attention with the log-sum-exp (the seam's backends): the shard's own causal (diagonal) block runs
    while K and V are gathered; then the queries of the document that continues from earlier shards
    attend to its earlier keys, and the two results are merged. The backward sends the earlier
    keys' gradients back to their owners (reduce-scatter) while the diagonal block's backward runs."""

    @staticmethod
    def forward(ctx, q, k, v, group, docs: ShardDocuments, scale, backend):
        rank, world = _group_info(group)
        diagonal_backend, past_backend = _backends(backend, q, k, docs)
        accum = accumulation_dtype(q.dtype)
        batch, length = q.shape[:2]
        dk = k.shape[-1]
        kv = torch.cat([k, v], dim=-1).contiguous()  # one message: [B, L, Hkv, Dk + Dv]
        gathered = [torch.empty_like(kv) for _ in range(world)]
        work = dist.all_gather(gathered, kv, group=group, async_op=True) if world > 1 else None

        diagonal = _diagonal_args(docs, q.device)
        if diagonal:
            out, lse = diagonal_backend.forward(q[0], k[0], v[0], causal=True, softmax_scale=scale,
                                                out_dtype=accum, **diagonal)
            out, lse = out[None], lse[None]  # [1, L, H, D], [1, H, L]
        else:
            out, lse = diagonal_backend.forward(q, k, v, causal=True, softmax_scale=scale, out_dtype=accum)
        lse = lse.to(accum)
        if work is not None:
            work.wait()

        seen = docs.carry_end if rank > 0 else 0  # queries that also see earlier shards' keys
        past_k = past_v = None
        if seen:
            past = torch.cat(gathered[:rank], dim=1)[:, docs.past_start:]
            past_k, past_v = past[..., :dk], past[..., dk:]
            out_past, lse_past = past_backend.forward(q[:, :seen], past_k, past_v, causal=False,
                                                      softmax_scale=scale, out_dtype=accum)
            seam.merge_into(out[:, :seen], lse[..., :seen], out_past, lse_past)   # in place, on the views
        del gathered
        out = out.to(q.dtype)
        ctx.group, ctx.docs, ctx.scale, ctx.seen = group, docs, scale, seen
        ctx.backends = diagonal_backend, past_backend
        ctx.save_for_backward(q, k, v, out, lse, past_k, past_v)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, past_k, past_v = ctx.saved_tensors
        diagonal_backend, past_backend = ctx.backends
        accum = accumulation_dtype(q.dtype)
        group, docs, scale, seen = ctx.group, ctx.docs, ctx.scale, ctx.seen
        rank, world = _group_info(group)
        batch, length = q.shape[:2]
        dk = k.shape[-1]
        dout = dout.contiguous()

        # earlier keys first: their gradients travel back while the diagonal block's backward runs
        rows = torch.zeros(world, batch, length, k.shape[2], dk + v.shape[-1], dtype=k.dtype, device=k.device)
        dq_past = None
        if seen:
            dq_past, dk_past, dv_past = past_backend.backward(
                dout[:, :seen], q[:, :seen], past_k, past_v, out[:, :seen], lse[..., :seen].contiguous(),
                causal=False, softmax_scale=scale, grad_dtype=accum)
            grad_past = torch.cat([dk_past, dv_past], dim=-1).to(k.dtype)  # [B, rank*L - past_start, Hkv, Dk+Dv]
            if batch == 1:
                rows.view(1, world * length, *rows.shape[3:])[:, docs.past_start:rank * length] = grad_past
            else:  # no documents: the past is whole shards
                rows[:rank] = grad_past.view(batch, rank, length, *rows.shape[3:]).transpose(0, 1)
        share, work = _reduce_scatter_rows(rows, group, rank, async_op=True) if world > 1 else (rows[0], None)

        diagonal = _diagonal_args(docs, q.device)
        if diagonal:
            dq, dk_local, dv_local = diagonal_backend.backward(dout[0], q[0], k[0], v[0], out[0], lse[0], causal=True,
                                                               softmax_scale=scale, grad_dtype=accum, **diagonal)
            dq, dk_local, dv_local = dq[None], dk_local[None], dv_local[None]
        else:
            dq, dk_local, dv_local = diagonal_backend.backward(dout, q, k, v, out, lse, causal=True,
                                                               softmax_scale=scale, grad_dtype=accum)
        if dq_past is not None:
            dq[:, :seen] += dq_past
        if work is not None:
            work.wait()
        dk_local += share[..., :dk]
        dv_local += share[..., dk:]
        return dq.to(q.dtype), dk_local.to(k.dtype), dv_local.to(v.dtype), None, None, None, None


@register_attention("allgather_kv")
def allgather_kv_attention(q, k, v, *, group=None, cu_seqlens=None, max_seqlen=None, softmax_scale=None,
                           backend: str = "auto"):
    """Causal softmax attention for contiguous shards over `group`: K and V are all-gathered (GQA
    keeps them small) while the shard's own causal block runs, and this rank's queries attend to
    the keys up to its shard's end. `cu_seqlens` describes the whole sequence, as for `lasp`;
    `backend` names the attention backend (`longctx.ops.attention.backends`) both blocks run on."""
    rank, world = _group_info(group)
    batch, length = q.shape[:2]
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"packed documents (cu_seqlens) need batch size 1 under sequence parallelism, got {batch}")
    seam.check_name(backend)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    docs = shard_documents(cu_seqlens, rank, world, length)
    return _AllGatherKVAttention.apply(q, k, v, group, docs, scale, backend)
