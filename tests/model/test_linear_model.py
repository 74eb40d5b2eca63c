"""The linear-attention layer and hybrid models (softmax every k-th layer, linear elsewhere).

Tolerances: the fp32 result's error against float64 sets the scale (the lightning kernel itself
works in fp32), plus a few fp32 roundings of the values' size. The kernel's own tests cover its
Triton path; these run its PyTorch path (faster on a CPU).
"""
import pytest
import torch
import torch.nn.functional as F

from longctx.model import Llama, ModelConfig
from longctx.model.linear_attention import LinearAttention, head_decays
from longctx.ops.linear.naive import lightning_attn_recurrent

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _pytorch_kernel_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _config(**overrides):
    base = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, layer_types=["linear", "linear", "softmax", "linear"], loss_chunk_size=16)
    return ModelConfig(**{**base, **overrides})


def _assert_close(got, truth, low_precision, name):
    got, truth, low_precision = got.double(), truth.double(), low_precision.double()
    tolerance = 2 * (low_precision - truth).abs().max().item() + 8 * EPS32 * truth.abs().max().item()
    error = (got - truth).abs().max().item()
    assert error <= tolerance, f"{name}: error {error:.3e} > tolerance {tolerance:.3e}"


def test_layer_is_the_documented_formula():
    """Projections, GQA head mapping, decay, output norm and gate against the float64 recurrence."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    config = _config()
    layer = LinearAttention(config).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 19, config.hidden_size, dtype=torch.float64)
    got = layer(x, None, None)

    heads, d = config.num_attention_heads, config.head_dim
    q = F.silu(x @ layer.q_proj.weight.T).view(2, 19, heads, d)
    k = F.silu(x @ layer.k_proj.weight.T).view(2, 19, config.num_key_value_heads, d)
    v = (x @ layer.v_proj.weight.T).view(2, 19, config.num_key_value_heads, d)
    group = heads // config.num_key_value_heads
    out, _ = lightning_attn_recurrent(q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2),
                                      head_decays(heads).double())
    out = out.reshape(2, 19, heads * d)
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * layer.norm.weight
    want = (out * torch.sigmoid(x @ layer.g_proj.weight.T)) @ layer.o_proj.weight.T
    low = LinearAttention(config)
    low.load_state_dict({n: t.float() for n, t in layer.state_dict().items()})
    _assert_close(got, want, low(x.float(), None, None), "layer output")


def test_hybrid_packed_documents_do_not_see_each_other():
    """Logits and gradients of a packed row equal those of its documents run one by one."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    lengths = [11, 25, 6]
    ids = torch.randint(0, 80, (1, sum(lengths)))
    cu = torch.tensor([0, 11, 36, 42], dtype=torch.int32)
    found = {}
    state = Llama(_config()).state_dict()
    for dtype in (torch.float32, torch.float64):
        model = Llama(_config()).to(dtype)
        model.load_state_dict(state)
        packed = model(ids, cu_seqlens=cu).logits
        alone = torch.cat([model(part).logits for part in ids.split(lengths, dim=1)], dim=1)
        found[dtype] = (packed.detach(), alone.detach())
    _assert_close(found[torch.float32][0], found[torch.float64][1], found[torch.float32][1], "packed logits")


def test_hybrid_model_trains_and_checks_config():
    config = _config(num_hidden_layers=3, layer_types=["linear", "softmax", "linear"])
    model = Llama(config)
    kinds = [type(layer.self_attn).__name__ for layer in model.layers]
    assert kinds == ["LinearAttention", "Attention", "LinearAttention"]
    ids = torch.randint(0, 80, (2, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(KeyError, match="unknown linear attention"):
        Llama(_config(linear_attention="nope"))(ids)


def test_meta_device_build_restores_the_decay():
    with torch.device("meta"):
        model = Llama(_config())
    model.to_empty(device="cpu")
    model.init_weights()
    decay = model.layers[0].self_attn.decay
    assert torch.equal(decay, head_decays(4))
    assert (decay > 0).all() and (decay[1:] < decay[:-1]).all()
