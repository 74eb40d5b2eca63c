"""FlashAttention-2 backward in Triton: recompute the probabilities block by block from the saved
log-sum-exp. Two modes:

One pass (allowed by `deterministic=False`, run where ONE_PASS_CONFIGS has the head dim: on CUDA only
where it measured faster, none yet; always under the CPU interpreter, for the tests), three launches:
1. `_delta_kernel`: Delta = rowsum(dO * O) per query row (fp32, the log-sum-exp's layout).
2. `_dkdv_kernel` with ATOMIC_DQ: one program per (key block, KV head) holds its K, V block and dK, dV
   accumulators and loops over the query heads of its GQA group and, for each, over the query blocks
   that see the key block; dK and dV of a group are summed in registers, and each (query block, key
   block) pair adds its share of dQ (dS K) into an fp32 buffer: on a GPU by one tensor-descriptor
   reduce-add of the tile (a TMA reduce on Hopper), under the CPU interpreter (which has no descriptor
   reduce) by element atomics.
3. `_dq_convert_kernel`: that buffer times the scale, in dQ's dtype and layout.
Five matrix products per block pair instead of seven: the dQ pass's recompute of S and dP is gone.
The atomics' order varies from run to run, so dQ may differ in the last bits between runs.

Deterministic (`deterministic=True`, or a head dim without a one-pass entry): the dK/dV kernel without
atomics, then `_dq_kernel`, one program per (query block, head) looping over key blocks as the forward
does.

The loops are split like the forward's: blocks wholly visible run without masks, the causal
diagonal and the ragged ends run masked, and blocks above the diagonal are skipped. Rows whose
log-sum-exp is -inf (they saw nothing) get probability 0 everywhere and contribute nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import (LOG2E, _key_range, _sequence_bounds, _tile_descriptor, descriptor_scratch_on, lse_strides,
                      padded_head_dim, strides, tma_layout)

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, "split"]) per (padded head dim, causal), chosen on the H200
# with the descriptor kernels (attention_h200.json, "sweep": 8 dK/dV and 7-8 dQ candidates per head dim,
# MHA and GQA, 16K causal; "kernel_resources" has each one's registers and spills: the D128 dK/dV
# winner spills 10-112 registers and still beats every tile that spills none). A 5th entry "split"
# runs dK and dV in two passes (fewer registers, P recomputed); it measured slower at head dim 256,
# so no entry uses it now.
DKDV_CONFIGS = {
    (16, False): (64, 64, 4, 3), (16, True): (64, 64, 4, 3),
    (32, False): (64, 64, 4, 3), (32, True): (64, 64, 4, 3),
    (64, False): (64, 64, 4, 3), (64, True): (64, 64, 4, 3),
    (128, False): (64, 128, 8, 3), (128, True): (64, 128, 8, 3),
    (256, False): (64, 64, 8, 2), (256, True): (64, 64, 8, 2),
}
DQ_CONFIGS = {
    (16, False): (64, 64, 4, 3), (16, True): (64, 64, 4, 3),
    (32, False): (64, 64, 4, 3), (32, True): (64, 64, 4, 3),
    (64, False): (64, 64, 4, 3), (64, True): (64, 64, 4, 3),
    (128, False): (128, 64, 8, 3), (128, True): (128, 64, 8, 3),
    (256, False): (128, 32, 8, 3), (256, True): (128, 32, 8, 3),
}
# grouped-query attention: a dK/dV program loops over the group's query heads, so it may want other
# blocks; entries here override DKDV_CONFIGS when heads > kv_heads (none differs today)
DKDV_GQA_CONFIGS = {}
# The one-pass kernel (dK, dV and dQ's reduce-adds), per (padded head dim, causal). A head dim without an
# entry runs the deterministic two-kernel path, also when `deterministic=False`: absent means the one
# pass has not measured faster there. On the H200 with Triton 3.6 (attention_h200.json, "sweep", causal
# 16K backward, MHA / 8 KV heads) none has: D64 7.66 / 7.99 ms against 7.59 / 7.87 for the two kernels
# (even: the 5 products save what the dQ tiles' reduce costs); D128 15.2 / 14.6 against 13.6 / 13.7 (the
# one pass spills 10-114 registers by variant); D256 over 3x slower. `scripts/bench_attention.py --sweep --apply`
# fills this table with the candidates that win.
ONE_PASS_CONFIGS = {}
# CPU (TRITON_INTERPRET=1): small blocks, unequal so that tiny tests cross block edges both ways.
INTERPRET_DKDV_CONFIG = (16, 32, 4, 1)
INTERPRET_DQ_CONFIG = (32, 16, 4, 1)
DELTA_BLOCK_M = 64
CONVERT_BLOCK_M = 64


def bwd_configs(block_d: int, causal: bool, grouped: bool, device: torch.device) -> tuple[tuple, tuple]:
    """(dK/dV config, dQ config) of the deterministic path."""
    if device.type != "cuda":
        return INTERPRET_DKDV_CONFIG, INTERPRET_DQ_CONFIG
    dkdv = DKDV_GQA_CONFIGS.get((block_d, causal)) if grouped else None
    return dkdv or DKDV_CONFIGS[(block_d, causal)], DQ_CONFIGS[(block_d, causal)]


def one_pass_config(block_d: int, causal: bool, device: torch.device) -> tuple | None:
    """The one-pass kernel's config, or None where the two-kernel path runs instead."""
    if device.type != "cuda":
        return INTERPRET_DKDV_CONFIG
    return ONE_PASS_CONFIGS.get((block_d, causal))


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seqlen_q"])
def _delta_kernel(O, DO, DELTA, CU_Q, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                  stride_lb, stride_lh, seqlen_q, num_heads, head_dim,
                  IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // num_heads
    i_h = i_bh % num_heads
    if IS_VARLEN:
        q_start = tl.load(CU_Q + i_b)
        len_q = tl.load(CU_Q + i_b + 1) - q_start
    else:
        q_start = tl.full([], 0, tl.int32)
        len_q = seqlen_q
    m0 = i_m * BLOCK_M
    if m0 >= len_q:
        return
    i_b64 = i_b.to(tl.int64)
    row = (q_start + m0).to(tl.int64)
    o_r = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    mask = ((m0 + o_r) < len_q)[:, None] & (o_d < head_dim)[None, :]
    b_o = tl.load(O + i_b64 * stride_ob + row * stride_os + i_h * stride_oh
                  + o_r[:, None] * stride_os + o_d[None, :], mask=mask, other=0.0)
    b_do = tl.load(DO + i_b64 * stride_db + row * stride_ds + i_h * stride_dh
                   + o_r[:, None] * stride_ds + o_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(DELTA + i_b64 * stride_lb + i_h.to(tl.int64) * stride_lh + row + o_r, delta, mask=(m0 + o_r) < len_q)


@triton.jit
def _dkdv_inner(dk, dv, b_k, b_v, q_desc, do_desc, p_lse, p_delta, dqa_desc, DQA_DOC, o_n, start, end, len_q,
                offset, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, WITH_DK: tl.constexpr, WITH_DV: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                TMA_REDUCE: tl.constexpr):
    # p_lse, p_delta point at the document's (or sequence's) first query row; q and dO rows past the
    # document's end load as 0. Keys past the end of the document were loaded as 0; their dK, dV rows
    # are never stored, and each key's gradient depends on its own column only, so they need no mask
    # here. dQ's shares go through `dqa_desc` (TMA_REDUCE: a bulk reduce-add of the whole tile, clipped
    # at the document's end) or, under the interpreter, which has no descriptor reduce, through
    # element atomics from DQA_DOC, the document's first row of the sums: query rows past the end add
    # exactly 0 (probability 0), into the buffer's spare rows or the next document's rows.
    p_lse += start
    p_delta += start
    o_m = start + tl.arange(0, BLOCK_M)
    for m in range(start, end, BLOCK_M):
        b_q = q_desc.load([m, 0])   # [BLOCK_M, BLOCK_D]
        b_do = do_desc.load([m, 0])
        if MASKED:
            m_row = o_m < len_q
            # rows past the end: lse +inf makes their probabilities 0
            b_lse = tl.load(p_lse, mask=m_row, other=float("inf"))
            b_delta = tl.load(p_delta, mask=m_row, other=0.0)
        else:
            b_lse = tl.load(p_lse)
            b_delta = tl.load(p_delta)
        # rows that saw nothing (lse -inf) contribute nothing: treat their lse as +inf
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634
        b_st = tl.dot(b_k, tl.trans(b_q)) * qk_scale         # [BLOCK_N, BLOCK_M], log2 units
        b_pt = tl.math.exp2(b_st - b_lse[None, :])
        if MASKED:
            if IS_CAUSAL:
                b_pt = tl.where(o_n[:, None] <= o_m[None, :] + offset, b_pt, 0.0)
        if WITH_DV:
            dv += tl.dot(b_pt.to(b_do.dtype), b_do)          # [BLOCK_N, BLOCK_D]
        if WITH_DK:
            b_dpt = tl.dot(b_v, tl.trans(b_do))               # [BLOCK_N, BLOCK_M]
            b_dst = (b_pt * (b_dpt - b_delta[None, :])).to(b_q.dtype)
            dk += tl.dot(b_dst, b_q)
            if ATOMIC_DQ:
                # this key block's share of dQ (unscaled): dS K, [BLOCK_M, BLOCK_D]
                b_dq = tl.dot(tl.trans(b_dst), b_k)
                if TMA_REDUCE:
                    dqa_desc.atomic_add([m, 0], b_dq)
                else:
                    tl.atomic_add(DQA_DOC + o_m[:, None].to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :],
                                  b_dq, sem="relaxed")
        p_lse += BLOCK_M
        p_delta += BLOCK_M
        o_m += BLOCK_M
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "causal_offset"])
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQA, CU_Q, CU_K, OFFSETS,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh, stride_ab, stride_ah,
    seqlen_q, seqlen_k, causal_offset, num_kv_heads, group_size, qk_scale, softmax_scale, head_dim,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WITH_DK: tl.constexpr, WITH_DV: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA_REDUCE: tl.constexpr,
):
    # WITH_DK/WITH_DV: both in one pass, or (large head dims) one per launch, which recomputes P but
    # holds half the accumulators in registers. ATOMIC_DQ: also add dQ's shares into DQA, fp32
    # (batch, heads, rows, BLOCK_D) with (batch, head) strides stride_ab, stride_ah; TMA_REDUCE: by
    # descriptor (GPUs), else by element atomics (the interpreter).
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // num_kv_heads
    i_hk = i_bh % num_kv_heads
    q_start, len_q, k_start, len_k, offset = _sequence_bounds(
        CU_Q, CU_K, OFFSETS, i_b, seqlen_q, seqlen_k, causal_offset, IS_VARLEN, HAS_OFFSETS)
    n0 = i_n * BLOCK_N
    if n0 >= len_k:
        return
    i_b64 = i_b.to(tl.int64)
    row_k = k_start.to(tl.int64)
    o_n = n0 + tl.arange(0, BLOCK_N)  # key within the sequence
    k_base = i_b64 * stride_kb + row_k * stride_ks + i_hk * stride_kh
    v_base = i_b64 * stride_vb + row_k * stride_vs + i_hk * stride_vh
    b_k = _tile_descriptor(K + k_base, len_k, head_dim, stride_ks, BLOCK_N, BLOCK_D).load([n0, 0])
    b_v = _tile_descriptor(V + v_base, len_k, head_dim, stride_vs, BLOCK_N, BLOCK_D).load([n0, 0])
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # query blocks that see this key block: masked [q_lo, q_mid), unmasked [q_mid, q_full),
    # masked [max(q_mid, q_full), q_end) for the ragged end of the queries
    q_end = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
    q_full = (len_q // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # row i sees key j iff j <= i + offset
        q_lo = (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M
        q_mid = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        q_mid = tl.maximum(q_mid, q_lo)
    else:
        q_lo = tl.full([], 0, tl.int32)
        q_mid = tl.full([], 0, tl.int32)
    mid_end = tl.minimum(q_mid, q_end)
    tail_start = tl.maximum(q_mid, q_full)
    # With dQ's atomics the unmasked run starts at the key block's own row block and wraps round:
    # without a causal mask every program would otherwise begin at query row 0 together and queue on
    # the same dQ rows. The deterministic kernel keeps the plain order (q_turn = q_mid).
    if ATOMIC_DQ:
        q_turn = tl.minimum(tl.maximum((n0 // BLOCK_M) * BLOCK_M, q_mid), tl.maximum(q_full, q_mid))
    else:
        q_turn = q_mid

    o_r = tl.arange(0, BLOCK_M)
    row_q = q_start.to(tl.int64)
    for g in range(0, group_size):
        i_h = i_hk * group_size + g
        q_desc = _tile_descriptor(Q + i_b64 * stride_qb + row_q * stride_qs + i_h * stride_qh, len_q, head_dim,
                                  stride_qs, BLOCK_M, BLOCK_D)
        do_desc = _tile_descriptor(DO + i_b64 * stride_db + row_q * stride_ds + i_h * stride_dh, len_q, head_dim,
                                   stride_ds, BLOCK_M, BLOCK_D)
        p_lse = LSE + i_b64 * stride_lb + i_h.to(tl.int64) * stride_lh + row_q + o_r
        p_delta = DELTA + i_b64 * stride_lb + i_h.to(tl.int64) * stride_lh + row_q + o_r
        dqa_doc = DQA + i_b64 * stride_ab + i_h.to(tl.int64) * stride_ah + row_q * BLOCK_D
        if ATOMIC_DQ and TMA_REDUCE:
            dqa_desc = _tile_descriptor(dqa_doc, len_q, BLOCK_D, BLOCK_D, BLOCK_M, BLOCK_D)
        else:
            dqa_desc = dqa_doc  # not used
        args = (q_desc, do_desc, p_lse, p_delta, dqa_desc, dqa_doc, o_n)
        dk, dv = _dkdv_inner(dk, dv, b_k, b_v, *args, q_lo, mid_end, len_q, offset, qk_scale,
                             True, IS_CAUSAL, BLOCK_M, BLOCK_D, WITH_DK, WITH_DV, ATOMIC_DQ, TMA_REDUCE)
        dk, dv = _dkdv_inner(dk, dv, b_k, b_v, *args, q_turn, q_full, len_q, offset, qk_scale,
                             False, IS_CAUSAL, BLOCK_M, BLOCK_D, WITH_DK, WITH_DV, ATOMIC_DQ, TMA_REDUCE)
        if ATOMIC_DQ:   # the wrapped-round part of the unmasked run
            dk, dv = _dkdv_inner(dk, dv, b_k, b_v, *args, q_mid, q_turn, len_q, offset, qk_scale,
                                 False, IS_CAUSAL, BLOCK_M, BLOCK_D, WITH_DK, WITH_DV, ATOMIC_DQ, TMA_REDUCE)
        dk, dv = _dkdv_inner(dk, dv, b_k, b_v, *args, tail_start, q_end, len_q, offset, qk_scale,
                             True, IS_CAUSAL, BLOCK_M, BLOCK_D, WITH_DK, WITH_DV, ATOMIC_DQ, TMA_REDUCE)

    # rows past the document's end and columns past the head dim are not written
    if WITH_DK:
        dk *= softmax_scale
        _tile_descriptor(DK + i_b64 * stride_dkb + row_k * stride_dks + i_hk * stride_dkh, len_k, head_dim,
                         stride_dks, BLOCK_N, BLOCK_D).store([n0, 0], dk.to(DK.dtype.element_ty))
    if WITH_DV:
        _tile_descriptor(DV + i_b64 * stride_dvb + row_k * stride_dvs + i_hk * stride_dvh, len_k, head_dim,
                         stride_dvs, BLOCK_N, BLOCK_D).store([n0, 0], dv.to(DV.dtype.element_ty))


@triton.jit
def _dq_inner(dq, b_q, b_do, b_lse, b_delta, k_desc, v_desc, o_m, start, end, len_k, offset, qk_scale,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    o_n = start + tl.arange(0, BLOCK_N)
    for n in range(start, end, BLOCK_N):
        b_k = k_desc.load([n, 0])  # [BLOCK_N, BLOCK_D]
        b_v = v_desc.load([n, 0])
        b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale  # [BLOCK_M, BLOCK_N]
        b_p = tl.math.exp2(b_s - b_lse[:, None])
        if MASKED:
            m_s = (o_n < len_k)[None, :]
            if IS_CAUSAL:
                m_s = m_s & (o_n[None, :] <= o_m[:, None] + offset)
            b_p = tl.where(m_s, b_p, 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v))           # [BLOCK_M, BLOCK_N]
        b_ds = b_p * (b_dp - b_delta[:, None])
        dq += tl.dot(b_ds.to(b_k.dtype), b_k)        # [BLOCK_M, BLOCK_D]
        o_n += BLOCK_N
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "causal_offset"])
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, OFFSETS,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, causal_offset, num_heads, group_size, qk_scale, softmax_scale, head_dim,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # last query blocks first: under a causal mask they see the most keys
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
    i_b64 = i_b.to(tl.int64)
    row_q = q_start.to(tl.int64)
    row_k = k_start.to(tl.int64)
    o_m = m0 + tl.arange(0, BLOCK_M)
    m_row = o_m < len_q
    b_q = _tile_descriptor(Q + i_b64 * stride_qb + row_q * stride_qs + i_h * stride_qh, len_q, head_dim,
                           stride_qs, BLOCK_M, BLOCK_D).load([m0, 0])  # [BLOCK_M, BLOCK_D]
    b_do = _tile_descriptor(DO + i_b64 * stride_db + row_q * stride_ds + i_h * stride_dh, len_q, head_dim,
                            stride_ds, BLOCK_M, BLOCK_D).load([m0, 0])
    p_l = i_b64 * stride_lb + i_h.to(tl.int64) * stride_lh + row_q + o_m
    b_lse = tl.load(LSE + p_l, mask=m_row, other=float("inf"))
    # rows that saw nothing (lse -inf) contribute nothing: treat their lse as +inf
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634
    b_delta = tl.load(DELTA + p_l, mask=m_row, other=0.0)

    k_desc = _tile_descriptor(K + i_b64 * stride_kb + row_k * stride_ks + i_hk * stride_kh, len_k, head_dim,
                              stride_ks, BLOCK_N, BLOCK_D)
    v_desc = _tile_descriptor(V + i_b64 * stride_vb + row_k * stride_vs + i_hk * stride_vh, len_k, head_dim,
                              stride_vs, BLOCK_N, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _key_range(m0, len_k, offset, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, b_q, b_do, b_lse, b_delta, k_desc, v_desc, o_m, 0, full_end, len_k, offset, qk_scale,
                   False, IS_CAUSAL, BLOCK_N)
    dq = _dq_inner(dq, b_q, b_do, b_lse, b_delta, k_desc, v_desc, o_m, full_end, hi, len_k, offset, qk_scale,
                   True, IS_CAUSAL, BLOCK_N)
    dq *= softmax_scale
    _tile_descriptor(DQ + i_b64 * stride_dqb + row_q * stride_dqs + i_h * stride_dqh, len_q, head_dim,
                     stride_dqs, BLOCK_M, BLOCK_D).store([m0, 0], dq.to(DQ.dtype.element_ty))


@triton.jit(do_not_specialize=["rows"])
def _dq_convert_kernel(DQA, DQ, stride_ab, stride_ah, stride_qb, stride_qs, stride_qh, rows, num_heads, softmax_scale,
                       head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ = scale * the fp32 sums of the one-pass kernel, in dQ's dtype and (batch, rows, heads) layout."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_row = (o_m < rows)[:, None]
    b_dq = tl.load(DQA + i_b * stride_ab + i_h * stride_ah + o_m[:, None].to(tl.int64) * BLOCK_D + o_d[None, :],
                   mask=m_row, other=0.0)
    tl.store(DQ + i_b * stride_qb + i_h * stride_qh + o_m[:, None].to(tl.int64) * stride_qs + o_d[None, :],
             (b_dq * softmax_scale).to(DQ.dtype.element_ty), mask=m_row & (o_d < head_dim)[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def compute_delta(out, dout, lse, varlen: bool, cu_seqlens_q=None, max_seqlen_q=None):
    """Delta = rowsum(dout * out) in fp32, laid out like `lse`. The kernel reads with masked pointer
    loads: any strides and alignment do, as long as the head dim is contiguous."""
    out, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (out, dout))
    heads, head_dim = out.shape[-2], out.shape[-1]
    delta = torch.empty_like(lse)
    if varlen:
        batch, seqlen_q = cu_seqlens_q.numel() - 1, max_seqlen_q
    else:
        batch, seqlen_q = out.shape[0], out.shape[1]
    if delta.numel() == 0 or seqlen_q == 0:
        return delta
    grid = (triton.cdiv(seqlen_q, DELTA_BLOCK_M), batch * heads)
    _delta_kernel[grid](out, dout, delta, cu_seqlens_q, *strides(out, varlen), *strides(dout, varlen),
                        *lse_strides(delta, varlen), seqlen_q, heads, head_dim, IS_VARLEN=varlen,
                        BLOCK_M=DELTA_BLOCK_M, BLOCK_D=padded_head_dim(head_dim))
    return delta


def _bwd(dout, q, k, v, out, lse, *, softmax_scale, causal, causal_offset, cu_seqlens_q, cu_seqlens_k,
         max_seqlen_q, max_seqlen_k, causal_offsets, delta, grad_dtype, deterministic, configs=None):
    """Launch the backward on checked inputs; returns (dq, dk, dv).

    `configs`: the one-pass kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages[, "split"]), or with
    `deterministic` the pair (dK/dV config, dQ config); default from the tables above."""
    varlen = cu_seqlens_q is not None
    head_dim = q.shape[-1]
    q, k, v, dout = (tma_layout(t) for t in (q, k, v, dout))
    heads, kv_heads = q.shape[-2], k.shape[-2]
    block_d = padded_head_dim(q.shape[-1])
    one_pass = None if deterministic else configs or one_pass_config(block_d, causal, q.device)
    if one_pass is None:
        dkdv_config, (dq_m, dq_n, dq_warps, dq_stages) = configs or bwd_configs(block_d, causal, heads != kv_heads,
                                                                                q.device)
    else:
        dkdv_config = one_pass
    dkdv_m, dkdv_n, dkdv_warps, dkdv_stages = dkdv_config[:4]
    split_dkdv = len(dkdv_config) > 4 and dkdv_config[4] == "split"
    grad_dtype = grad_dtype or q.dtype
    dq = torch.empty(q.shape, dtype=grad_dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=grad_dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=grad_dtype, device=q.device)
    if varlen:
        batch, seqlen_q, seqlen_k, offset = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, 0
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        offset = causal_offset if causal_offset is not None else seqlen_k - seqlen_q
    if q.numel() == 0 or k.numel() == 0 or seqlen_q == 0 or seqlen_k == 0:
        return tuple(g.zero_()[..., :head_dim] for g in (dq, dk, dv))
    lse = lse.contiguous()
    if delta is None:
        delta = compute_delta(out, dout, lse, varlen, cu_seqlens_q, max_seqlen_q)
    delta = delta.contiguous()
    if one_pass is not None:
        # dQ's fp32 sums, (batch, heads, rows, padded head dim) so that a query block of one head is one
        # contiguous stretch; spare rows take the zeros that the element atomics (interpreter) add for
        # query rows past a document's end (the descriptor's reduce clips them)
        rows = q.shape[0] if varlen else q.shape[1]
        dq_sums = torch.zeros((1 if varlen else batch, heads, rows + dkdv_m, block_d), dtype=torch.float32,
                              device=q.device)
        sums_strides = (0 if varlen else dq_sums.stride(0), dq_sums.stride(1))
    else:
        dq_sums, sums_strides = delta, (0, 0)  # not read: ATOMIC_DQ is off
    common = dict(IS_CAUSAL=causal, IS_VARLEN=varlen, HAS_OFFSETS=causal_offsets is not None, BLOCK_D=block_d)
    scale = (softmax_scale * LOG2E, softmax_scale, q.shape[-1])
    descriptor_scratch_on(q.device)
    passes = [dict(WITH_DK=True, WITH_DV=False), dict(WITH_DK=False, WITH_DV=True)] if split_dkdv else \
        [dict(WITH_DK=True, WITH_DV=True)]
    for which in passes:
        _dkdv_kernel[(triton.cdiv(seqlen_k, dkdv_n), batch * kv_heads)](
            q, k, v, dout, lse, delta, dk, dv, dq_sums, cu_seqlens_q, cu_seqlens_k, causal_offsets,
            *strides(q, varlen), *strides(k, varlen), *strides(v, varlen), *strides(dout, varlen),
            *strides(dk, varlen), *strides(dv, varlen), *lse_strides(lse, varlen), *sums_strides,
            seqlen_q, seqlen_k, int(offset), kv_heads, heads // kv_heads, *scale,
            BLOCK_M=dkdv_m, BLOCK_N=dkdv_n, num_warps=dkdv_warps, num_stages=dkdv_stages,
            ATOMIC_DQ=one_pass is not None and which["WITH_DK"], TMA_REDUCE=q.device.type == "cuda", **which,
            **common)
    if one_pass is not None:
        _dq_convert_kernel[(triton.cdiv(rows, CONVERT_BLOCK_M), (1 if varlen else batch) * heads)](
            dq_sums, dq, *sums_strides, *strides(dq, varlen), rows, heads, softmax_scale, q.shape[-1],
            BLOCK_M=CONVERT_BLOCK_M, BLOCK_D=block_d)
    else:
        _dq_kernel[(triton.cdiv(seqlen_q, dq_m), batch * heads)](
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, causal_offsets,
            *strides(q, varlen), *strides(k, varlen), *strides(v, varlen), *strides(dout, varlen),
            *strides(dq, varlen), *lse_strides(lse, varlen),
            seqlen_q, seqlen_k, int(offset), heads, heads // kv_heads, *scale,
            BLOCK_M=dq_m, BLOCK_N=dq_n, num_warps=dq_warps, num_stages=dq_stages, **common)
    if q.shape[-1] == head_dim:
        return dq, dk, dv
    return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]
