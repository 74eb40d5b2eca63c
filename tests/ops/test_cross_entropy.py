"""Chunked cross entropy from hidden states: the PyTorch form against the plain form, the Triton
kernel (interpreted on a CPU) against a float64 reference within the error of the PyTorch form in
the same dtype, and the kernel's launcher on its own."""
import pytest
import torch
import torch.nn.functional as F

from longctx.ops import dispatch
from longctx.ops.cross_entropy import IGNORE_INDEX, chunked_cross_entropy
from longctx.ops.cross_entropy.kernel import logits_loss_and_grad_
from longctx.ops.cross_entropy.naive import cross_entropy_naive

# Without a GPU the kernel runs in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernel_dtypes():
    # Triton's interpreter computes bf16 wrongly; bf16 runs where a GPU is
    return [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


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


def _labels_with_ignored_rows(n, vocab, gen):
    """Labels over [0, vocab) with scattered ignored rows, and rows 16..31 all ignored (with chunk
    size 16, a chunk of ignored rows only); the first and last vocabulary entries appear."""
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[[1, 5, 6, 34]] = IGNORE_INDEX
    labels[16:32] = IGNORE_INDEX
    labels[0], labels[2] = 0, vocab - 1
    return labels


def _assert_within_twice_the_error_of(yardstick, got, want, name):
    assert torch.isfinite(got).all(), name
    err, err_low = (got - want).abs().max().item(), (yardstick - want).abs().max().item()
    assert err <= 2 * err_low + 1e-6 * want.abs().max().item(), f"{name}: {err:.3g} vs PyTorch's {err_low:.3g}"


@pytest.mark.parametrize("dtype", _kernel_dtypes(), ids=str)
def test_kernel_loss_and_gradients_match_float64_within_the_error_of_pytorch(nan_empty, dtype):
    # 37 rows in chunks of 16, 16 (all ignored) and 5; 1000 columns, which the interpreter's
    # blocks of 256 cover in four with a ragged last one
    n, hidden_size, vocab = 37, 48, 1000
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    labels = _labels_with_ignored_rows(n, vocab, gen)

    def run(h, w, **kw):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = (chunked_cross_entropy(h, w, labels.to(h.device), chunk_size=16, **kw) if kw
                else cross_entropy_naive(h, w, labels.to(h.device)))
        (1.5 * loss).backward()
        return loss.detach().double().cpu(), h.grad.double().cpu(), w.grad.double().cpu()

    truth = run(hidden.double(), weight.double())                           # from the rounded inputs
    ours = run(hidden.to(DEVICE), weight.to(DEVICE), kernel=True)
    low = run(hidden.to(DEVICE), weight.to(DEVICE), kernel=False)           # PyTorch, same dtype
    for name, got, want, yardstick in zip(("loss", "dhidden", "dweight"), ours, truth, low):
        _assert_within_twice_the_error_of(yardstick, got, want, name)


@pytest.mark.parametrize("dtype", _kernel_dtypes(), ids=str)
@pytest.mark.parametrize("block_v", [128, 1024], ids=lambda b: f"block{b}")
def test_launcher_writes_softmax_minus_onehot_in_place_and_per_row_losses(nan_empty, dtype, block_v):
    # block 128: 8 blocks a row, the last of 104 columns; block 1024: one block wider than the row
    n, vocab = 37, 1000
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 4).to(dtype)
    labels = _labels_with_ignored_rows(n, vocab, gen)
    valid = labels != IGNORE_INDEX
    onehot = F.one_hot(labels.clamp(min=0), vocab)
    wide = logits.double()
    want_loss = F.cross_entropy(wide, labels, ignore_index=IGNORE_INDEX, reduction="none")
    want_grad = (torch.softmax(wide, -1) - onehot) * valid[:, None]
    # the yardstick: the same math in fp32 PyTorch, the gradient rounded to the logits' dtype
    low_loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none").double()
    low_grad = ((torch.softmax(logits.float(), -1) - onehot) * valid[:, None]).to(dtype).double()

    forward_only = logits.to(DEVICE)
    loss_only = logits_loss_and_grad_(forward_only, labels.to(DEVICE), IGNORE_INDEX, with_grad=False, block_v=block_v)
    assert torch.equal(forward_only.cpu(), logits)                         # untouched without the gradient
    in_place = logits.to(DEVICE)
    loss = logits_loss_and_grad_(in_place, labels.to(DEVICE), IGNORE_INDEX, with_grad=True, block_v=block_v)
    assert loss.dtype == torch.float32 and loss.shape == (n,) and in_place.dtype == dtype
    assert torch.equal(loss, loss_only)
    assert loss.cpu()[~valid].eq(0).all() and in_place.cpu()[~valid].eq(0).all()
    _assert_within_twice_the_error_of(low_loss, loss.cpu().double(), want_loss, "loss")
    _assert_within_twice_the_error_of(low_grad, in_place.cpu().double(), want_grad, "grad")


def test_launcher_gives_nan_for_labels_out_of_range_without_reading_outside_the_row(nan_empty):
    # rows are views into a wider buffer whose extra columns hold a huge value: a read past a row
    # would spoil the finite loss of row 0, a write past it the extra columns
    vocab = 300
    buffer = torch.full((4, vocab + 64), 1e4, device=DEVICE)
    logits = buffer[:, :vocab]
    logits.copy_(torch.randn(4, vocab, generator=torch.Generator().manual_seed(2)).to(DEVICE))
    labels = torch.tensor([7, vocab, -1, IGNORE_INDEX], device=DEVICE)
    expected_row0 = F.cross_entropy(logits[:1].double(), labels[:1]).item()
    loss = logits_loss_and_grad_(logits, labels, IGNORE_INDEX, with_grad=True, block_v=128).cpu()
    assert abs(loss[0].item() - expected_row0) < 1e-5 and loss[3].item() == 0
    assert loss[1].isnan() and loss[2].isnan()
    assert logits[1:3].isnan().all() and logits[3].eq(0).all() and torch.isfinite(logits[0]).all()
    assert buffer[:, vocab:].eq(1e4).all()


def test_kernel_forward_only_and_mean_match_the_pytorch_form():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 19, 16, generator=gen).to(DEVICE)
    weight = torch.randn(400, 16, generator=gen).to(DEVICE)
    labels = torch.randint(0, 400, (2, 19), generator=gen)
    labels[1, :4] = IGNORE_INDEX
    labels = labels.to(DEVICE)
    for reduction in ("sum", "mean"):
        ours = chunked_cross_entropy(hidden, weight, labels, chunk_size=8, reduction=reduction, kernel=True)
        theirs = chunked_cross_entropy(hidden, weight, labels, chunk_size=8, reduction=reduction, kernel=False)
        assert not ours.requires_grad
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_kernel_makes_no_float32_copy_of_half_precision_logits():
    """PyTorch makes an fp32 (rows, vocab) copy of each chunk's logits; the kernel works on the
    logits in their own dtype."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.most = max(self.most, t.numel())
            return out

    n, vocab = 24, 512
    hidden = torch.randn(n, 16, dtype=torch.float16, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, 16, dtype=torch.float16, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    for kernel in (False, True):
        seen = LargestFloat32()
        with seen:
            chunked_cross_entropy(hidden, weight, labels, chunk_size=n, kernel=kernel).backward()
        # with the kernel the largest fp32 tensor is the weight gradient's accumulator
        assert seen.most == (weight.numel() if kernel else n * vocab)


def test_kernel_choice_and_its_errors_are_named(monkeypatch):
    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="kernel=None"):
        chunked_cross_entropy(hidden.double(), weight.double(), labels, kernel=True)
    monkeypatch.setattr(dispatch, "INTERPRETED", False)   # as when longctx was imported without it
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        chunked_cross_entropy(hidden, weight, labels, kernel=True)
    # None on a CPU, and for fp64 anywhere, runs PyTorch
    chunked_cross_entropy(hidden, weight, labels)
    chunked_cross_entropy(hidden.double(), weight.double(), labels)
