"""Lightning attention kernels (Triton, interpreted on a CPU-only machine: tests/conftest.py; where a GPU
is, these CPU tensors take the PyTorch path) against the token-by-token recurrence.

Every comparison is against the recurrence in float64; the allowed error is a small multiple of the
error of the same recurrence run in the test's low precision (fp32 or fp16) on the same inputs.
"""
import zlib

import pytest
import torch

from longctx.ops.linear import lightning_attn_func
from longctx.ops.linear.naive import lightning_attn_chunked, lightning_attn_recurrent

# outputs and state buffers start as NaN (tests/ops/conftest.py), so unwritten elements show
pytestmark = pytest.mark.usefixtures("nan_empty")


def _inputs(batch, seqlen, heads, kv_heads, dk, dv, decay_kind, with_init, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, dk, generator=gen, dtype=torch.float64) * 0.5
    k = torch.randn(batch, seqlen, kv_heads, dk, generator=gen, dtype=torch.float64) * 0.5
    v = torch.randn(batch, seqlen, kv_heads, dv, generator=gen, dtype=torch.float64)
    if decay_kind == "zero":
        decay = torch.zeros(heads, dtype=torch.float64)
    elif decay_kind == "strong":  # lambda^64 underflows: exponents must stay non-positive
        decay = torch.full((heads,), 3.0, dtype=torch.float64)
    else:  # per head, the first head without decay
        decay = torch.rand(heads, generator=gen, dtype=torch.float64) * 0.3
        decay[0] = 0
    init = torch.randn(batch, heads, dk, dv, generator=gen, dtype=torch.float64) if with_init else None
    d_out = torch.randn(batch, seqlen, heads, dv, generator=gen, dtype=torch.float64)
    d_final = torch.randn(batch, heads, dk, dv, generator=gen, dtype=torch.float64)
    return q, k, v, decay, init, d_out, d_final


def _run(fn, q, k, v, decay, init, d_out, d_final, dtype, cu_seqlens=None, **kwargs):
    """Outputs and gradients of fn with the inputs cast to dtype (the state kept fp32 unless dtype is fp64)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    init_leaf = init.detach().to(state_dtype).requires_grad_() if init is not None else None
    decay = decay.to(state_dtype)
    out, final = fn(*leaves, decay, init_leaf, cu_seqlens, **kwargs)
    loss = (out.double() * d_out).sum() + (final.double() * d_final).sum()
    loss.backward()
    grads = leaves + ([init_leaf] if init is not None else [])
    # a leaf that reaches no output (an initial state before an empty first document) gets no grad: zero
    return [out, final] + [x.grad if x.grad is not None else torch.zeros_like(x) for x in grads]


def _recurrent_low(q, k, v, decay, init, cu_seqlens=None):
    """The recurrence in the inputs' precision: the yardstick for the allowed error."""
    init = init.to(q.dtype) if init is not None else None
    return lightning_attn_recurrent(q, k, v, decay.to(q.dtype), init, cu_seqlens)


def _check(case, dtype, cu_seqlens=None, **kwargs):
    q, k, v, decay, init, d_out, d_final = case
    names = ["out", "final_state", "dq", "dk", "dv"] + (["d_initial_state"] if init is not None else [])
    exact = _run(lightning_attn_recurrent, *case, torch.float64, cu_seqlens)
    low = _run(_recurrent_low, *case, dtype, cu_seqlens)
    got = _run(lightning_attn_func, *case, dtype, cu_seqlens, kernel=True, **kwargs)
    for name, g, lo, ex in zip(names, got, low, exact):
        assert g.shape == ex.shape, f"{name}: shape {tuple(g.shape)} != {tuple(ex.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite or unwritten elements"
        err = (g.double() - ex).abs().max().item()
        low_err = (lo.double() - ex).abs().max().item()
        scale = ex.abs().max().item()
        tol = 3 * low_err + 1e-6 * scale
        assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e} (low-precision recurrence {low_err:.3e}, max {scale:.3e})"


# (batch, seqlen, heads, kv_heads, dk, dv, decay, initial state, chunk_size, num_segments)
CASES = {
    "B2-T70-H2-D32x16-init-seg2": (2, 70, 2, 2, 32, 16, "per_head", True, 16, 2),
    "B1-T75-H4-kv2-D16x32-init-seg3": (1, 75, 4, 2, 16, 32, "per_head", True, 16, 3),
    "B1-T47-H2-D24x40-noinit": (1, 47, 2, 2, 24, 40, "per_head", False, 16, 2),
    "B1-T33-H2-D16-zero-decay": (1, 33, 2, 1, 16, 16, "zero", True, 16, 1),
    "B1-T40-H1-D16-strong-decay": (1, 40, 1, 1, 16, 16, "strong", True, 16, 2),
    "B1-T130-H2-D64-chunk64": (1, 130, 2, 2, 64, 64, "per_head", True, 64, 2),
    "B1-T50-H1-D128-chunk16": (1, 50, 1, 1, 128, 128, "per_head", True, 16, 2),
}


# the head-dim 64 and 128 cases run in fp32 only, to keep the file fast
GRID = [pytest.param(shape, dtype, id=f"{name}-{dtype_name}") for name, shape in CASES.items()
        for dtype, dtype_name in ((torch.float32, "fp32"), (torch.float16, "fp16"))
        if not (dtype == torch.float16 and shape[4] >= 64)]


@pytest.mark.parametrize("shape, dtype", GRID)
def test_matches_recurrence(shape, dtype):
    batch, seqlen, heads, kv_heads, dk, dv, decay_kind, with_init, chunk, segments = shape
    case = _inputs(batch, seqlen, heads, kv_heads, dk, dv, decay_kind, with_init, seed=zlib.crc32(repr(shape).encode()))
    _check(case, dtype, chunk_size=chunk, num_segments=segments)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lengths", [[21, 40, 3, 17], [0, 30, 16, 0]], ids=["docs-21-40-3-17", "empty-first-last"])
def test_packed_documents(lengths, dtype):
    """The state restarts at each document; the initial state feeds the first, the final is the last's."""
    total = sum(lengths)
    case = _inputs(1, total, 4, 2, 16, 32, "per_head", True, seed=total + len(lengths))
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    _check(case, dtype, cu_seqlens, chunk_size=16, num_segments=3)


def test_packed_equals_separate_rows():
    """Documents packed with cu_seqlens give what the same documents give as separate batch rows."""
    q, k, v, decay, _, _, _ = _inputs(2, 50, 2, 2, 16, 16, "per_head", False, seed=7)
    rows, _ = lightning_attn_func(q.float(), k.float(), v.float(), decay.float(), chunk_size=16, kernel=True)
    flat = [x.float().reshape(1, 100, *x.shape[2:]) for x in (q, k, v)]
    cu_seqlens = torch.tensor([0, 50, 100], dtype=torch.int32)
    packed, _ = lightning_attn_func(*flat, decay.float(), cu_seqlens=cu_seqlens, chunk_size=16, num_segments=2,
                                    kernel=True)
    torch.testing.assert_close(packed.reshape(2, 50, 2, 16), rows, rtol=1e-5, atol=1e-5)


def test_chunked_reference_matches_recurrence():
    """The PyTorch fallback (CPU without the interpreter, float64) is exact up to fp32."""
    q, k, v, decay, init, _, _ = _inputs(2, 45, 4, 2, 16, 8, "per_head", True, seed=3)
    out, final = lightning_attn_chunked(q, k, v, decay, init, chunk_size=16)
    ref_out, ref_final = lightning_attn_recurrent(q, k, v, decay, init)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), ref_final, rtol=1e-5, atol=1e-5)


def test_segments_do_not_change_the_result():
    """Splitting the sequence into more parallel segments changes only rounding."""
    q, k, v, decay, init, _, _ = _inputs(1, 96, 2, 2, 16, 16, "per_head", True, seed=11)
    args = [x.float() for x in (q, k, v, decay, init)]
    one = lightning_attn_func(*args, chunk_size=16, num_segments=1, kernel=True)
    six = lightning_attn_func(*args, chunk_size=16, num_segments=6, kernel=True)
    for a, b in zip(one, six):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradient_through_final_state_only():
    """LASP uses only the final state of some calls: its gradient alone must reach k, v and the initial state."""
    q, k, v, decay, init, _, d_final = _inputs(1, 40, 2, 2, 16, 16, "per_head", True, seed=5)
    grads = []
    for fn, dtype in ((lightning_attn_func, torch.float32), (lightning_attn_recurrent, torch.float64)):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, init)]
        _, final = fn(*leaves[:3], decay.to(dtype), leaves[3], **({"chunk_size": 16, "kernel": True} if dtype == torch.float32 else {}))
        (final.double() * d_final).sum().backward()
        # q does not reach the final state: the recurrence leaves its gradient None, the kernel zero
        grads.append([x.grad.double() if x.grad is not None else torch.zeros_like(x) for x in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_bad_inputs_are_named():
    q = torch.randn(1, 8, 2, 16)
    decay = torch.zeros(2)
    with pytest.raises(ValueError, match="decay must have one value per query head"):
        lightning_attn_func(q, q, q, torch.zeros(3))
    with pytest.raises(ValueError, match="decay must be >= 0"):
        lightning_attn_func(q, q, q, torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="dividing the 2 query heads"):
        lightning_attn_func(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16), decay)
    with pytest.raises(ValueError, match="initial_state must be"):
        lightning_attn_func(q, q, q, decay, initial_state=torch.zeros(1, 2, 16, 8))
    with pytest.raises(ValueError, match="batch must be 1"):
        lightning_attn_func(torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), decay,
                            cu_seqlens=torch.tensor([0, 16], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the token count 8"):
        lightning_attn_func(q[:1], q[:1], q[:1], decay, cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32))
    with pytest.raises(TypeError, match="share one float dtype"):
        lightning_attn_func(q, q.half(), q, decay)
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        lightning_attn_func(q, q, q, decay, chunk_size=24)


def test_kernel_or_pytorch_is_chosen_by_dispatch(monkeypatch):
    """As the other ops (ops/dispatch.py): None runs PyTorch on a CPU tensor, True insists on the
    kernel (here interpreted), and a kernel that does not take the input says so."""
    import longctx.ops.linear as linear
    real, calls = linear.lightning_attn_chunked, []
    monkeypatch.setattr(linear, "lightning_attn_chunked", lambda *a: calls.append(a[0].dtype) or real(*a))
    q, k, v, decay, _, _, _ = _inputs(1, 20, 2, 2, 16, 16, "per_head", False, seed=13)
    args = [x.float() for x in (q, k, v, decay)]
    torch_out, _ = lightning_attn_func(*args, chunk_size=16)
    assert calls == [torch.float32]
    kernel_out, _ = lightning_attn_func(*args, chunk_size=16, kernel=True)
    assert calls == [torch.float32]
    torch.testing.assert_close(kernel_out, torch_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass kernel=None"):
        lightning_attn_func(q, k, v, decay, kernel=True)   # float64
