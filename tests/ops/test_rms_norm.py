"""RMSNorm that saves only its input and a scale per row: the plain form's output exactly, its
gradients, and the memory it keeps."""
import pytest
import torch

from longctx.ops.rms_norm import rms_norm


def plain(x, weight, eps):
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight.to(x.dtype) * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


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
    ours = rms_norm(x, weight, 1e-5)
    ours.backward(grad)
    ours_grads = x.grad, weight.grad
    x.grad = weight.grad = None
    reference = plain(x, weight, 1e-5)
    reference.backward(grad)
    assert ours.dtype == dtype and torch.equal(ours, reference)
    assert ours_grads[0].dtype == dtype and ours_grads[1].dtype == weight_dtype
    # ours computes the gradients in fp32, the plain form partly in the input's dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(ours_grads, (x.grad, weight.grad)):
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < tol


def test_keeps_only_its_input_and_a_scale_per_row():
    x = torch.randn(4, 100, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(64, requires_grad=True)
    for norm, most in ((rms_norm, x.numel() * 2 + weight.numel() * 4 + 400 * 4), (plain, None)):
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
