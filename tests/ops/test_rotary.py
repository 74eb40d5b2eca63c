"""Rotary embedding of q and k: Liger's kernel (interpreted on a CPU) against a float64 reference, within
the error of the plain form in the same precision, for both passes and the layouts the model passes;
the in-place contract (both paths) and what autograd makes of it; the input checks."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from longctx.model.rotary import rotary_cos_sin
from longctx.ops import dispatch
from longctx.ops.rotary import apply_rotary
from longctx.ops.rotary.naive import apply_rotary_naive

# Without a GPU the kernel runs in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def angles(batch, seqlen, head_dim, gen):
    """cos, sin (batch, seqlen, 1, head_dim) in float64 for random positions of each row."""
    inv_freq = 1.0 / (5000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    positions = torch.randint(0, 100_000, (batch, seqlen), generator=gen)
    return rotary_cos_sin(inv_freq, positions, torch.float64)


# batch, seqlen, q heads, k heads, head dim, batch of the angles
SHAPES = {"B2-S37-H3-Hkv1-D80-cosB": (2, 37, 3, 1, 80, 2), "B1-S50-H4-Hkv4-D64-cos1": (1, 50, 4, 4, 64, 1),
          "B3-S9-H8-Hkv2-D16-cos1": (3, 9, 8, 2, 16, 1), "B2-S1-H6-Hkv3-D32-cosB": (2, 1, 6, 3, 32, 2)}


def projections(batch, seqlen, heads, kv_heads, head_dim, dtype, gen):
    """q, k as the model makes them: (B, S, H, D) views of two linear projections' outputs, the
    projections' inputs (leaves, for the gradients) and a gradient for each output."""
    x = torch.randn(batch, seqlen, 16, generator=gen, dtype=torch.float64)
    w_q = torch.randn(16, heads * head_dim, generator=gen, dtype=torch.float64) / 4
    w_k = torch.randn(16, kv_heads * head_dim, generator=gen, dtype=torch.float64) / 4
    grads = (torch.randn(batch, seqlen, heads, head_dim, generator=gen, dtype=torch.float64),
             torch.randn(batch, seqlen, kv_heads, head_dim, generator=gen, dtype=torch.float64))
    return (x @ w_q).to(dtype), (x @ w_k).to(dtype), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kernel_matches_float64_within_the_plain_forms_error(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    batch, seqlen, heads, kv_heads, head_dim, angle_batch = shape
    cos64, sin64 = angles(angle_batch, seqlen, head_dim, gen)
    q_flat, k_flat, (grad_q, grad_k) = projections(batch, seqlen, heads, kv_heads, head_dim, dtype, gen)

    def run(dt, kernel):
        # the low-precision values, in dt (float64 for the reference)
        q_in, k_in = (t.to(DEVICE, dt, copy=True).requires_grad_() for t in (q_flat, k_flat))
        cos, sin = (a.to(dtype).to(dt).to(DEVICE) for a in (cos64, sin64))
        q = (q_in * 1).view(batch, seqlen, heads, head_dim)     # a view of a non-leaf, as a projection's
        k = (k_in * 1).view(batch, seqlen, kv_heads, head_dim)
        out_q, out_k = apply_rotary(q, k, cos, sin, kernel=kernel)
        torch.autograd.backward((out_q, out_k), (grad_q.to(dtype).to(dt).to(DEVICE),
                                                 grad_k.to(dtype).to(dt).to(DEVICE)))
        return out_q, out_k, q_in.grad.view_as(out_q), k_in.grad.view_as(out_k)
    ours = run(dtype, kernel=True)
    truth = run(torch.float64, kernel=False)
    plain = run(dtype, kernel=False)
    for name, got, want, low in zip(("q", "k", "dq", "dk"), ours, truth, plain):
        assert got.dtype == dtype and got.shape == want.shape
        err = (got.double() - want).abs().max().item()
        err_low = (low.double() - want).abs().max().item()
        assert err <= 2 * err_low + 1e-6, f"{name}: {err:.3g} vs the plain form's {err_low:.3g}"


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch", "kernel"])
def test_rotates_in_place_and_returns_q_and_k(kernel):
    gen = torch.Generator().manual_seed(2)
    cos, sin = (a.float().to(DEVICE) for a in angles(1, 11, 16, gen))
    q = torch.randn(2, 11, 4, 16, generator=gen).to(DEVICE)
    k = torch.randn(2, 11, 2, 16, generator=gen).to(DEVICE)
    want_q, want_k = apply_rotary_naive(q.double(), cos.double(), sin.double()), \
        apply_rotary_naive(k.double(), cos.double(), sin.double())
    out_q, out_k = apply_rotary(q, k, cos, sin, kernel=kernel)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert (q.double() - want_q).abs().max().item() < 1e-5 and (k.double() - want_k).abs().max().item() < 1e-5


def test_kernel_rotates_a_copy_of_strided_inputs():
    gen = torch.Generator().manual_seed(5)
    cos, sin = (a.float().to(DEVICE) for a in angles(1, 21, 32, gen))
    # heads sliced out of a wider projection: not contiguous over (seqlen, heads)
    wide = torch.randn(2, 21, 6, 32, generator=gen).to(DEVICE)
    before = wide.clone()
    q, k = wide[:, :, 1:5], wide[:, :, 5:]
    out_q, out_k = apply_rotary(q, k, cos, sin, kernel=True)
    assert torch.equal(wide, before)
    for got, x in ((out_q, q), (out_k, k)):
        want = apply_rotary_naive(x.double(), cos.double(), sin.double())
        assert (got.double() - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch", "kernel"])
def test_a_graph_that_saved_the_unrotated_values_is_refused(kernel):
    """Liger's own LigerRopeFunction does not mark q and k dirty: this graph would get wrong gradients."""
    gen = torch.Generator().manual_seed(3)
    cos, sin = (a.float().to(DEVICE) for a in angles(1, 5, 8, gen))
    x = torch.randn(1, 5, 2, 8, generator=gen).to(DEVICE).requires_grad_()
    scale = torch.ones((), device=DEVICE, requires_grad=True)
    q, k = x * 1, x * 2
    kept = q * scale                   # saves q, unrotated, for scale's gradient
    apply_rotary(q, k, cos, sin, kernel=kernel)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        kept.sum().backward()
    leaf = torch.randn(1, 5, 2, 8, device=DEVICE, requires_grad=True)
    for q in (leaf, leaf.view(1, 5, 2, 8)):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            apply_rotary(q, leaf.detach().clone(), cos, sin, kernel=kernel)


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch", "kernel"])
def test_gradients_are_the_same_under_activation_checkpointing(kernel):
    gen = torch.Generator().manual_seed(4)
    cos, sin = (a.float().to(DEVICE) for a in angles(2, 7, 16, gen))
    x = torch.randn(2, 7, 24, generator=gen).to(DEVICE)
    w_q, w_k = (torch.randn(24, h * 16, generator=gen).to(DEVICE).requires_grad_() for h in (4, 2))

    def project(x, cos, sin):
        q, k = apply_rotary((x @ w_q).view(2, 7, 4, 16), (x @ w_k).view(2, 7, 2, 16), cos, sin, kernel=kernel)
        return q * k.repeat_interleave(2, dim=2)     # a consumer that saves both

    grads = []
    for checkpointed in (False, True):
        out = checkpoint(project, x, cos, sin, use_reentrant=False) if checkpointed else project(x, cos, sin)
        grads.append(torch.autograd.grad(out.square().sum(), (w_q, w_k)))
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


def test_cpu_tensors_run_pytorch_unless_the_kernel_is_asked_for(monkeypatch):
    from longctx.ops import rotary
    monkeypatch.setattr(dispatch, "INTERPRETED", True)   # CPU tensors may ask for the kernel (as on a GPU machine)
    calls = []
    monkeypatch.setattr(rotary._LigerRotary, "apply", lambda *a: calls.append(a) or a[:2])
    q, k, cos = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    apply_rotary(q, k, cos, cos)
    apply_rotary(q, k, cos, cos, kernel=False)
    assert not calls
    apply_rotary(q, k, cos, cos, kernel=True)
    assert len(calls) == 1


def test_errors_name_the_fix(monkeypatch):
    q, cos = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 1, 16)
    with pytest.raises(ValueError, match=r"cos, sin \(batch or 1, seqlen, 1, head_dim\)"):
        apply_rotary(q, q.clone(), torch.randn(2, 8, 4, 16), torch.randn(2, 8, 4, 16))
    with pytest.raises(ValueError, match=r"q, k must be \(batch, seqlen, heads, head_dim\)"):
        apply_rotary(q, torch.randn(2, 7, 4, 16), cos, cos)
    with pytest.raises(ValueError, match="no gradient"):
        apply_rotary(q, q.clone(), cos.clone().requires_grad_(), cos)
    with pytest.raises(ValueError, match="kernel=None"):
        apply_rotary(q.double(), q.double(), cos, cos, kernel=True)
    monkeypatch.setattr(dispatch, "INTERPRETED", False)   # as when longctx was imported without it
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        apply_rotary(q, q.clone(), cos, cos, kernel=True)
