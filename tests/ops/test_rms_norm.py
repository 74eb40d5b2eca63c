"""RMSNorm that saves only its input and a scale per row: the PyTorch form against the plain form
(exact output, gradients, what it keeps), the Triton kernels (interpreted on a CPU) against a
float64 reference."""
import pytest
import torch

from longctx.ops.rms_norm import rms_norm
from longctx.ops.rms_norm.naive import rms_norm_naive

# Without a GPU the kernel runs in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_float64_gradients_pass_gradcheck():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, weight))


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16)])
def test_output_equals_the_plain_form_and_gradients_match(dtype, weight_dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 37, 64) * 3).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(64)).to(weight_dtype).requires_grad_()
    grad = torch.randn(2, 37, 64).to(dtype)
    ours = rms_norm(x, weight, 1e-5, kernel=False)
    ours.backward(grad)
    ours_grads = x.grad, weight.grad
    x.grad = weight.grad = None
    reference = rms_norm_naive(x, weight, 1e-5)
    reference.backward(grad)
    assert ours.dtype == dtype and torch.equal(ours, reference)
    assert ours_grads[0].dtype == dtype and ours_grads[1].dtype == weight_dtype
    # ours computes the gradients in fp32, the plain form partly in the input's dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(ours_grads, (x.grad, weight.grad)):
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < tol


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch", "kernel"])
def test_keeps_only_its_input_and_a_scale_per_row(kernel):
    dtype = torch.bfloat16 if DEVICE == "cuda" or not kernel else torch.float16   # interpreter: no bf16
    x = torch.randn(4, 100, 64, dtype=dtype, device=DEVICE, requires_grad=True)
    weight = torch.ones(64, device=DEVICE, requires_grad=True)
    for norm, most in ((lambda a, b, eps: rms_norm(a, b, eps, kernel=kernel), x.numel() * 2 + weight.numel() * 4 + 400 * 4),
                       (rms_norm_naive, None)):
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            norm(x, weight, 1e-6)
        if most is not None:
            assert sum(kept.values()) == most
        else:  # the plain form keeps an fp32 copy of x beside it
            assert sum(kept.values()) > x.numel() * (2 + 4)


def _kernel_dtypes():
    # Triton's interpreter computes bf16 wrongly; bf16 runs where a GPU is
    return [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", _kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 16), (2, 37, 80), (3, 50, 200), (1, 130, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_float64_within_the_error_of_pytorch_in_low_precision(nan_empty, shape, dtype):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    x64 = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + 0.5
    w64 = 1 + 0.3 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    g64 = torch.randn(*shape, generator=gen, dtype=torch.float64)
    # the inputs as the low-precision runs see them, then everything in float64 from those
    x_low, g_low = x64.to(dtype), g64.to(dtype)
    w32 = w64.float()

    def run(x, w, g, **kw):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = rms_norm(x, w, 1e-5, **kw) if kw else rms_norm_naive(x, w, 1e-5)
        y.backward(g)
        return y.detach().double().cpu(), x.grad.double().cpu(), w.grad.double().cpu()

    dev = dict(device=DEVICE)
    truth = run(x_low.double(), w32.to(dtype).double(), g_low.double())
    ours = run(x_low.to(**dev), w32.to(**dev), g_low.to(**dev), kernel=True)
    low = run(x_low.to(**dev), w32.to(**dev), g_low.to(**dev))       # plain PyTorch, same dtypes
    for name, got, want, yardstick in zip(("out", "dx", "dweight"), ours, truth, low):
        assert torch.isfinite(got).all(), name
        err, err_low = (got - want).abs().max().item(), (yardstick - want).abs().max().item()
        assert err <= 2 * err_low + 1e-6 * want.abs().max().item(), f"{name}: {err:.3g} vs PyTorch's {err_low:.3g}"


def test_kernel_handles_a_strided_input_and_no_weight_gradient(nan_empty):
    dtype = torch.float32
    base = torch.randn(6, 40, dtype=dtype, device=DEVICE)
    x = base[:, :24].requires_grad_()            # rows 40 apart: the kernel reads the view as it is
    weight = torch.randn(24, device=DEVICE)      # no gradient wanted
    grad = torch.randn(6, 24, dtype=dtype, device=DEVICE)
    y = rms_norm(x, weight, 1e-6, kernel=True)
    y.backward(grad)
    x_ref = x.detach().double().requires_grad_()
    y_ref = rms_norm_naive(x_ref, weight.double(), 1e-6)
    y_ref.backward(grad.double())
    assert weight.grad is None
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-5)


def test_bad_weight_shape_and_unsupported_kernel_dtype_are_named():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="kernel=None"):
        rms_norm(x.double(), torch.ones(8, dtype=torch.float64), 1e-6, kernel=True)
