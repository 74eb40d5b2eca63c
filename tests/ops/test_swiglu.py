"""silu(gate) * up that keeps only gate and up: the plain form's output exactly, gradients against
float64 within the error of autograd's plain form in the same precision, and what it keeps; the
Triton kernels (interpreted on a CPU) the same way."""
import numpy as np
import pytest
import torch

from longctx.ops import dispatch
from longctx.ops.swiglu import silu_mul
from longctx.ops.swiglu.kernel import BLOCK
from longctx.ops.swiglu.naive import silu_mul_naive

# Without a GPU the kernels run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_float64_gradients_pass_gradcheck():
    gate = torch.randn(3, 7, 10, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 7, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_output_equals_the_plain_form_and_gradients_are_as_accurate(dtype):
    gen = torch.Generator().manual_seed(3)
    gate64, up64, grad64 = (torch.randn(4, 33, 48, generator=gen, dtype=torch.float64) * 3 for _ in range(3))

    def run(fn, dt):
        gate, up = gate64.to(dtype).to(dt).requires_grad_(), up64.to(dtype).to(dt).requires_grad_()
        out = fn(gate, up)
        out.backward(grad64.to(dtype).to(dt))
        return out, gate.grad, up.grad
    ours, truth, yardstick = run(silu_mul, dtype), run(silu_mul_naive, torch.float64), run(silu_mul_naive, dtype)
    assert ours[0].dtype == dtype and torch.equal(ours[0], yardstick[0])
    for name, got, want, low in zip(("dgate", "dup"), ours[1:], truth[1:], yardstick[1:]):
        assert got.dtype == dtype
        err, err_low = (got.double() - want).abs().max().item(), (low.double() - want).abs().max().item()
        assert err <= 2 * err_low + 1e-12, f"{name}: {err:.3g} vs autograd's {err_low:.3g}"


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch", "kernel"])
def test_keeps_only_gate_and_up(kernel):
    dtype = torch.bfloat16 if DEVICE == "cuda" or not kernel else torch.float16   # interpreter: no bf16
    gate = torch.randn(2, 50, 64, dtype=dtype, device=DEVICE, requires_grad=True)
    up = torch.randn(2, 50, 64, dtype=dtype, device=DEVICE, requires_grad=True)
    for fn, tensors in ((lambda g, u: silu_mul(g, u, kernel=kernel), 2), (silu_mul_naive, 3)):
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(gate, up)
        assert sum(kept.values()) == tensors * gate.numel() * 2, fn.__name__


def test_shapes_must_match():
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        silu_mul(torch.randn(2, 3), torch.randn(3, 2))


# ------------------------------------------------------------------------------------------------
# the Triton kernels
# ------------------------------------------------------------------------------------------------
def _kernel_dtypes():
    # Triton's interpreter computes bf16 wrongly; bf16 runs where a GPU is
    return [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


# (3, 37, 50): two blocks, the second partly masked; 2 * BLOCK + 37: a 1-D tail; (0, 5): no launch
_SHAPES = [(3, 37, 50), (2 * BLOCK + 37,), (1,), (0, 5)]


def _plain_as_the_kernel_runs(gate, up):
    """The plain form, on a CPU with the interpreter's exp. The interpreter computes exp with NumPy,
    which differs from PyTorch's CPU exp in the last bit of many floats (and so does silu in fp32, and
    now and then fp16's rounding of it): with NumPy's exp the kernel must give the plain form's bits.
    On a GPU the kernel calls the expf PyTorch's CUDA kernels call, and is held to the plain form."""
    if gate.is_cuda:
        return silu_mul_naive(gate, up)
    g = gate.float().numpy()
    with np.errstate(over="ignore"):    # exp(-g) overflows to inf for g < -88: silu is -0, as PyTorch's
        silu = g / (np.float32(1) + np.exp(-g))
    return torch.from_numpy(silu).to(gate.dtype) * up


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    gate64, up64, grad64 = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 for _ in range(3))
    if gate64.numel() > 8:   # silu's extremes: exp(-g) overflowing to inf, 1 + exp(-g) rounding to 1, zero
        gate64.view(-1)[:8] = torch.tensor([-1e4, -100.0, -88.5, -20.0, 0.0, 20.0, 100.0, 1000.0], dtype=torch.float64)
    return gate64.to(dtype), up64.to(dtype), grad64.to(dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # NumPy's exp in the interpreter
@pytest.mark.parametrize("dtype", _kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_forward_is_the_plain_forms_bit_for_bit(nan_empty, shape, dtype):
    gate, up, _ = (t.to(DEVICE) for t in _inputs(shape, dtype, seed=sum(shape)))
    out = silu_mul(gate, up, kernel=True)
    assert out.dtype == dtype and out.shape == gate.shape
    assert torch.equal(out, _plain_as_the_kernel_runs(gate, up))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", _kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", _SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_kernel_gradients_match_float64_within_the_error_of_autograd_in_low_precision(nan_empty, shape, dtype):
    gate, up, grad = _inputs(shape, dtype, seed=sum(shape) + 1)

    def run(fn, dt, device):
        g, u = (t.to(device, dt).clone().requires_grad_() for t in (gate, up))
        fn(g, u).backward(grad.to(device, dt))
        return g.grad.double().cpu(), u.grad.double().cpu()
    truth = run(silu_mul_naive, torch.float64, "cpu")      # from the low-precision inputs
    ours = run(lambda g, u: silu_mul(g, u, kernel=True), dtype, DEVICE)
    low = run(silu_mul_naive, dtype, DEVICE)                # autograd on the plain form, same dtype
    for name, got, want, yardstick in zip(("dgate", "dup"), ours, truth, low):
        assert torch.isfinite(got).all(), name
        err, err_low = (got - want).abs().max().item(), (yardstick - want).abs().max().item()
        assert err <= 2 * err_low + 1e-12, f"{name}: {err:.3g} vs autograd's {err_low:.3g}"


def test_kernel_reads_strided_views_as_their_contiguous_copies(nan_empty):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 2, 40, 24, generator=gen).to(DEVICE)
    gate = base[:, 0].transpose(1, 2).requires_grad_()        # (3, 24, 40), neither contiguous nor dense
    up = base[:, 1].transpose(1, 2).requires_grad_()
    grad = torch.randn(3, 40, 24, generator=gen).to(DEVICE).transpose(1, 2)
    out = silu_mul(gate, up, kernel=True)
    out.backward(grad)
    gate_c, up_c = gate.detach().contiguous().requires_grad_(), up.detach().contiguous().requires_grad_()
    out_c = silu_mul(gate_c, up_c, kernel=True)
    out_c.backward(grad.contiguous())
    assert torch.equal(out, out_c)
    assert torch.equal(gate.grad, gate_c.grad) and torch.equal(up.grad, up_c.grad)


def test_kernel_errors_name_the_fix(monkeypatch):
    gate, up = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="kernel=None"):
        silu_mul(gate.double(), up.double(), kernel=True)
    with pytest.raises(ValueError, match="kernel=None"):
        silu_mul(gate, up.half(), kernel=True)
    monkeypatch.setattr(dispatch, "INTERPRETED", False)   # as when longctx was imported without it
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        silu_mul(gate, up, kernel=True)
