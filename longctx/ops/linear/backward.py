"""Lightning attention backward, on the three kernels of forward.py, and the autograd function.

With G_t the gradient of the loss with respect to the state S_t,
    G_t = q_t^T do_t + lam * G_{t+1}     (G at the end: q^T do + d final_state)
    dq_t = do_t S_t^T ,  dk_t = v_t G_t^T ,  dv_t = k_t G_t ,  d initial_state = lam * G_1
so dq is the forward recurrence run on (do, v, k) with the forward's states transposed, and dk, dv
are the same recurrence run backwards in time on (v, do, q) and (k, q, do) with the state gradient
R, which flows from d final_state towards the start (reset to zero across document starts).

Memory: besides the inputs, only the forward's segment start states (num_segments x B x H x Dk x Dv
fp32, num_segments in the tens) are kept; the backward's segment states take as much again.
"""
from __future__ import annotations

import torch

from longctx.ops.linear.forward import (CHUNK_SIZE, Chunks, chunk_local_states, chunk_outputs,
                                        lightning_attn_forward, scan_states)


def _sum_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per-query-head gradients (B, S, H, D) summed over each group of query heads sharing a k/v head."""
    batch, seqlen, heads, dim = grad.shape
    if heads == kv_heads:
        return grad
    return grad.view(batch, seqlen, kv_heads, heads // kv_heads, dim).sum(3, dtype=torch.float32).to(grad.dtype)


def lightning_attn_backward(do, d_final, q, k, v, decay, states, mult, chunks: Chunks):
    """Backward launcher: (dq, dk, dv, d_initial_state fp32) from do (B, S, H, Dv) and d_final (B, H, Dk, Dv) or None."""
    batch, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    if d_final is not None:
        d_final = d_final.float()
        if chunks.last_doc_empty is not None:  # an empty last document: the final state was zero
            d_final = d_final * (~chunks.last_doc_empty).float()
    # R at the end of each segment, from the end of the sequence backwards
    grad_states, _ = chunk_local_states(q, do, decay, chunks, states.shape[0], reverse=True)
    d_initial = scan_states(grad_states, mult, d_final, reverse=True)
    dq = chunk_outputs(do, v, k, decay, states, chunks, reverse=False, transpose_states=True)
    dk_heads = chunk_outputs(v, do, q, decay, grad_states, chunks, reverse=True, transpose_states=True)
    dv_heads = chunk_outputs(k, q, do, decay, grad_states, chunks, reverse=True)
    kv_heads = k.shape[2]
    return dq, _sum_groups(dk_heads, kv_heads), _sum_groups(dv_heads, kv_heads), d_initial.view(batch, heads, dk, dv)


class LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, decay, initial_state, cu_seqlens, chunk_size=CHUNK_SIZE, num_segments=None):
        q, k, v = (x.contiguous() for x in (q, k, v))
        decay = decay.float().contiguous()
        init = initial_state.float().contiguous() if initial_state is not None else None
        out, final, (states, mult, chunks) = lightning_attn_forward(q, k, v, decay, init, cu_seqlens, chunk_size,
                                                                    num_segments)
        ctx.save_for_backward(q, k, v, decay, states, mult)
        ctx.chunks = chunks
        ctx.initial_dtype = initial_state.dtype if initial_state is not None else None
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, decay, states, mult = ctx.saved_tensors
        if d_out is None:  # only the final state was used
            d_out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        dq, dk, dv, d_initial = lightning_attn_backward(d_out.contiguous(), d_final, q, k, v, decay, states, mult,
                                                        ctx.chunks)
        d_initial = d_initial.to(ctx.initial_dtype) if ctx.initial_dtype is not None else None
        return dq, dk, dv, None, d_initial, None, None, None
