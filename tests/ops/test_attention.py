"""Triton FlashAttention-2 (longctx.ops.attention) against the float64 PyTorch reference, on the CPU
through Triton's interpreter.

Tolerance: the kernel's relative error (to float64) must be at most twice that of PyTorch computing
the same reference in the inputs' precision, plus one unit of that precision's rounding. The
interpreter multiplies bf16 dots wrongly, so bf16 is checked on the GPU (scripts/bench_attention.py).
Every output the kernels allocate is filled with NaN first, so an element they fail to write shows.
Each backward check runs both modes: the one-pass backward (dQ by atomics) and the deterministic
two-kernel one.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from longctx.ops.attention import (  # noqa: E402
    attention_backward, attention_forward, flash_attn_func, flash_attn_varlen_func)
from longctx.ops.attention.backward import _bwd, compute_delta  # noqa: E402
from longctx.ops.attention.forward import _fwd, tma_layout  # noqa: E402
from longctx.ops.attention.naive import attention_reference  # noqa: E402


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    """Outputs the kernels allocate with torch.empty/empty_like start as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close_as_torch(name, ours, ref64, low):
    """ours vs float64 no worse than 2x PyTorch's own low-precision error, plus one rounding unit."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten or nan)"
    bound = 2 * rel_err(low, ref64) + torch.finfo(ours.dtype).eps
    err = rel_err(ours, ref64)
    assert err <= bound, f"{name}: relative error {err:.3e} over {bound:.3e} (2x torch's low precision)"


def assert_lse_close(lse, ref64, low):
    empty = torch.isinf(ref64)
    assert torch.equal(torch.isinf(lse), empty), "rows with nothing to attend to must have lse -inf, only they"
    assert (lse[empty] < 0).all()
    if (~empty).any():
        assert_close_as_torch("lse", lse[~empty], ref64[~empty], low[~empty])


def check_against_reference(q, k, v, dout, kwargs, fwd_kwargs=None):
    """Forward (out, lse) and backward (dq, dk, dv) of the kernels against float64 and low precision,
    the backward in both modes (one pass with dQ atomics, deterministic two kernels)."""
    fwd_kwargs = fwd_kwargs or {}
    out, lse = attention_forward(q, k, v, **kwargs, **fwd_kwargs)
    grads_by_mode = {deterministic: attention_backward(dout, q, k, v, out, lse, **kwargs, **fwd_kwargs,
                                                       deterministic=deterministic)
                     for deterministic in (False, True)}
    results = {}
    for precision in ("ref64", "low"):
        leaves = [(x.double() if precision == "ref64" else x).detach().requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = attention_reference(*leaves, **kwargs)
        ref_grads = torch.autograd.grad(ref_out, leaves, dout.to(ref_out.dtype), allow_unused=True)
        results[precision] = (ref_out.detach(), ref_lse.detach(), ref_grads)
    (out64, lse64, grads64), (out_low, lse_low, grads_low) = results["ref64"], results["low"]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_as_torch("out", out, out64, out_low)
    assert_lse_close(lse, lse64, lse_low)
    for deterministic, grads in grads_by_mode.items():
        for name, g, g64, g_low, like in zip(("dq", "dk", "dv"), grads, grads64, grads_low, (q, k, v)):
            assert g.shape == like.shape and g.dtype == like.dtype
            assert_close_as_torch(f"{name} (deterministic={deterministic})", g, g64, g_low)
    return out, lse, grads_by_mode[False]


def rand(*shape, dtype):
    return torch.randn(*shape, dtype=dtype)


DENSE_CASES = [
    # batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, dtype
    (2, 63, 63, 4, 4, 80, True, torch.float16),     # MHA, length not a block multiple
    (1, 50, 50, 4, 2, 64, False, torch.float16),    # GQA
    (1, 37, 70, 4, 1, 32, True, torch.float16),     # MQA, fewer queries than keys (bottom-right)
    (1, 40, 33, 2, 2, 96, True, torch.float16),     # more queries than keys: first rows see nothing
    (1, 64, 64, 2, 1, 128, True, torch.float16),    # exact block multiples
    (1, 45, 45, 2, 1, 256, True, torch.float32),
    (1, 29, 29, 2, 2, 192, False, torch.float32),
    (1, 19, 19, 2, 2, 16, True, torch.float16),     # the smallest head dim
    (1, 20, 70, 4, 1, 16, False, torch.float16),    # not causal, keys past the queries' blocks (dQ's wrap-round)
    (1, 33, 33, 2, 1, 20, True, torch.float16),     # head dim not a multiple of 8: padded for the descriptors
]


def dense_id(case):
    b, sq, sk, h, hkv, d, causal, dtype = case
    t = f"T{sq}" if sq == sk else f"Tq{sq}-Tk{sk}"
    return f"B{b}-{t}-H{h}-Hkv{hkv}-D{d}-{'causal' if causal else 'full'}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", DENSE_CASES, ids=dense_id)
def test_dense_forward_backward(case):
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, dtype = case
    q = rand(batch, seqlen_q, heads, head_dim, dtype=dtype)
    k, v = (rand(batch, seqlen_k, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    dout = rand(batch, seqlen_q, heads, head_dim, dtype=dtype)
    check_against_reference(q, k, v, dout, dict(causal=causal))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen_documents_of_length_one_and_zero(causal):
    # query and key lengths per document; a document with queries but no keys sees nothing
    lengths_q = [1, 17, 0, 40, 1, 5, 3]
    lengths_k = [1, 17, 0, 40, 1, 5, 0]
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).to(torch.int32)
    heads, kv_heads, head_dim, dtype = 4, 2, 64, torch.float16
    q = rand(int(cu_q[-1]), heads, head_dim, dtype=dtype)
    k, v = (rand(int(cu_k[-1]), kv_heads, head_dim, dtype=dtype) for _ in range(2))
    dout = rand(*q.shape, dtype=dtype)
    kwargs = dict(causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out, lse, _ = check_against_reference(q, k, v, dout, kwargs,
                                          dict(max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k)))
    assert lse.shape == (heads, q.shape[0])
    # the last document has queries and no keys
    assert (out[-3:] == 0).all() and torch.isinf(lse[:, -3:]).all()
    # the autograd function gives the same as the low-level pair
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    auto_out = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                                      deterministic=True)
    auto_out.backward(dout)
    torch.testing.assert_close(auto_out, out, rtol=0, atol=0)
    deterministic_grads = attention_backward(dout, q, k, v, out, lse, **kwargs, deterministic=True)
    for leaf, g in zip(leaves, deterministic_grads):
        torch.testing.assert_close(leaf.grad, g, rtol=0, atol=0)


def test_varlen_with_per_document_offsets_and_different_lengths():
    # a ring block pair: each document's queries sit somewhere after (or before) its keys
    lengths_q, lengths_k, offsets = [9, 20, 1, 13], [15, 7, 4, 13], [6, -5, 3, -13]
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).to(torch.int32)
    dtype = torch.float16
    q = rand(int(cu_q[-1]), 4, 48, dtype=dtype)
    k, v = (rand(int(cu_k[-1]), 1, 48, dtype=dtype) for _ in range(2))
    dout = rand(*q.shape, dtype=dtype)
    kwargs = dict(causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  causal_offsets=torch.tensor(offsets, dtype=torch.int32))
    _, lse, _ = check_against_reference(q, k, v, dout, kwargs)  # max lengths derived from cu_seqlens
    assert torch.isinf(lse[:, -13:]).all()  # offset -13: the last document's rows all see nothing


# offsets chosen so that diagonal blocks start on and off the block edges of the interpreter's blocks
@pytest.mark.parametrize("offset", [-18, 0, 14, 25], ids=lambda o: f"offset{o}")
def test_block_pair_with_causal_offset_on_strided_views(offset):
    # ring attention passes halves of a shard as views: strides are taken, not copied
    dtype = torch.float16
    q_full = rand(2, 70, 4, 32, dtype=dtype)
    k_full, v_full = (rand(2, 70, 2, 32, dtype=dtype) for _ in range(2))
    q, k, v = q_full[:, 35:], k_full[:, :35], v_full[:, :35]
    assert not q.is_contiguous()
    dout = rand(2, 35, 4, 32, dtype=dtype)
    check_against_reference(q, k, v, dout, dict(causal=True, causal_offset=offset))


def test_head_dim_not_contiguous_is_copied_and_gives_the_same_result():
    dtype = torch.float16
    q, k, v = (rand(1, 21, 2, 48, dtype=dtype) for _ in range(3))
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, head dim strided
    assert q_t.stride(-1) != 1
    out, lse = attention_forward(q_t, k, v, causal=True)
    ref_out, ref_lse = attention_forward(q, k, v, causal=True)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


def test_layouts_the_descriptors_cannot_take_are_copied_and_others_are_not():
    base = rand(1, 40, 3, 24, dtype=torch.float16)
    view = base[:, 7:]                           # starts 7 * 72 elements in: 16-byte aligned
    assert tma_layout(view).data_ptr() == view.data_ptr()
    shifted = base.flatten()[4:4 + 39 * 72].view(1, 39, 3, 24)   # starts 8 bytes in
    moved = tma_layout(shifted)
    assert moved.data_ptr() % 16 == 0 and torch.equal(moved, shifted)
    odd = rand(1, 5, 2, 20, dtype=torch.float16)  # rows of 40 bytes
    padded = tma_layout(odd)
    assert padded.shape == (1, 5, 2, 24) and torch.equal(padded[..., :20], odd) and not padded[..., 20:].any()
    # the results come back in the caller's head dim
    out, _ = attention_forward(shifted, shifted, shifted, causal=True)
    ref, _ = attention_forward(shifted.contiguous(), shifted.contiguous(), shifted.contiguous(), causal=True)
    assert out.shape == shifted.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_delta_reads_unaligned_rows_of_odd_head_dims_in_place(monkeypatch):
    """rowsum(dout * out) takes any layout with a contiguous head dim as it is: no padded copy."""
    base, dout = rand(1, 9 * 30 * 2 * 20 + 3, dtype=torch.float16), rand(1, 30, 2, 20, dtype=torch.float16)
    out = base.flatten()[3:3 + 30 * 2 * 20].view(1, 30, 2, 20)   # 6 bytes in, rows of 40 bytes
    lse = torch.zeros(1, 2, 30)
    monkeypatch.setattr(torch.nn.functional, "pad", None)   # a copy through tma_layout would fail here
    delta = compute_delta(out, dout, lse, varlen=False)
    expected = (out.double() * dout.double()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-5)


def test_ring_style_merge_of_two_key_halves_equals_full_attention():
    """Split the keys in two block pairs with offsets, merge by log-sum-exp in fp32: full causal attention."""
    dtype, seqlen, half = torch.float16, 48, 24
    q = rand(1, seqlen, 2, 64, dtype=dtype)
    k, v = (rand(1, seqlen, 2, 64, dtype=dtype) for _ in range(2))
    dout = rand(1, seqlen, 2, 64, dtype=dtype)
    parts = [attention_forward(q, k[:, :half], v[:, :half], causal=True, causal_offset=0, out_dtype=torch.float32),
             attention_forward(q, k[:, half:], v[:, half:], causal=True, causal_offset=-half,
                               out_dtype=torch.float32)]
    assert all(o.dtype == torch.float32 for o, _ in parts)
    lse = torch.logaddexp(parts[0][1], parts[1][1])  # [B, H, S]
    out = sum(o * torch.exp(l - lse).transpose(1, 2)[..., None] for o, l in parts)
    full_out, full_lse = attention_forward(q, k, v, causal=True)
    ref_out, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=True)
    low_out, low_lse = attention_reference(q, k, v, causal=True)
    assert_close_as_torch("merged out", out.to(dtype), ref_out, low_out)
    assert_close_as_torch("merged lse", lse, ref_lse, low_lse)
    # backward block by block with the merged out/lse and one shared delta, fp32 gradients summed
    delta = (dout.float() * out).sum(-1).transpose(1, 2).contiguous()
    grads = [attention_backward(dout, q, k[:, s], v[:, s], out, lse, causal=True, causal_offset=o, delta=delta,
                                grad_dtype=torch.float32)
             for s, o in ((slice(0, half), 0), (slice(half, None), -half))]
    assert all(g.dtype == torch.float32 for pair in grads for g in pair)
    dq = grads[0][0] + grads[1][0]
    dk, dv = torch.cat([grads[0][1], grads[1][1]], 1), torch.cat([grads[0][2], grads[1][2]], 1)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = torch.autograd.grad(attention_reference(*leaves, causal=True)[0], leaves, dout.double())
    low_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    low = torch.autograd.grad(attention_reference(*low_leaves, causal=True)[0], low_leaves, dout)
    for name, g, r, lo in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, low):
        assert_close_as_torch(name, g.to(dtype), r, lo)
    torch.testing.assert_close(full_lse, lse, rtol=0, atol=1e-5)


def test_autograd_function_matches_low_level_pair_and_default_scale():
    dtype = torch.float16
    q = rand(1, 30, 4, 40, dtype=dtype)
    k, v = (rand(1, 30, 2, 40, dtype=dtype) for _ in range(2))
    dout = rand(*q.shape, dtype=dtype)
    ref_out, ref_lse = attention_forward(q, k, v, causal=True, softmax_scale=0.3)
    for deterministic in (False, True):  # the flag reaches the backward
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = flash_attn_func(*leaves, causal=True, softmax_scale=0.3, deterministic=deterministic)
        out.backward(dout)
        ref_grads = attention_backward(dout, q, k, v, ref_out, ref_lse, causal=True, softmax_scale=0.3,
                                       deterministic=deterministic)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        for leaf, g in zip(leaves, ref_grads):
            torch.testing.assert_close(leaf.grad, g, rtol=0, atol=0)
    # the default scale is 1/sqrt(head_dim)
    default, _ = attention_forward(q, k, v, causal=True)
    explicit, _ = attention_forward(q, k, v, causal=True, softmax_scale=40 ** -0.5)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


BLOCK_SHAPES = [
    # forward (BLOCK_M, BLOCK_N); backward: deterministic ((dK/dV config), (dQ config)), or one pass (config)
    ((16, 32), True, ((16, 32, 4, 1, ""), (32, 16, 4, 1))),
    ((32, 32), True, ((32, 32, 4, 1, "split"), (32, 32, 4, 1))),
    ((32, 16), False, (32, 16, 4, 1)),
    ((16, 16), False, (16, 64, 4, 1)),
    ((32, 32), False, (32, 32, 4, 1, "split")),
]


@pytest.mark.parametrize("blocks", BLOCK_SHAPES, ids=["bm16-bn32", "bm32-bn32-split-dkdv", "one-pass-bm32-bn16",
                                                      "one-pass-bm16-bn64", "one-pass-bm32-bn32-split-dkdv"])
def test_other_block_shapes(blocks):
    """The causal split (unmasked blocks, diagonal, ragged ends) for other block shapes than the default,
    in both backward modes, and dK, dV computed in separate passes (an option for large head dims; in the
    one-pass mode the dK pass adds dQ)."""
    (fm, fn), deterministic, configs = blocks
    dtype = torch.float16
    q = rand(1, 53, 2, 32, dtype=dtype)
    k, v = (rand(1, 61, 1, 32, dtype=dtype) for _ in range(2))
    dout = rand(*q.shape, dtype=dtype)
    args = dict(softmax_scale=32 ** -0.5, causal=True, causal_offset=-2, cu_seqlens_q=None, cu_seqlens_k=None,
                max_seqlen_q=None, max_seqlen_k=None, causal_offsets=None)
    out, lse = _fwd(q, k, v, out_dtype=None, config=(fm, fn, 4, 1), **args)
    grads = _bwd(dout, q, k, v, out, lse, delta=None, grad_dtype=None, deterministic=deterministic,
                 configs=configs, **args)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = attention_reference(*leaves, causal=True, causal_offset=-2)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout.double())
    low_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    low_out, _ = attention_reference(*low_leaves, causal=True, causal_offset=-2)
    low_grads = torch.autograd.grad(low_out, low_leaves, dout)
    for name, x, r, lo in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), (low_out, *low_grads)):
        assert_close_as_torch(name, x, r, lo)


def test_one_pass_runs_only_where_its_table_has_the_head_dim(monkeypatch):
    """On CUDA the default backward takes the one pass only for head dims ONE_PASS_CONFIGS lists (where it
    measured faster); elsewhere, and always with deterministic=True, the two kernels."""
    from longctx.ops.attention import backward
    cuda = torch.device("cuda")
    monkeypatch.setattr(backward, "ONE_PASS_CONFIGS", {(128, True): (64, 128, 8, 2)})
    assert backward.one_pass_config(128, True, cuda) == (64, 128, 8, 2)
    assert backward.one_pass_config(128, False, cuda) is None
    assert backward.one_pass_config(64, True, cuda) is None
    assert backward.one_pass_config(64, True, torch.device("cpu")) == backward.INTERPRET_DKDV_CONFIG


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 8, 4, 32, dtype=torch.float16)
    k = torch.randn(1, 8, 2, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 512"):
        flash_attn_func(torch.randn(1, 8, 4, 512, dtype=torch.float16), torch.randn(1, 8, 4, 512, dtype=torch.float16),
                        torch.randn(1, 8, 4, 512, dtype=torch.float16))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attn_func(torch.randn(1, 8, 6, 32, dtype=torch.float16), torch.randn(1, 8, 4, 32, dtype=torch.float16),
                        torch.randn(1, 8, 4, 32, dtype=torch.float16))
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attn_func(q, k.float(), k)
    with pytest.raises(ValueError, match="4 dims"):
        flash_attn_func(q[0], k[0], k[0])
    with pytest.raises(TypeError, match="int32"):
        cu = torch.tensor([0, 8], dtype=torch.int64)
        flash_attn_varlen_func(q[0], k[0], k[0], cu, cu, 8, 8)
    with pytest.raises(ValueError, match="causal=False"):
        attention_forward(q, k, k, causal=False, causal_offset=2)
    with pytest.raises(ValueError, match="float32 of shape"):
        attention_backward(q, q, k, k, q, torch.zeros(1, 4, 7), causal=True)
    with pytest.raises(TypeError, match="bf16"):
        flash_attn_func(q.bfloat16(), k.bfloat16(), k.bfloat16())
    with pytest.raises(ValueError, match="softmax_scale must be positive"):
        flash_attn_func(q, k, k, softmax_scale=-0.1)


def test_cpu_tensors_without_the_interpreter_raise(monkeypatch):
    import longctx.ops.attention.forward as forward
    monkeypatch.setattr(forward, "INTERPRETED", False)
    q = torch.randn(1, 8, 2, 32, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        flash_attn_func(q, q, q)
