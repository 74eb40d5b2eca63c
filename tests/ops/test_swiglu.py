"""silu(gate) * up that keeps only gate and up: the plain form's output exactly, gradients against
float64 within the error of autograd's plain form in the same precision, and what it keeps."""
import pytest
import torch
import torch.nn.functional as F

from longctx.ops.swiglu import silu_mul


def plain(gate, up):
    return F.silu(gate) * up


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
    ours, truth, yardstick = run(silu_mul, dtype), run(plain, torch.float64), run(plain, dtype)
    assert ours[0].dtype == dtype and torch.equal(ours[0], yardstick[0])
    for name, got, want, low in zip(("dgate", "dup"), ours[1:], truth[1:], yardstick[1:]):
        assert got.dtype == dtype
        err, err_low = (got.double() - want).abs().max().item(), (low.double() - want).abs().max().item()
        assert err <= 2 * err_low + 1e-12, f"{name}: {err:.3g} vs autograd's {err_low:.3g}"


def test_keeps_only_gate_and_up():
    gate = torch.randn(2, 50, 64, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(2, 50, 64, dtype=torch.bfloat16, requires_grad=True)
    for fn, tensors in ((silu_mul, 2), (plain, 3)):
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
