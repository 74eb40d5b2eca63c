"""silu(gate) * up that keeps only gate and up: the plain form's output exactly, gradients against
float64 within the error of autograd's plain form in the same precision, and what it keeps; Liger's
Triton kernels (interpreted on a CPU) against float64, and the gradients they write over gate and up."""
import pytest
import torch

from longctx.ops import dispatch
from longctx.ops.swiglu import silu_mul
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
def test_keeps_only_gate_and_up(interpreted_float_scalars, kernel):
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
# Liger's Triton kernels (interpreted on a CPU: tests/ops/conftest.py's interpreted_float_scalars
# lets the interpreter run them)
# ------------------------------------------------------------------------------------------------
def _kernel_dtypes():
    # Triton's interpreter computes bf16 wrongly; bf16 runs where a GPU is
    return [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


# rows of 50 (a masked block of 64), one element, a 1-D row wider than a block of Liger's warps
_SHAPES = [(3, 37, 50), (1,), (2100,)]


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    gate64, up64, grad64 = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 for _ in range(3))
    if gate64.numel() > 8:   # silu's extremes: exp(-g) overflowing to inf, 1 + exp(-g) rounding to 1, zero
        gate64.view(-1)[:8] = torch.tensor([-1e4, -100.0, -88.5, -20.0, 0.0, 20.0, 100.0, 1000.0], dtype=torch.float64)
    return gate64.to(dtype), up64.to(dtype), grad64.to(dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # NumPy's exp in the interpreter
@pytest.mark.parametrize("dtype", _kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_float64_within_the_error_of_autograd_in_low_precision(interpreted_float_scalars, nan_empty,
                                                                                shape, dtype):
    gate, up, grad = _inputs(shape, dtype, seed=sum(shape) + 1)

    def run(fn, dt, device):
        g, u = (t.to(device, dt).clone().requires_grad_() for t in (gate, up))
        out = fn(g, u)
        out.backward(grad.to(device, dt))
        return out.detach().double().cpu(), g.grad.double().cpu(), u.grad.double().cpu()
    truth = run(silu_mul_naive, torch.float64, "cpu")      # from the low-precision inputs
    ours = run(lambda g, u: silu_mul(g, u, kernel=True), dtype, DEVICE)
    low = run(silu_mul_naive, dtype, DEVICE)                # autograd on the plain form, same dtype
    for name, got, want, yardstick in zip(("out", "dgate", "dup"), ours, truth, low):
        assert torch.isfinite(got).all(), name
        err, err_low = (got - want).abs().max().item(), (yardstick - want).abs().max().item()
        assert err <= 2 * err_low + 1e-12, f"{name}: {err:.3g} vs autograd's {err_low:.3g}"


def test_kernel_backward_writes_the_gradients_over_gate_and_up_once(interpreted_float_scalars):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 8, generator=gen).to(DEVICE).requires_grad_()
    w_gate, w_up = (torch.randn(8, 24, generator=gen).to(DEVICE) for _ in range(2))
    gate, up = x @ w_gate, x @ w_up           # as the MLP's projections: non-leaves, contiguous
    gate64 = gate.detach().double().requires_grad_()
    up64 = up.detach().double().requires_grad_()
    want_gate, want_up = torch.autograd.grad(silu_mul_naive(gate64, up64).sum(), (gate64, up64))
    out = silu_mul(gate, up, kernel=True)
    grad_gate, grad_up = torch.autograd.grad(out.sum(), (gate, up), retain_graph=True)
    assert grad_gate.data_ptr() == gate.data_ptr() and grad_up.data_ptr() == up.data_ptr()
    assert (grad_gate.double() - want_gate).abs().max() < 1e-5 and (grad_up.double() - want_up).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()                  # a second backward would read gradients as gate and up


def test_kernel_reads_strided_views_as_their_contiguous_copies(interpreted_float_scalars):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 2, 40, 24, generator=gen).to(DEVICE)
    before = base.clone()
    gate = base[:, 0].transpose(1, 2).requires_grad_()        # (3, 24, 40), neither contiguous nor dense
    up = base[:, 1].transpose(1, 2).requires_grad_()
    grad = torch.randn(3, 40, 24, generator=gen).to(DEVICE).transpose(1, 2)
    out = silu_mul(gate, up, kernel=True)
    out.backward(grad)
    gate_c, up_c = gate.detach().contiguous().requires_grad_(), up.detach().contiguous().requires_grad_()
    out_c = silu_mul(gate_c, up_c, kernel=True)
    out_c.backward(grad.contiguous())
    assert torch.equal(base, before)                           # the copies took the gradients
    assert torch.equal(out, out_c)
    assert torch.equal(gate.grad, gate_c.grad) and torch.equal(up.grad, up_c.grad)


def test_cpu_tensors_run_pytorch_unless_the_kernel_is_asked_for(monkeypatch):
    from longctx.ops import swiglu
    monkeypatch.setattr(dispatch, "INTERPRETED", True)   # CPU tensors may ask for the kernel (as on a GPU machine)
    calls = []
    monkeypatch.setattr(swiglu._LigerSiluMul, "apply", lambda *a: calls.append(a) or a[0])
    gate, up = torch.randn(2, 8), torch.randn(2, 8)
    silu_mul(gate, up)
    silu_mul(gate, up, kernel=False)
    silu_mul(gate[:0], up[:0], kernel=True)                    # nothing to launch
    assert not calls
    silu_mul(gate, up, kernel=True)
    assert len(calls) == 1


def test_kernel_errors_name_the_fix(monkeypatch):
    gate, up = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="kernel=None"):
        silu_mul(gate.double(), up.double(), kernel=True)
    with pytest.raises(ValueError, match="kernel=None"):
        silu_mul(gate, up.half(), kernel=True)
    monkeypatch.setattr(dispatch, "INTERPRETED", False)   # as when longctx was imported without it
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        silu_mul(gate, up, kernel=True)
