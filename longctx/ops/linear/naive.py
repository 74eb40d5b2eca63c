"""Plain PyTorch lightning attention: the definition the Triton kernels are tested against.

Lightning attention is causal linear attention with a per-head exponential decay:

    S_t = exp(-decay) * S_{t-1} + k_t^T v_t        S_0 = initial_state (or zero)
    o_t = q_t S_t

with q, k (B, S, H, Dk), v (B, S, H, Dv) and the state S (B, H, Dk, Dv). With `cu_seqlens` (packed
documents over the flattened B*S tokens, B = 1) the state restarts from zero at every document
start; `initial_state` feeds the first document and the final state is the one at the end of the
last document (what sequence parallelism passes on: that document may continue on the next rank).

Two references: `lightning_attn_recurrent` runs the recurrence token by token (the definition,
slow, for tests at small shapes, usually in float64) and `lightning_attn_chunked` computes the same
in chunks with matrix products (differentiable by autograd, state kept in fp32).
"""
from __future__ import annotations

import torch


def _documents(cu_seqlens: torch.Tensor | None, batch: int, seqlen: int) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of each independent sequence; the rows themselves without cu_seqlens."""
    if cu_seqlens is None:
        return [(b, 0, seqlen) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, start, end) for start, end in zip(bounds[:-1], bounds[1:])]


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat grouped k/v heads for each query head of their group: (B, S, Hkv, D) -> (B, S, H, D)."""
    return x.repeat_interleave(heads // x.shape[2], dim=2) if x.shape[2] != heads else x


def lightning_attn_recurrent(q, k, v, decay, initial_state=None, cu_seqlens=None):
    """The recurrence token by token, in the dtype of the inputs. Returns (out, final_state)."""
    batch, seqlen, heads, _ = q.shape
    k, v = _expand_kv(k, heads), _expand_kv(v, heads)
    lam = torch.exp(-decay.to(q.dtype))[:, None, None]  # [H, 1, 1]
    zero = q.new_zeros(heads, q.shape[-1], v.shape[-1])
    rows = [[] for _ in range(batch)]  # outputs per row, [H, Dv] each (lists: no in-place writes for autograd)
    finals = [zero] * batch
    for index, (b, start, end) in enumerate(_documents(cu_seqlens, batch, seqlen)):
        first = cu_seqlens is None or index == 0
        state = initial_state[b].to(q.dtype) if first and initial_state is not None else zero
        for t in range(start, end):
            state = lam * state + k[b, t, :, :, None] * v[b, t, :, None, :]  # [H, Dk, Dv]
            rows[b].append(torch.einsum("hk,hkv->hv", q[b, t], state))
        finals[b] = state
    out = torch.stack([torch.stack(r) if r else q.new_zeros(0, heads, v.shape[-1]) for r in rows])
    return out, torch.stack(finals)


def _chunk_decays(decay: torch.Tensor, length: int):
    """Decay factors of one chunk of `length` tokens, each exp of a non-positive exponent.

    Returns q_decay (H, L) = lam^(i+1), k_decay (H, L) = lam^(L-1-j), block_decay (H,) = lam^L and
    the causal intra-chunk matrix (H, L, L) = lam^(i-j) for j <= i, else 0.
    """
    position = torch.arange(length, device=decay.device, dtype=torch.float32)
    d = decay.float()[:, None]
    q_decay = torch.exp(-d * (position + 1))
    k_decay = torch.exp(-d * (length - 1 - position))
    distance = position[:, None] - position[None, :]
    causal = distance >= 0
    intra = torch.exp(-d[:, :, None] * distance.clamp(min=0)) * causal
    return q_decay, k_decay, torch.exp(-d[:, 0] * length), intra


def _chunked_document(q, k, v, decay, state, chunk_size):
    """One document: q, k (T, H, Dk), v (T, H, Dv), state (H, Dk, Dv) fp32 -> out (T, H, Dv), state."""
    outs = []
    for start in range(0, q.shape[0], chunk_size):
        qc, kc, vc = (x[start:start + chunk_size].float().transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        q_decay, k_decay, block_decay, intra = _chunk_decays(decay, qc.shape[1])
        scores = (qc @ kc.transpose(1, 2)) * intra  # [H, L, L]
        out = scores @ vc + (qc * q_decay[..., None]) @ state
        state = block_decay[:, None, None] * state + (kc * k_decay[..., None]).transpose(1, 2) @ vc
        outs.append(out.transpose(0, 1))
    return torch.cat(outs).to(q.dtype), state


def lightning_attn_chunked(q, k, v, decay, initial_state=None, cu_seqlens=None, chunk_size=64):
    """The same as `lightning_attn_recurrent`, in chunks, fp32 math; autograd gives the gradients."""
    batch, seqlen, heads, dk = q.shape
    k, v = _expand_kv(k, heads), _expand_kv(v, heads)
    zero = q.new_zeros(heads, dk, v.shape[-1], dtype=torch.float32)
    rows = [[] for _ in range(batch)]
    finals = [zero] * batch
    for index, (b, start, end) in enumerate(_documents(cu_seqlens, batch, seqlen)):
        first = cu_seqlens is None or index == 0
        state = initial_state[b].float() if first and initial_state is not None else zero
        if end > start:
            out, state = _chunked_document(q[b, start:end], k[b, start:end], v[b, start:end], decay, state,
                                           chunk_size)
            rows[b].append(out)
        finals[b] = state
    out = torch.stack([torch.cat(r) if r else q.new_zeros(0, heads, v.shape[-1]) for r in rows])
    return out, torch.stack(finals)
