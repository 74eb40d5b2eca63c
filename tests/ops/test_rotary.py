"""Rotary embedding: the Triton kernel (interpreted on a CPU) against a float64 reference, within the
error of the plain form in the same precision, for both passes; the input checks."""
import pytest
import torch

from longctx.model.rotary import rotary_cos_sin
from longctx.ops.rotary import apply_rotary
from longctx.ops.rotary.naive import apply_rotary_naive

# Without a GPU the kernel runs in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def angles(batch, seqlen, head_dim, gen):
    """cos, sin (batch, seqlen, 1, head_dim) in float64 for random positions of each row."""
    inv_freq = 1.0 / (5000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    positions = torch.randint(0, 100_000, (batch, seqlen), generator=gen)
    return rotary_cos_sin(inv_freq.double(), positions, torch.float64)


SHAPES = {"B2-S37-H3-D80": (2, 37, 3, 80), "B1-S50-H4-D64": (1, 50, 4, 64), "B3-S9-H1-D16": (3, 9, 1, 16)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kernel_matches_float64_within_the_plain_forms_error(nan_empty, shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    batch, seqlen, heads, head_dim = shape
    cos64, sin64 = angles(batch, seqlen, head_dim, gen)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grad64 = torch.randn(shape, generator=gen, dtype=torch.float64)

    def run(fn, dt, **kwargs):
        x = x64.to(dtype).to(dt).to(DEVICE).requires_grad_()
        cos, sin = (a.to(dtype).to(dt).to(DEVICE) for a in (cos64, sin64))
        out = fn(x, cos, sin, **kwargs)
        out.backward(grad64.to(dtype).to(dt).to(DEVICE))
        return out, x.grad
    ours = run(apply_rotary, dtype, kernel=True)
    truth = run(apply_rotary_naive, torch.float64)
    plain = run(apply_rotary_naive, dtype)
    for name, got, want, low in zip(("out", "dx"), ours, truth, plain):
        assert got.dtype == dtype and got.shape == shape
        assert not got.isnan().any(), f"{name}: unwritten elements"
        err = (got.double() - want).abs().max().item()
        err_low = (low.double() - want).abs().max().item()
        assert err <= 2 * err_low + 1e-6, f"{name}: {err:.3g} vs the plain form's {err_low:.3g}"


def test_kernel_takes_strided_inputs_and_one_set_of_angles_for_the_batch():
    gen = torch.Generator().manual_seed(5)
    cos, sin = (a.float() for a in angles(1, 21, 32, gen))
    # heads sliced out of a wider projection: not contiguous over (seqlen, heads)
    wide = torch.randn(2, 21, 6, 32, generator=gen).to(DEVICE)
    x = wide[:, :, 1:5]
    ours = apply_rotary(x, cos.to(DEVICE), sin.to(DEVICE), kernel=True)
    want = apply_rotary_naive(x.double(), cos.double().to(DEVICE), sin.double().to(DEVICE))
    assert (ours.double() - want).abs().max().item() < 1e-5


def test_a_wrong_shape_is_named():
    x = torch.randn(2, 8, 4, 16)
    cos = torch.randn(2, 8, 4, 16)
    with pytest.raises(ValueError, match=r"cos, sin \(batch or 1, seqlen, 1, head_dim\)"):
        apply_rotary(x, cos, cos)
