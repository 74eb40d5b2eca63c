"""Causal softmax attention over contiguous sequence shards: the softmax layers of a hybrid model
under LASP (registered as the `allgather_kv` token mixer).

K and V are gathered from every rank (small with GQA) while the shard's own causal block runs; then
the queries of the document that continues from earlier shards attend to its earlier keys, and the
two results are merged by their log-sum-exp. The backward returns those keys' gradients with a
reduce-scatter that overlaps the diagonal block's backward. `cu_seqlens` describes the whole
sequence, as for LASP, whose view of the shard's documents (`shard_documents`) this reuses.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.model.attention import document_ranges, per_step, register_attention
from longctx.ops.dispatch import use_kernel

from .lasp import ShardDocuments, _expand_heads, _group_info, kernel_bounds, shard_documents

class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 1); the backward sums every rank's gradient of this shard.
    (The PyTorch path of `allgather_kv_attention`.)"""

    @staticmethod
    def forward(ctx, x, group):
        rank, world = _group_info(group)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        shares = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(shares, x.contiguous(), group=group)
        return torch.cat(shares, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(torch.stack(grad.chunk(ctx.world, dim=1)), ctx.group, ctx.rank), None


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
    return dict(cu_seqlens_q=bounds, cu_seqlens_k=bounds, max_seqlen_q=longest, max_seqlen_k=longest)


class _AllGatherKVAttention(torch.autograd.Function):
    """Flash-attention kernels with the log-sum-exp: the shard's own causal (diagonal) block runs
    while K and V are gathered; then the queries of the document that continues from earlier shards
    attend to its earlier keys, and the two results are merged. The backward sends the earlier
    keys' gradients back to their owners (reduce-scatter) while the diagonal block's backward runs."""

    @staticmethod
    def forward(ctx, q, k, v, group, docs: ShardDocuments, scale):
        from longctx.ops.attention import attention_forward
        rank, world = _group_info(group)
        batch, length = q.shape[:2]
        dk = k.shape[-1]
        kv = torch.cat([k, v], dim=-1).contiguous()  # one message: [B, L, Hkv, Dk + Dv]
        gathered = [torch.empty_like(kv) for _ in range(world)]
        work = dist.all_gather(gathered, kv, group=group, async_op=True) if world > 1 else None

        diagonal = _diagonal_args(docs, q.device)
        if diagonal:
            out, lse = attention_forward(q[0], k[0], v[0], causal=True, softmax_scale=scale,
                                         out_dtype=torch.float32, **diagonal)
            out, lse = out[None], lse[None]  # [1, L, H, D], [1, H, L]
        else:
            out, lse = attention_forward(q, k, v, causal=True, softmax_scale=scale, out_dtype=torch.float32)
        if work is not None:
            work.wait()

        seen = docs.carry_end if rank > 0 else 0  # queries that also see earlier shards' keys
        past_k = past_v = None
        if seen:
            past = torch.cat(gathered[:rank], dim=1)[:, docs.past_start:]
            past_k, past_v = past[..., :dk], past[..., dk:]
            out_past, lse_past = attention_forward(q[:, :seen], past_k, past_v, causal=False, softmax_scale=scale,
                                                   out_dtype=torch.float32)
            merged = torch.logaddexp(lse[..., :seen], lse_past)                     # [B, H, seen]
            keep = torch.exp(lse[..., :seen] - merged).transpose(1, 2)[..., None]   # [B, seen, H, 1]
            add = torch.exp(lse_past - merged).transpose(1, 2)[..., None]
            out[:, :seen] = out[:, :seen] * keep + out_past * add
            lse[..., :seen] = merged
        del gathered
        out = out.to(q.dtype)
        ctx.group, ctx.docs, ctx.scale, ctx.seen = group, docs, scale, seen
        ctx.save_for_backward(q, k, v, out, lse, past_k, past_v)
        return out

    @staticmethod
    def backward(ctx, dout):
        from longctx.ops.attention import attention_backward
        q, k, v, out, lse, past_k, past_v = ctx.saved_tensors
        group, docs, scale, seen = ctx.group, ctx.docs, ctx.scale, ctx.seen
        rank, world = _group_info(group)
        batch, length = q.shape[:2]
        dk = k.shape[-1]
        dout = dout.contiguous()

        # earlier keys first: their gradients travel back while the diagonal block's backward runs
        rows = torch.zeros(world, batch, length, k.shape[2], dk + v.shape[-1], dtype=k.dtype, device=k.device)
        dq_past = None
        if seen:
            dq_past, dk_past, dv_past = attention_backward(
                dout[:, :seen], q[:, :seen], past_k, past_v, out[:, :seen], lse[..., :seen].contiguous(),
                causal=False, softmax_scale=scale, grad_dtype=torch.float32)
            grad_past = torch.cat([dk_past, dv_past], dim=-1).to(k.dtype)  # [B, rank*L - past_start, Hkv, Dk+Dv]
            if batch == 1:
                rows.view(1, world * length, *rows.shape[3:])[:, docs.past_start:rank * length] = grad_past
            else:  # no documents: the past is whole shards
                rows[:rank] = grad_past.view(batch, rank, length, *rows.shape[3:]).transpose(0, 1)
        share, work = _reduce_scatter_rows(rows, group, rank, async_op=True) if world > 1 else (rows[0], None)

        diagonal = _diagonal_args(docs, q.device)
        if diagonal:
            dq, dk_local, dv_local = attention_backward(dout[0], q[0], k[0], v[0], out[0], lse[0], causal=True,
                                                        softmax_scale=scale, grad_dtype=torch.float32, **diagonal)
            dq, dk_local, dv_local = dq[None], dk_local[None], dv_local[None]
        else:
            dq, dk_local, dv_local = attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=scale,
                                                        grad_dtype=torch.float32)
        if dq_past is not None:
            dq[:, :seen] += dq_past
        if work is not None:
            work.wait()
        dk_local += share[..., :dk]
        dv_local += share[..., dk:]
        return dq.to(q.dtype), dk_local.to(k.dtype), dv_local.to(v.dtype), None, None, None


def _segments(cu_seqlens, start, end, total):
    """(q_start, q_end) local and (k_start, k_end) global of each document piece in [start, end)."""
    if cu_seqlens is None:
        return [(0, end - start, 0, end)]

    def compute():
        pieces = []
        for doc_start, doc_end in document_ranges(cu_seqlens, total):
            lo, hi = max(doc_start, start), min(doc_end, end)
            if lo < hi:
                pieces.append((lo - start, hi - start, doc_start, hi))
        return pieces
    return per_step(cu_seqlens, ("allgather_kv", start, end, total), compute)


def _sdpa_bottom_right(q, k, v, scale):
    """Causal attention with the queries at the end of the keys: q (B, Sq, H, D), k/v (B, Sk, Hkv, D)."""
    heads = q.shape[2]
    qt, kt, vt = q.transpose(1, 2), _expand_heads(k, heads).transpose(1, 2), _expand_heads(v, heads).transpose(1, 2)
    sq, sk = q.shape[1], k.shape[1]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


@register_attention("allgather_kv")
def allgather_kv_attention(q, k, v, *, group=None, cu_seqlens=None, max_seqlen=None, softmax_scale=None,
                           kernel: bool | None = None):
    """Causal softmax attention for contiguous shards over `group`: K and V are
    all-gathered (GQA keeps them small) and this rank's queries attend to the keys up to its
    shard's end. `cu_seqlens` describes the whole sequence, as for `lasp`. With the flash kernels
    (on CUDA, or kernel=True under the Triton interpreter) the gather overlaps the shard's own causal block; otherwise
    PyTorch's SDPA runs each document piece on the gathered keys."""
    rank, world = _group_info(group)
    batch, length = q.shape[:2]
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"packed documents (cu_seqlens) need batch size 1 under sequence parallelism, got {batch}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    supported = q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if use_kernel("all-gather-KV attention", q.device, supported, kernel, f"fp16/bf16/fp32, got {q.dtype}"):
        docs = shard_documents(cu_seqlens, rank, world, length)
        return _AllGatherKVAttention.apply(q, k, v, group, docs, scale)
    if world > 1:
        k, v = _GatherSequence.apply(k, group), _GatherSequence.apply(v, group)
    start, end = rank * length, (rank + 1) * length
    segments = _segments(cu_seqlens, start, end, world * length)
    pieces = [_sdpa_bottom_right(q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], scale) for qs, qe, ks, ke in segments]
    return torch.cat(pieces, dim=1)
