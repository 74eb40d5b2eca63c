"""The attention seam (longctx.ops.attention.backends) on the CPU.

Each backend's forward, log-sum-exp and backward against an independent reference: PyTorch autograd
through the masked-softmax definition (`naive.attention_reference`) in float64. The torch backend
(its own explicit backward formulas) must match it to float64 round-off; the Triton kernels run under
TRITON_INTERPRET=1 in fp32 and fp16 and must be within twice the error of plain PyTorch in their
precision plus one rounding (as tests/ops/test_attention.py). cuDNN needs a GPU: on a CPU its record
must say why it does not run (scripts/check_backends_gpu.py checks its numbers).
Also: the one merge, `select` with names, aliases, the off switch and the measured table.
"""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from longctx.ops.attention import backends as seam  # noqa: E402
from longctx.ops.attention.naive import attention_reference  # noqa: E402

# name, (batch, q_len, k_len, heads, kv_heads, head_dim, causal, documents or None)
CASES = [
    ("causal", (2, 19, 19, 4, 4, 16, True, None)),
    ("gqa causal", (1, 33, 33, 4, 2, 32, True, None)),
    ("mqa full", (1, 21, 21, 4, 1, 16, False, None)),
    ("block fewer queries full", (1, 12, 30, 2, 2, 16, False, None)),   # a ring's off-diagonal block
    ("causal bottom-right", (1, 10, 25, 2, 1, 16, True, None)),        # queries at the end of the keys
    ("packed causal", (1, None, None, 4, 2, 16, True, [1, 17, 1, 9, 3])),
    ("packed full", (1, None, None, 2, 2, 16, False, [5, 1, 12])),
]


def make(spec, dtype, seed=0):
    batch, q_len, k_len, heads, kv_heads, head_dim, causal, docs = spec
    gen = torch.Generator().manual_seed(seed)
    if docs is not None:
        total = sum(docs)
        shapes = [(total, heads, head_dim), (total, kv_heads, head_dim), (total, kv_heads, head_dim)]
        cu = torch.tensor([0] + docs).cumsum(0).to(torch.int32)
        kwargs = dict(causal=causal, softmax_scale=head_dim ** -0.5, cu_seqlens=cu, max_seqlen=max(docs))
    else:
        shapes = [(batch, q_len, heads, head_dim), (batch, k_len, kv_heads, head_dim), (batch, k_len, kv_heads, head_dim)]
        kwargs = dict(causal=causal, softmax_scale=head_dim ** -0.5, cu_seqlens=None, max_seqlen=None)
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v, dout, kwargs


def reference(q, k, v, dout, kwargs):
    """(out, lse, dq, dk, dv) by autograd through the definition, in q's dtype."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    cu = kwargs["cu_seqlens"]
    extra = dict(cu_seqlens_q=cu, cu_seqlens_k=cu) if cu is not None else {}
    out, lse = attention_reference(*leaves, softmax_scale=kwargs["softmax_scale"], causal=kwargs["causal"], **extra)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), lse.detach(), *grads


def lse64(q, k, kwargs):
    """The log-sum-exp of the scores each query row may see, float64, in the backends' layout."""
    cu = kwargs["cu_seqlens"]
    if cu is not None:
        parts = [lse64(q[None, a:b], k[None, a:b], dict(kwargs, cu_seqlens=None))[0]
                 for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:])]
        return torch.cat(parts, dim=1)
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * kwargs["softmax_scale"]
    if kwargs["causal"]:
        rows, cols = torch.arange(q.shape[1])[:, None], torch.arange(k.shape[1])[None, :]
        scores = scores.masked_fill(cols > rows + k.shape[1] - q.shape[1], float("-inf"))
    return torch.logsumexp(scores, dim=-1)


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def run(backend, q, k, v, dout, kwargs):
    out, lse = backend.forward(q, k, v, **kwargs)
    return out, lse, *backend.backward(dout, q, k, v, out, lse, **kwargs)


@pytest.mark.parametrize("name, spec", CASES, ids=[c[0] for c in CASES])
def test_torch_backend_is_the_definition_in_float64(name, spec):
    q, k, v, dout, kwargs = make(spec, torch.float64)
    got = run(seam.backends()["torch"], q, k, v, dout, kwargs)
    want = reference(q, k, v, dout, kwargs)
    out, lse = got[0], got[1]
    assert out.dtype == torch.float64 and lse.dtype == torch.float64    # no fp32 step in the reference
    want_lse = lse64(q, k, kwargs)
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (lse[~empty] - want_lse[~empty]).abs().max() < 1e-12
    for what, g, w in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], want[:1] + want[2:]):
        assert g.shape == w.shape, what
        assert rel(g, w) < 1e-12, f"{name} {what}: {rel(g, w):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name, spec", CASES, ids=[c[0] for c in CASES])
def test_triton_backend_against_float64(name, spec, dtype):
    q, k, v, dout, kwargs = make(spec, dtype, seed=1)
    got = run(seam.backends()["triton"], q, k, v, dout, kwargs)
    truth = reference(q.double(), k.double(), v.double(), dout.double(), kwargs)
    low = reference(q, k, v, dout, kwargs)       # plain PyTorch in the inputs' precision (softmax in fp32)
    eps = torch.finfo(dtype).eps
    empty = torch.isinf(truth[1])
    assert torch.equal(torch.isinf(got[1]), empty), f"{name}: rows with lse -inf differ"
    assert got[1].dtype == torch.float32
    assert (got[1][~empty] - truth[1][~empty]).abs().max() < 2 * (low[1][~empty] - truth[1][~empty]).abs().max() + 1e-4
    for what, g, t, l in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], truth[:1] + truth[2:], low[:1] + low[2:]):
        assert g.shape == t.shape and g.dtype == dtype, what
        assert torch.isfinite(g).all(), f"{name} {what}: not finite"
        assert rel(g, t) <= 2 * rel(l, t) + eps, f"{name} {what}: {rel(g, t):.2e} over 2x {rel(l, t):.2e} + eps"


def test_hints_out_dtype_delta_and_grad_dtype_give_the_same_numbers():
    """What ring attention asks for (fp32 output, its own delta, fp32 gradients) changes only dtypes."""
    q, k, v, dout, kwargs = make(CASES[1][1], torch.float16, seed=2)
    for backend in (seam.backends()["torch"], seam.backends()["triton"]):
        out, lse = backend.forward(q, k, v, **kwargs)
        out32, lse32 = backend.forward(q, k, v, out_dtype=torch.float32, **kwargs)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.half(), out, rtol=0, atol=1e-3)
        torch.testing.assert_close(lse32, lse)
        delta = (dout.float() * out32).sum(-1).transpose(1, 2).contiguous()
        plain = backend.backward(dout, q, k, v, out, lse, **kwargs)
        hinted = backend.backward(dout, q, k, v, out, lse, delta=delta, grad_dtype=torch.float32, **kwargs)
        for a, b in zip(plain, hinted):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b.half(), a, rtol=1e-2, atol=2e-3)


def test_cudnn_says_why_it_does_not_run_here():
    cudnn = seam.backends()["cudnn"]
    ok, reason = cudnn.usable("cpu", torch.bfloat16, 128)
    assert not ok and reason
    if not torch.cuda.is_available():
        assert "CUDA" in cudnn.available()[1]


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_merge_of_two_key_halves_is_attention_to_all_keys(layout):
    """Attention to keys [0, n) merged with attention to [n, N) equals attention to all N (full,
    float64); a query row no key reaches yet stays 0 with lse -inf."""
    torch.manual_seed(3)
    batch, sq, sk, heads, dim = 2, 7, 12, 3, 8
    q = torch.randn(batch, sq, heads, dim, dtype=torch.float64)
    k, v = (torch.randn(batch, sk, heads, dim, dtype=torch.float64) for _ in range(2))
    torch_backend = seam.backends()["torch"]
    whole, whole_lse = torch_backend.forward(q, k, v, causal=False)
    first = torch_backend.forward(q, k[:, :5], v[:, :5], causal=False)
    second = torch_backend.forward(q, k[:, 5:], v[:, 5:], causal=False)
    if layout == "packed":   # (S, H, D) with lse (H, S): one batch row
        whole, whole_lse = whole[0], whole_lse[0]
        first, second = (first[0][0], first[1][0]), (second[0][0], second[1][0])
    out, lse = first[0].clone(), first[1].clone()
    result = seam.merge_into(out, lse, *second)
    assert result[0] is out and result[1] is lse
    torch.testing.assert_close(out, whole, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-13, atol=1e-13)
    # rows with nothing on either side; then a part that reaches them
    nothing_out, nothing_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    seam.merge_into(nothing_out, nothing_lse, torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    assert (nothing_out == 0).all() and torch.isinf(nothing_lse).all()
    seam.merge_into(nothing_out, nothing_lse, whole, whole_lse)
    torch.testing.assert_close(nothing_out, whole, rtol=0, atol=0)


def test_names_and_aliases_select_a_backend_or_say_why_not():
    cpu = dict(device="cpu", dtype=torch.float32, head_dim=16)
    assert seam.select("auto", **cpu).name == "torch"                   # a CPU runs plain PyTorch
    assert seam.select("sdpa", **cpu).name == "torch"                   # sdpa: cuDNN where it runs, else torch
    assert seam.select("flash", **cpu).name == "triton"                 # flash: triton (interpreted here)
    assert seam.select("torch", device="cpu", dtype=torch.float64, head_dim=16).name == "torch"
    with pytest.raises(ValueError, match="^unknown attention backend 'nope': choose one of auto, torch, triton, "
                                         "cudnn, flash, sdpa") as error:
        seam.select("nope", **cpu)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="'triton' cannot run torch.float64 .*triton: the Triton kernels take "
                                         "fp16/bf16/fp32"):
        seam.select("triton", device="cpu", dtype=torch.float64, head_dim=16)
    with pytest.raises(ValueError, match="'cudnn' cannot run .*cudnn: "):
        seam.select("cudnn", **cpu)


def test_the_off_switch_turns_a_backend_off(monkeypatch):
    monkeypatch.setenv(seam.OFF_ENV, "triton")
    with pytest.raises(ValueError, match=f"triton: turned off by {seam.OFF_ENV}"):
        seam.select("flash", device="cpu", dtype=torch.float32, head_dim=16)
    monkeypatch.setenv(seam.OFF_ENV, "torch,triton")
    with pytest.raises(ValueError, match=f"torch: turned off by {seam.OFF_ENV}"):
        seam.select("auto", device="cpu", dtype=torch.float32, head_dim=16)
    monkeypatch.delenv(seam.OFF_ENV)
    assert seam.select("auto", device="cpu", dtype=torch.float32, head_dim=16).name == "torch"


def test_auto_reads_the_measured_table_and_falls_back(tmp_path, caplog):
    """An entry for the shape (or the nearest measured length of the same shape) picks its backend;
    an entry naming a backend that cannot run the call, or no entry, gives the first that can."""
    shape = dict(device="cpu", dtype=torch.float32, head_dim=16, causal=True, gqa=2, varlen=False)
    key_8k = seam.table_key(seqlen=8192, gqa_ratio=2, **{k: v for k, v in shape.items() if k != "gqa"})
    assert key_8k == "cpu|float32|d16|causal|g2|dense|s8192"
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": {key_8k: {"backend": "triton"},
                                            key_8k.replace("float32", "float64"): {"backend": "triton"}}}))
    with caplog.at_level("INFO", logger="longctx.attention"):
        assert seam.select("auto", seqlen=8000, table_path=str(path), **shape).name == "triton"
        assert seam.select("auto", seqlen=8000, table_path=str(path), **shape).name == "triton"
    chosen = [r.message for r in caplog.records if "table entry" in r.message]
    assert len(chosen) == 1 and key_8k in chosen[0]                        # logged once
    assert seam.select("auto", seqlen=100_000, table_path=str(path), **shape).name == "triton"   # nearest length
    assert seam.select("auto", seqlen=8000, table_path=str(path), **dict(shape, gqa=4)).name == "torch"  # no entry
    float64 = dict(shape, dtype=torch.float64)
    assert seam.select("auto", seqlen=8000, table_path=str(path), **float64).name == "torch"   # triton can't
    assert seam.load_table(str(tmp_path / "absent.json")) == {}


def test_the_committed_table_names_only_known_backends():
    if not os.path.exists(seam.TABLE_PATH):
        pytest.skip("no measured table committed yet")
    with open(seam.TABLE_PATH) as f:
        data = json.load(f)
    for key, entry in data["entries"].items():
        assert entry["backend"] in seam.backends(), key
        assert len(key.split("|")) == 7, key


def test_attention_with_autograd_matches_the_definition():
    q, k, v, dout, kwargs = make(CASES[5][1], torch.float64, seed=4)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = seam.attention(*leaves, backend="auto", causal=True, cu_seqlens=kwargs["cu_seqlens"],
                         max_seqlen=kwargs["max_seqlen"])
    grads = torch.autograd.grad(out, leaves, dout)
    want = reference(q, k, v, dout, kwargs)
    for g, w in zip((out, *grads), want[:1] + want[2:]):
        assert rel(g, w) < 1e-12


def test_the_torch_backend_ignores_autocast():
    """Under CPU autocast (bf16) the torch backend still computes in fp32: its error is fp32's."""
    q, k, v, dout, kwargs = make(CASES[0][1], torch.float32, seed=5)
    truth = reference(q.double(), k.double(), v.double(), dout.double(), kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = seam.backends()["torch"].forward(q, k, v, **kwargs)
    assert rel(out, truth[0]) < 1e-5
