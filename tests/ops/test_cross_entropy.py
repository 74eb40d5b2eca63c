import pytest
import torch
import torch.nn.functional as F

from longctx.ops.cross_entropy import chunked_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_loss_and_gradients_equal_plain(chunk, dtype):
    torch.manual_seed(chunk)
    hidden = torch.randn(3, 21, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (3, 21))
    labels[0, :5] = -100
    labels[2] = -100
    for reduction in ("sum", "mean"):
        hidden.grad = weight.grad = None
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk, reduction=reduction)
        (2.5 * loss).backward()
        grads = hidden.grad, weight.grad
        hidden.grad = weight.grad = None
        ref = F.cross_entropy((hidden @ weight.T).reshape(-1, 50).double(), labels.reshape(-1),
                              reduction=reduction, ignore_index=-100)
        (2.5 * ref).backward()
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(loss.double(), ref, **tol)
        torch.testing.assert_close(grads[0], hidden.grad, **tol)
        torch.testing.assert_close(grads[1], weight.grad, **tol)


def test_no_valid_labels_gives_zero_sum_and_zero_gradients():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss = chunked_cross_entropy(hidden, weight, torch.full((4,), -100), reduction="sum")
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must agree"):
        chunked_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))


def test_under_autocast_matmuls_run_in_bf16_and_match_fp64():
    """Under autocast no fp32 matmul of the vocab-sized logits or weight gradient may run (on a GPU
    it costs more than the rest of a short step); loss and gradients stay within bf16 error."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
                self.dtypes.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.2).requires_grad_()
    labels = torch.randint(0, 300, (40,))
    labels[:7] = -100
    seen = MatmulDtypes()
    with seen, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=16)
        loss.backward()
    assert seen.dtypes == {torch.bfloat16}
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, labels, reduction="sum", ignore_index=-100)
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
    for ours, theirs in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        assert ((ours.double() - theirs).norm() / theirs.norm()).item() < 2e-2
