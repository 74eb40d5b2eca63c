"""FlashAttention-2 forward in Triton: tiled, online softmax in base 2, never the (Sq, Sk) matrix.

One program computes BLOCK_M query rows of one (batch or document, head): it streams the key blocks
the rows may see, first those wholly visible (no mask at all), then the few on the causal diagonal
or past the end of the keys (masked). Key blocks wholly above the diagonal are never visited.

Every tile moves through a tensor descriptor (`tl.make_tensor_descriptor`, TMA on Hopper) made per
(document or sequence, head): rows past the document's end and columns past the head dim read as 0
and are never written, so no load or store needs a mask. On the H200 that measured 3-12 % faster
than pointer loads (bench/results/attention_h200.json as of commit 62124b3); the launchers bring any
input into the layout descriptors need (`tma_layout`).

Shared with the backward (backward.py): `check_inputs`, the layout helpers `tma_layout`, `strides` and
`lse_strides`, and the jitted `_sequence_bounds`, `_key_range` and `_tile_descriptor`.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..dispatch import INTERPRETED

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# configurations: chosen on the H200 with the descriptor kernels (scripts/bench_attention.py --sweep,
# bench/results/attention_h200.json: 6 candidates per head dim), keyed on the padded head dim and the
# causal flag; sequence lengths are run-time values, never compiled in.
# ----------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages)
FWD_CONFIGS = {
    (16, False): (128, 64, 8, 3), (16, True): (128, 64, 8, 3),
    (32, False): (128, 64, 8, 3), (32, True): (128, 64, 8, 3),
    (64, False): (128, 64, 8, 3), (64, True): (128, 64, 8, 3),
    (128, False): (128, 128, 8, 3), (128, True): (128, 128, 8, 3),
    (256, False): (128, 64, 8, 2), (256, True): (128, 64, 8, 2),
}
# CPU (TRITON_INTERPRET=1): small, unequal blocks so that tiny tests cross block edges both ways.
INTERPRET_FWD_CONFIG = (32, 16, 4, 1)


def fwd_config(block_d: int, causal: bool, device: torch.device) -> tuple:
    if device.type != "cuda":
        return INTERPRET_FWD_CONFIG
    return FWD_CONFIGS[(block_d, causal)]


def padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# ----------------------------------------------------------------------------------------------
# input checks and layouts
# ----------------------------------------------------------------------------------------------
def check_inputs(q, k, v, varlen: bool, cu_seqlens_q=None, cu_seqlens_k=None, causal_offsets=None):
    """Raise a clear error for anything the kernels do not support."""
    rank = 3 if varlen else 4
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {layout} ({rank} dims), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}: cast them first")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype {q.dtype} is not supported: use float16 or bfloat16 (float32 for tests)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda":
        if not INTERPRETED:
            raise RuntimeError(f"the Triton attention kernels run on CUDA tensors, got {q.device}: use the sdpa "
                               f"attention on a CPU, or set TRITON_INTERPRET=1 before importing longctx (tests)")
        if q.dtype == torch.bfloat16:
            raise TypeError("Triton's CPU interpreter computes bf16 dots wrongly: use float16 or float32 under "
                            "TRITON_INTERPRET=1 (bf16 runs on GPUs)")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(f"q, k, v must share the head dim, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is over the supported {MAX_HEAD_DIM}: "
                         f"split the heads or use the sdpa attention")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads}) "
                         f"for grouped-query attention")
    if not varlen:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")
        return
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                     ("causal_offsets", causal_offsets)):
        if cu is None:
            if name == "causal_offsets":
                continue
            raise ValueError(f"{name} is needed for the packed (total_tokens, heads, head_dim) layout")
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
            raise TypeError(f"{name} must be a 1-d torch.int32 tensor, got "
                            f"{getattr(cu, 'dtype', type(cu).__name__)}: use .to(torch.int32)")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}: move it with .to(q.device)")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 2:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both hold documents + 1 entries, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    if causal_offsets is not None and causal_offsets.numel() != cu_seqlens_q.numel() - 1:
        raise ValueError(f"causal_offsets needs one entry per document ({cu_seqlens_q.numel() - 1}), "
                         f"got {causal_offsets.numel()}")


def tma_layout(t: torch.Tensor) -> torch.Tensor:
    """`t` as the tensor descriptors need it: the head dim contiguous, the start 16-byte aligned and every
    other stride a multiple of 8 elements (16 bytes of the narrowest dtype the results may be written
    in). Any batch/sequence/head strides that meet that are taken as they are; anything else is copied,
    the head dim padded with zeros to a multiple of 8 (zero columns change no product; the launchers
    cut them off the results)."""
    unit = 8  # elements: 16 bytes of a 16-bit gradient, 32 of fp32
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % unit == 0 for s in t.stride()[:-1]):
        return t
    pad = -t.shape[-1] % unit
    return torch.nn.functional.pad(t, (0, pad)) if pad else t.clone(memory_format=torch.contiguous_format)


def descriptor_scratch_on(device: torch.device) -> None:
    """Descriptors made inside a kernel live in a scratch buffer that Triton asks an allocator for at
    each launch. The allocator is a context variable, so it is set before every launch (the backward
    may run in autograd's own thread), on the device of the launch's tensors."""
    triton.set_allocator(functools.partial(_scratch, device))


def _scratch(device: torch.device, size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device=device)


def strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, sequence, head) strides; a packed tensor has no batch stride (documents use cu_seqlens)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of the log-sum-exp, (B, H, Sq) dense or (H, Tq) varlen; rows contiguous."""
    if varlen:
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)


def scale_or_default(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    # the forward takes each row's maximum before scaling, which holds for a positive scale only
    if not float(softmax_scale) > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}: leave it None for 1/sqrt(head_dim)")
    return float(softmax_scale)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sequence_bounds(CU_Q, CU_K, OFFSETS, i_b, seqlen_q, seqlen_k, causal_offset,
                     IS_VARLEN: tl.constexpr, HAS_OFFSETS: tl.constexpr):
    """Start and length of this program's query and key rows, and its causal offset."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + i_b)
        len_q = tl.load(CU_Q + i_b + 1) - q_start
        k_start = tl.load(CU_K + i_b)
        len_k = tl.load(CU_K + i_b + 1) - k_start
        if HAS_OFFSETS:
            offset = tl.load(OFFSETS + i_b)
        else:
            offset = len_k - len_q
    else:
        q_start = tl.full([], 0, tl.int32)
        k_start = tl.full([], 0, tl.int32)
        len_q = seqlen_q
        len_k = seqlen_k
        offset = causal_offset
    return q_start, len_q, k_start, len_k, offset


@triton.jit
def _key_range(m0, len_k, offset, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks of query rows [m0, m0 + BLOCK_M): [0, full_end) need no mask, [full_end, hi) do."""
    if IS_CAUSAL:
        hi = tl.minimum(len_k, tl.maximum(m0 + BLOCK_M + offset, 0))
        # a block is wholly visible when its last key j satisfies j <= m0 + offset
        full_end = (tl.maximum(m0 + offset + 1, 0) // BLOCK_N) * BLOCK_N
        full_end = tl.minimum(full_end, (len_k // BLOCK_N) * BLOCK_N)
    else:
        hi = len_k
        full_end = (len_k // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _tile_descriptor(base, rows, head_dim, stride_row, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (rows, head_dim) matrix at `base` with row stride `stride_row`, read and written in
    (BLOCK_R, BLOCK_D) tiles: outside it, loads give 0 and stores write nothing."""
    return tl.make_tensor_descriptor(base, shape=[rows, head_dim], strides=[stride_row, 1],
                                     block_shape=[BLOCK_R, BLOCK_D])


@triton.jit
def _fwd_inner(acc, l_i, m_i, b_q, k_desc, v_desc, o_m, start, end, len_k, offset, qk_scale,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    o_n = start + tl.arange(0, BLOCK_N)
    for n in range(start, end, BLOCK_N):
        b_k = k_desc.load([n, 0])  # [BLOCK_N, BLOCK_D]
        b_v = v_desc.load([n, 0])
        b_s = tl.dot(b_q, tl.trans(b_k))  # [BLOCK_M, BLOCK_N], unscaled: the scale rides in one fma below
        if MASKED:
            m_s = (o_n < len_k)[None, :]
            if IS_CAUSAL:
                m_s = m_s & (o_n[None, :] <= o_m[:, None] + offset)
            b_s = tl.where(m_s, b_s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)  # log2 units (qk_scale > 0)
            # a row that has seen nothing yet keeps m = -inf: subtract 0 instead so exp2 gives 0, not nan
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
            m_sub = m_new
        b_p = tl.math.exp2(b_s * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        m_i = m_new
        o_n += BLOCK_N
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "causal_offset"])
def _fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, OFFSETS,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, causal_offset, num_heads, group_size, qk_scale, head_dim,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # last query blocks first: under a causal mask they see the most keys, and the light ones fill the tail
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // num_heads
    i_h = i_bh % num_heads
    i_hk = i_h // group_size
    q_start, len_q, k_start, len_k, offset = _sequence_bounds(
        CU_Q, CU_K, OFFSETS, i_b, seqlen_q, seqlen_k, causal_offset, IS_VARLEN, HAS_OFFSETS)
    m0 = i_m * BLOCK_M
    if m0 >= len_q:
        return
    # 64-bit base pointers of this (document, head); offsets inside stay small
    i_b64 = i_b.to(tl.int64)
    row_q = q_start.to(tl.int64)
    row_k = k_start.to(tl.int64)
    q_desc = _tile_descriptor(Q + i_b64 * stride_qb + row_q * stride_qs + i_h * stride_qh, len_q, head_dim,
                              stride_qs, BLOCK_M, BLOCK_D)
    o_desc = _tile_descriptor(O + i_b64 * stride_ob + row_q * stride_os + i_h * stride_oh, len_q, head_dim,
                              stride_os, BLOCK_M, BLOCK_D)
    k_desc = _tile_descriptor(K + i_b64 * stride_kb + row_k * stride_ks + i_hk * stride_kh, len_k, head_dim,
                              stride_ks, BLOCK_N, BLOCK_D)
    v_desc = _tile_descriptor(V + i_b64 * stride_vb + row_k * stride_vs + i_hk * stride_vh, len_k, head_dim,
                              stride_vs, BLOCK_N, BLOCK_D)
    LSE += i_b64 * stride_lb + i_h.to(tl.int64) * stride_lh + q_start + m0

    o_m = m0 + tl.arange(0, BLOCK_M)  # row within the sequence
    b_q = q_desc.load([m0, 0])  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _key_range(m0, len_k, offset, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, b_q, k_desc, v_desc, o_m, 0, full_end, len_k, offset, qk_scale,
                               False, IS_CAUSAL, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, b_q, k_desc, v_desc, o_m, full_end, hi, len_k, offset, qk_scale,
                               True, IS_CAUSAL, BLOCK_N)

    # rows that saw no key: output 0, log-sum-exp -inf
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_desc.store([m0, 0], acc.to(O.dtype.element_ty))
    tl.store(LSE + tl.arange(0, BLOCK_M), lse, mask=o_m < len_q)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
def _fwd(q, k, v, *, softmax_scale, causal, causal_offset, cu_seqlens_q, cu_seqlens_k,
         max_seqlen_q, max_seqlen_k, causal_offsets, out_dtype, config=None):
    """Launch the forward on checked inputs; returns (out, lse)."""
    varlen = cu_seqlens_q is not None
    head_dim = q.shape[-1]
    q, k, v = (tma_layout(t) for t in (q, k, v))
    heads, kv_heads = q.shape[-2], k.shape[-2]
    block_d = padded_head_dim(q.shape[-1])
    block_m, block_n, num_warps, num_stages = config or fwd_config(block_d, causal, q.device)
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        lse = torch.empty((heads, q.shape[0]), dtype=torch.float32, device=q.device)
        offset = 0
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        offset = causal_offset if causal_offset is not None else seqlen_k - seqlen_q
    if out.numel() == 0 or seqlen_q == 0:
        return out.zero_()[..., :head_dim], lse.fill_(float("-inf"))
    descriptor_scratch_on(q.device)
    grid = (triton.cdiv(seqlen_q, block_m), batch * heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal_offsets,
        *strides(q, varlen), *strides(k, varlen), *strides(v, varlen), *strides(out, varlen),
        *lse_strides(lse, varlen),
        seqlen_q, seqlen_k, int(offset), heads, heads // kv_heads, softmax_scale * LOG2E, q.shape[-1],
        IS_CAUSAL=causal, IS_VARLEN=varlen, HAS_OFFSETS=causal_offsets is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
    )
    return (out if out.shape[-1] == head_dim else out[..., :head_dim]), lse
