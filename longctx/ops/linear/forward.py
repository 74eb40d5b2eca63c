"""Lightning attention forward in Triton, and the three kernels the backward reuses.

The sequence is cut into chunks of CHUNK tokens (aligned to document starts when packed). Inside a
chunk the output is the masked "left product" (Q K^T * decay mask) V; across chunks it is the
"right product" Q S with the running fp32 state S. Consecutive chunks are grouped into a few
segments, one program per (segment, batch x head, block of the value dim), so that a long sequence
fills the GPU without storing a state per chunk:

  1. `_chunk_local_state_kernel`: each segment's state from zero (and its decay multiplier),
  2. `_state_scan_kernel`: a short scan over the segments gives each segment's start state (fp32,
     written over the local states) and the final state,
  3. `_chunk_output_kernel`: each segment runs its chunks again from its start state and writes out.

Only the segment start states are kept for the backward: num_segments x B x H x Dk x Dv fp32, with
num_segments chosen to fill the GPU (tens), not growing with the sequence length.

The same three kernels compute the backward (backward.py), because every gradient has this shape:
    dq = forward on (do, v, k) with the transposed states,
    dv = time-reversed forward on (k, q, do) with the state gradient R (flowing from the end),
    dk = time-reversed forward on (v, do, q) with R transposed.
In time-reversed mode (REVERSE) each chunk is read backwards, so the causal mask and the decays
of the intra-chunk product are those of the forward; only the decay exponents of the state terms
shift by one and the document reset applies after the chunk instead of before it.

Numerics: every decay is exp2 of a non-positive exponent (no inverse decays), states and all
cross-chunk combinations are fp32, matmuls take operands in the input dtype (bf16/fp16, fp32
accumulation; fp32 inputs use IEEE fp32), token offsets are 64-bit, the sequence length and chunk
count are run-time values.

LASP (parallel/lasp.py) runs these phases itself, with the scan's carry crossing ranks: `Chunks`,
`plan_segments`, `chunk_local_states`, `scan_states` and `chunk_outputs` are its interface.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
CHUNK_SIZE = 64
STATE_SCAN_BLOCK = 1024
# GPU launch settings by the token count B*S (the largest threshold not above it wins): the output-dim
# block of one program, its warps and pipeline stages, and how many programs per multiprocessor the
# segments aim at. From `scripts/bench_lasp.py --sweep` on an H100 (H=16, D=128, bf16, fwd+bwd):
# 64-wide blocks were best at 16K tokens (12.8M tok/s against 11.6M with 128-wide), 128-wide blocks
# with 8 warps at 64K (16.2M against 13.8M) and 256K (18.4M against 14.3M).
GPU_CONFIGS = [
    (0, {"block_z": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4}),
    (65536, {"block_z": 128, "num_warps": 8, "num_stages": 2, "programs_per_sm": 4}),
]
# Head dims over 128 (not yet timed): the smallest tiles and one stage, to stay within registers and
# shared memory.
GPU_CONFIG_WIDE_HEADS = {"block_z": 64, "num_warps": 8, "num_stages": 1, "programs_per_sm": 4}
GPU_CONFIG_OVERRIDE: dict | None = None  # set by the benchmark's sweep
INTERPRET_CONFIG = {"block_z": 64, "programs_per_sm": 0}


def launch_settings(tokens: int, device, head_dim: int = 128) -> dict:
    """The launch settings for `tokens` tokens (B*S) of the larger head dim `head_dim` on `device`."""
    if device.type != "cuda":
        return INTERPRET_CONFIG
    if GPU_CONFIG_OVERRIDE is not None:
        return GPU_CONFIG_OVERRIDE
    if head_dim > 128:
        return GPU_CONFIG_WIDE_HEADS
    return [config for threshold, config in GPU_CONFIGS if tokens >= threshold][-1]


@triton.jit
def _chunk_bounds(CHUNK_START, CHUNK_LEN, CHUNK_RESET, i_b, c, T, BLOCK_C: tl.constexpr,
                  IS_VARLEN: tl.constexpr):
    """First token (flattened over B*T, int64), token count and reset flag (fp32 0/1) of chunk c of row i_b."""
    if IS_VARLEN:
        start = tl.load(CHUNK_START + c).to(tl.int64)
        length = tl.load(CHUNK_LEN + c)
        reset = tl.load(CHUNK_RESET + c).to(tl.float32)
    else:
        first = c.to(tl.int64) * BLOCK_C
        start = i_b.to(tl.int64) * T + first
        length = tl.minimum(T - first, BLOCK_C).to(tl.int32)
        reset = 0.0
    return start, length, reset


@triton.jit(do_not_specialize=["T", "NC", "G"])
def _chunk_local_state_kernel(
    Y, Z, STATES, MULT, DECAY, CHUNK_START, CHUNK_LEN, CHUNK_RESET,
    T, NC, G, H,
    sy_t, sy_h, sz_t, sz_h, GY, GZ,
    ss_seg, ss_bh, ss_r, ss_c,
    DY: tl.constexpr, DZ: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_DY: tl.constexpr, BLOCK_Z: tl.constexpr,
    REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The state of one segment from zero: sum over its tokens of decayed y_j^T z_j; and its multiplier."""
    i_seg, i_bh, i_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, BLOCK_C)
    o_dy = tl.arange(0, BLOCK_DY)
    o_z = i_z * BLOCK_Z + tl.arange(0, BLOCK_Z)
    m_dy, m_z = o_dy < DY, o_z < DZ
    neg = tl.load(DECAY + i_h).to(tl.float32) * 1.4426950408889634  # -log2(lambda) >= 0
    p_y = Y + (i_h // GY).to(tl.int64) * sy_h + o_dy[None, :]
    p_z = Z + (i_h // GZ).to(tl.int64) * sz_h + o_z[None, :]

    c_first = i_seg * G
    n_chunks = tl.minimum(c_first + G, NC) - c_first
    b_s = tl.zeros([BLOCK_DY, BLOCK_Z], dtype=tl.float32)
    carry = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0) + 1.0  # multiplier of the segment's start state
    for n in range(0, n_chunks):
        c = c_first + n_chunks - 1 - n if REVERSE else c_first + n
        start, length, reset = _chunk_bounds(CHUNK_START, CHUNK_LEN, CHUNK_RESET, i_b, c, T, BLOCK_C,
                                             IS_VARLEN)
        if not REVERSE:
            b_s = b_s * (1.0 - reset)
            carry = carry * (1.0 - reset)
        m_c = o_c < length
        rows = start + (length - 1 - o_c) if REVERSE else start + o_c  # [BLOCK_C] int64
        b_y = tl.load(p_y + rows[:, None] * sy_t, mask=m_c[:, None] & m_dy[None, :], other=0.0)  # [C, DY]
        b_z = tl.load(p_z + rows[:, None] * sz_t, mask=m_c[:, None] & m_z[None, :], other=0.0)  # [C, BZ]
        y_exponent = tl.maximum(length - 1 - o_c + REVERSE, 0).to(tl.float32)
        y_decay = tl.where(m_c, tl.exp2(-neg * y_exponent), 0.0)
        block_decay = tl.exp2(-neg * length.to(tl.float32))
        b_yd = (b_y * y_decay[:, None]).to(b_z.dtype)
        b_s = b_s * block_decay + tl.dot(tl.trans(b_yd), b_z, input_precision=DOT_PRECISION)
        carry = carry * block_decay
        if REVERSE:
            b_s = b_s * (1.0 - reset)
            carry = carry * (1.0 - reset)
    p_s = STATES + i_seg.to(tl.int64) * ss_seg + i_bh.to(tl.int64) * ss_bh + o_dy[:, None] * ss_r + o_z[None, :] * ss_c
    tl.store(p_s, b_s, mask=m_dy[:, None] & m_z[None, :])
    if i_z == 0:
        tl.store(MULT + i_seg.to(tl.int64) * (tl.num_programs(1)) + i_bh, carry)


@triton.jit(do_not_specialize=["NSEG"])
def _state_scan_kernel(STATES, MULT, INIT, FINAL, NSEG, NBH, SIZE,
                       HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Over the segments in order: write each segment's start state over its local one, then combine."""
    i_bh, i_blk = tl.program_id(0), tl.program_id(1)
    o = i_blk * BLOCK + tl.arange(0, BLOCK)
    m = o < SIZE
    base = i_bh.to(tl.int64) * SIZE + o
    if HAS_INIT:
        b_s = tl.load(INIT + base, mask=m, other=0.0).to(tl.float32)
    else:
        b_s = tl.zeros([BLOCK], dtype=tl.float32)
    for n in range(0, NSEG):
        seg = NSEG - 1 - n if REVERSE else n
        p = STATES + seg.to(tl.int64) * NBH * SIZE + base
        b_local = tl.load(p, mask=m, other=0.0)
        tl.store(p, b_s, mask=m)
        b_s = tl.load(MULT + seg.to(tl.int64) * NBH + i_bh) * b_s + b_local
    tl.store(FINAL + base, b_s, mask=m)


@triton.jit(do_not_specialize=["T", "NC", "G"])
def _chunk_output_kernel(
    X, Y, Z, O, STATES, DECAY, CHUNK_START, CHUNK_LEN, CHUNK_RESET,
    T, NC, G, H,
    sx_t, sx_h, sy_t, sy_h, sz_t, sz_h, so_t, so_h, GX, GY, GZ,
    ss_seg, ss_bh, ss_r, ss_c,
    DY: tl.constexpr, DZ: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_DY: tl.constexpr, BLOCK_Z: tl.constexpr,
    REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """o_i = sum_{j<=i} lam^(i-j) (x_i . y_j) z_j + lam^(i+1) x_i S, chunk by chunk from the segment's start S."""
    i_seg, i_bh, i_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, BLOCK_C)
    o_dy = tl.arange(0, BLOCK_DY)
    o_z = i_z * BLOCK_Z + tl.arange(0, BLOCK_Z)
    m_dy, m_z = o_dy < DY, o_z < DZ
    neg = tl.load(DECAY + i_h).to(tl.float32) * 1.4426950408889634  # -log2(lambda) >= 0
    p_x = X + (i_h // GX).to(tl.int64) * sx_h + o_dy[None, :]
    p_y = Y + (i_h // GY).to(tl.int64) * sy_h + o_dy[None, :]
    p_z = Z + (i_h // GZ).to(tl.int64) * sz_h + o_z[None, :]
    p_o = O + i_h.to(tl.int64) * so_h + o_z[None, :]

    # decays that depend on the position in the chunk only; exponents clamped to >= 0
    distance = o_c[:, None] - o_c[None, :]
    b_intra = tl.where(distance >= 0, tl.exp2(-neg * tl.maximum(distance, 0).to(tl.float32)), 0.0)  # [C, C]
    x_decay = tl.exp2(-neg * (o_c + 1 - REVERSE).to(tl.float32))  # [C]

    p_s = STATES + i_seg.to(tl.int64) * ss_seg + i_bh.to(tl.int64) * ss_bh + o_dy[:, None] * ss_r + o_z[None, :] * ss_c
    b_s = tl.load(p_s, mask=m_dy[:, None] & m_z[None, :], other=0.0)  # [DY, BZ] fp32
    c_first = i_seg * G
    n_chunks = tl.minimum(c_first + G, NC) - c_first
    for n in range(0, n_chunks):
        c = c_first + n_chunks - 1 - n if REVERSE else c_first + n
        start, length, reset = _chunk_bounds(CHUNK_START, CHUNK_LEN, CHUNK_RESET, i_b, c, T, BLOCK_C,
                                             IS_VARLEN)
        if not REVERSE:
            b_s = b_s * (1.0 - reset)
        m_c = o_c < length
        rows = start + (length - 1 - o_c) if REVERSE else start + o_c  # [BLOCK_C] int64
        b_x = tl.load(p_x + rows[:, None] * sx_t, mask=m_c[:, None] & m_dy[None, :], other=0.0)  # [C, DY]
        b_y = tl.load(p_y + rows[:, None] * sy_t, mask=m_c[:, None] & m_dy[None, :], other=0.0)  # [C, DY]
        b_z = tl.load(p_z + rows[:, None] * sz_t, mask=m_c[:, None] & m_z[None, :], other=0.0)  # [C, BZ]
        b_a = tl.dot(b_x, tl.trans(b_y), input_precision=DOT_PRECISION) * b_intra  # [C, C]
        b_xd = (b_x * x_decay[:, None]).to(b_x.dtype)
        b_o = tl.dot(b_a.to(b_z.dtype), b_z, input_precision=DOT_PRECISION)
        b_o += tl.dot(b_xd, b_s.to(b_x.dtype), input_precision=DOT_PRECISION)  # [C, BZ]
        tl.store(p_o + rows[:, None] * so_t, b_o.to(O.dtype.element_ty), mask=m_c[:, None] & m_z[None, :])

        y_exponent = tl.maximum(length - 1 - o_c + REVERSE, 0).to(tl.float32)
        y_decay = tl.where(m_c, tl.exp2(-neg * y_exponent), 0.0)
        b_yd = (b_y * y_decay[:, None]).to(b_z.dtype)
        b_s = b_s * tl.exp2(-neg * length.to(tl.float32)) + tl.dot(tl.trans(b_yd), b_z,
                                                                     input_precision=DOT_PRECISION)
        if REVERSE:
            b_s = b_s * (1.0 - reset)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
class Chunks:
    """Where the chunks of each row lie: regular for (B, S) inputs, a table on the device for packed documents."""

    def __init__(self, batch: int, seqlen: int, chunk_size: int, cu_seqlens: torch.Tensor | None, device,
                 head_dim: int = 128):
        self.batch, self.seqlen, self.size = batch, seqlen, chunk_size
        self.config = launch_settings(batch * seqlen, torch.device(device), head_dim)
        self.is_varlen = cu_seqlens is not None
        self.last_doc_empty = None
        if not self.is_varlen:
            self.count = triton.cdiv(seqlen, chunk_size)
            self.start = self.length = self.reset = torch.empty(1, dtype=torch.int64, device=device)
            return
        # Built with device ops (no host sync): at most one partial chunk per document.
        bounds = cu_seqlens.to(device=device, dtype=torch.int64)
        lengths = bounds[1:] - bounds[:-1]
        per_doc = torch.div(lengths + chunk_size - 1, chunk_size, rounding_mode="floor")
        ends = torch.cumsum(per_doc, 0)
        self.count = seqlen // chunk_size + lengths.numel()
        index = torch.arange(self.count, device=device)
        doc = torch.searchsorted(ends, index, right=True).clamp(max=lengths.numel() - 1)
        first = ends[doc] - per_doc[doc]
        valid = index < ends[-1]
        self.start = bounds[doc] + (index - first) * chunk_size
        self.length = torch.where(valid, (bounds[doc + 1] - self.start).clamp(0, chunk_size), 0).to(torch.int32)
        self.reset = (valid & (index == first) & (doc > 0)).to(torch.int32)
        self.last_doc_empty = lengths[-1] == 0

    def args(self):
        return self.start, self.length, self.reset


def default_num_segments(chunks: Chunks, programs_per_segment: int, device) -> int:
    """Enough segments for a few programs per streaming multiprocessor, at most one per chunk."""
    if device.type == "cuda":
        target = chunks.config["programs_per_sm"] * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    return max(1, min(chunks.count, triton.cdiv(target, programs_per_segment)))


def plan_segments(chunks: Chunks, heads: int, dv: int, device, num_segments: int | None = None) -> int:
    """The number of segments to run (`num_segments`, or enough to fill the GPU), each non-empty."""
    if num_segments is None:
        programs_per_segment = chunks.batch * heads * triton.cdiv(dv, _block_z(dv, chunks.config))
        num_segments = default_num_segments(chunks, programs_per_segment, device)
    num_segments = max(1, min(num_segments, chunks.count))
    # with ceil-divided chunks per segment, fewer segments may cover all chunks
    return triton.cdiv(chunks.count, triton.cdiv(chunks.count, num_segments))


def _dot_precision(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_z(dz: int, config: dict) -> int:
    return min(config["block_z"], max(16, triton.next_power_of_2(dz)))


def _launch_config(config: dict) -> dict:
    return {key: config[key] for key in ("num_warps", "num_stages") if key in config}


def chunk_local_states(y, z, decay, chunks: Chunks, num_segments: int, reverse: bool):
    """Each segment's state from zero: (num_segments, B*H, Dy, Dz) fp32, and multipliers (num_segments, B*H)."""
    batch, _, heads_y, dy = y.shape
    heads, dz = decay.shape[0], z.shape[-1]
    states = torch.empty(num_segments, batch * heads, dy, dz, dtype=torch.float32, device=y.device)
    mult = torch.empty(num_segments, batch * heads, dtype=torch.float32, device=y.device)
    block_z = _block_z(dz, chunks.config)
    grid = (num_segments, batch * heads, triton.cdiv(dz, block_z))
    _chunk_local_state_kernel[grid](
        y, z, states, mult, decay, *chunks.args(),
        chunks.seqlen, chunks.count, triton.cdiv(chunks.count, num_segments), heads,
        y.stride(1), y.stride(2), z.stride(1), z.stride(2), heads // heads_y, heads // z.shape[2],
        states.stride(0), states.stride(1), states.stride(2), states.stride(3),
        DY=dy, DZ=dz, BLOCK_C=chunks.size, BLOCK_DY=max(16, triton.next_power_of_2(dy)), BLOCK_Z=block_z,
        REVERSE=reverse, IS_VARLEN=chunks.is_varlen, DOT_PRECISION=_dot_precision(y.dtype),
        **_launch_config(chunks.config))
    return states, mult


def scan_states(states, mult, init, reverse: bool):
    """Turn local segment states into start states in place; returns the state after the last segment."""
    num_segments, nbh = states.shape[:2]
    size = states.shape[2] * states.shape[3]
    final = torch.empty(nbh, states.shape[2], states.shape[3], dtype=torch.float32, device=states.device)
    has_init = init is not None
    init = init.reshape(nbh, size).float().contiguous() if has_init else final
    grid = (nbh, triton.cdiv(size, STATE_SCAN_BLOCK))
    _state_scan_kernel[grid](states, mult, init, final, num_segments, nbh, size,
                             HAS_INIT=has_init, REVERSE=reverse, BLOCK=STATE_SCAN_BLOCK)
    return final


def chunk_outputs(x, y, z, decay, states, chunks: Chunks, reverse: bool, transpose_states: bool = False):
    """Per query head: o (B, S, H, Dz) in x's dtype from the segments' start states (num_segments, B*H, ., .)."""
    batch, seqlen, heads_x, dy = x.shape
    heads, dz = decay.shape[0], z.shape[-1]
    out = torch.empty(batch, seqlen, heads, dz, dtype=x.dtype, device=x.device)
    ss_r, ss_c = (states.stride(3), states.stride(2)) if transpose_states else (states.stride(2), states.stride(3))
    block_z = _block_z(dz, chunks.config)
    num_segments = states.shape[0]
    grid = (num_segments, batch * heads, triton.cdiv(dz, block_z))
    _chunk_output_kernel[grid](
        x, y, z, out, states, decay, *chunks.args(),
        chunks.seqlen, chunks.count, triton.cdiv(chunks.count, num_segments), heads,
        x.stride(1), x.stride(2), y.stride(1), y.stride(2), z.stride(1), z.stride(2), out.stride(1), out.stride(2),
        heads // heads_x, heads // y.shape[2], heads // z.shape[2],
        states.stride(0), states.stride(1), ss_r, ss_c,
        DY=dy, DZ=dz, BLOCK_C=chunks.size, BLOCK_DY=max(16, triton.next_power_of_2(dy)), BLOCK_Z=block_z,
        REVERSE=reverse, IS_VARLEN=chunks.is_varlen, DOT_PRECISION=_dot_precision(x.dtype),
        **_launch_config(chunks.config))
    return out


def lightning_attn_forward(q, k, v, decay, initial_state, cu_seqlens, chunk_size=CHUNK_SIZE, num_segments=None):
    """Forward launcher: returns out (B, S, H, Dv), final_state (B, H, Dk, Dv) fp32, and what the backward needs.

    q, k, v contiguous (B, S, H|Hkv, D); decay (H,) fp32 contiguous; initial_state fp32 or None.
    """
    batch, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    chunks = Chunks(batch, seqlen, chunk_size, cu_seqlens, q.device, max(dk, dv))
    num_segments = plan_segments(chunks, heads, dv, q.device, num_segments)
    states, mult = chunk_local_states(k, v, decay, chunks, num_segments, reverse=False)
    final = scan_states(states, mult, initial_state, reverse=False)  # states now hold segment starts
    out = chunk_outputs(q, k, v, decay, states, chunks, reverse=False)
    if chunks.last_doc_empty is not None:
        final = final * (~chunks.last_doc_empty).float()
    return out, final.view(batch, heads, dk, dv), (states, mult, chunks)

