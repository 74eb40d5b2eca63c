"""Activation checkpointing and offload change memory, not results: loss and every gradient
equal the plain model's."""
import pytest
import torch

from longctx.model import Llama, ModelConfig
from longctx.parallel.parallelize import apply_activation_checkpointing


def loss_and_grads(model, ids, cu_seqlens):
    model.zero_grad()
    loss = model(ids, cu_seqlens=cu_seqlens, labels=ids).loss
    loss.backward()
    # named_parameters shows the checkpoint wrapper's level; the state dict (checkpoints, HF export) does not
    return loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                           for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode, offload", [("none", False), ("full", False), ("selective", False), ("full", True)],
                         ids=["none", "full", "selective", "full-offload"])
def test_checkpointing_keeps_loss_and_gradients(mode, offload):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attention="sdpa", mlp_chunk_size=5)
    plain = Llama(config)
    wrapped = Llama(config)
    wrapped.load_state_dict(plain.state_dict())
    offloader = apply_activation_checkpointing(wrapped, mode, offload)
    assert (offloader is not None) == offload
    offloaded = []  # shapes of what went to the host: with full checkpointing, the layer inputs
    if offload:
        offloader.min_bytes = 0  # offload the tiny test tensors too
        to_host = offloader._to_host
        offloader._to_host = lambda t: offloaded.append(tuple(t.shape)) or to_host(t)
    ids = torch.randint(0, 64, (1, 23))
    cu_seqlens = torch.tensor([0, 9, 23], dtype=torch.int32)
    loss, grads = loss_and_grads(plain, ids, cu_seqlens)
    loss_w, grads_w = loss_and_grads(wrapped, ids, cu_seqlens)
    torch.testing.assert_close(loss_w, loss, atol=1e-6, rtol=0)
    assert set(grads_w) == set(grads)
    assert set(wrapped.state_dict()) == set(plain.state_dict())  # checkpoints and exports keep their names
    for name, grad in grads.items():
        torch.testing.assert_close(grads_w[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # Only the hidden states entering each layer but the last (which the backward needs first)
    # go to the host: not the activations inside a layer (recomputed in the backward), nor the
    # rotary angles, positions and cu_seqlens, which every layer shares on the device.
    assert offloaded == ([(1, 23, 32)] * 2 if offload else [])


class _KeepQKVOut(torch.autograd.Function):
    """A stand-in for the flash kernel on the CPU: saves q, k, v and its output, nothing else."""

    @staticmethod
    def forward(ctx, q, k, v):
        from longctx.model.attention import sdpa_attention
        with torch.no_grad():
            out = sdpa_attention(q, k, v)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        from longctx.model.attention import sdpa_attention
        q, k, v, _ = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = sdpa_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad)


def test_selective_keeps_the_layer_input_and_what_the_mixer_saves():
    """selective: per layer, what stays for the backward is the layer's input and the token
    mixer's own saved tensors (q, k, v, output); the norms, projections and MLP are recomputed."""
    from longctx.model.attention import register_attention
    register_attention("keep_qkv_out", lambda q, k, v, **kw: _KeepQKVOut.apply(q, k, v))
    layers, tokens, hidden, heads, kv_heads = 3, 40, 32, 4, 2
    config = ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, attention="keep_qkv_out")
    ids = torch.randint(0, 64, (1, tokens))

    def kept_bytes(mode):
        torch.manual_seed(0)
        model = Llama(config)
        apply_activation_checkpointing(model, mode)
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids).loss.backward()
        return sum(kept.values())

    full, selective, none = kept_bytes("full"), kept_bytes("selective"), kept_bytes("none")
    d = hidden // heads
    mixer = tokens * (2 * heads * d + 2 * kv_heads * d) * 4      # q, out; k, v (fp32)
    assert full < selective <= full + layers * mixer
    assert selective + layers * tokens * 96 * 4 * 2 < none          # at least the MLP's gate and up are gone


@pytest.mark.parametrize("selective_layers", [1, 2])
def test_mixed_checkpointing_keeps_loss_and_gradients_in_float64(selective_layers):
    """train.selective_layers=k with full (what activation_checkpoint=auto resolves to when some but
    not all mixers' outputs fit): the first k layers keep their mixer's outputs, the others are
    recomputed whole; loss and every gradient are those of no checkpointing, in float64."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attention="sdpa", mlp_chunk_size=5)
    plain = Llama(config).double()
    mixed = Llama(config).double()
    mixed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(mixed, "full", selective_layers=selective_layers)
    # the first k layers are selective, the rest wrapped for full recompute
    assert [getattr(layer, "recompute_around_mixer", False) for layer in mixed.layers] == \
        [i < selective_layers for i in range(3)]
    assert [hasattr(layer, "_checkpoint_wrapped_module") for layer in mixed.layers] == \
        [i >= selective_layers for i in range(3)]
    ids = torch.randint(0, 64, (1, 23))
    cu_seqlens = torch.tensor([0, 9, 23], dtype=torch.int32)
    loss, grads = loss_and_grads(plain, ids, cu_seqlens)
    loss_m, grads_m = loss_and_grads(mixed, ids, cu_seqlens)
    torch.testing.assert_close(loss_m, loss, atol=1e-12, rtol=0)
    assert set(grads_m) == set(grads) and set(mixed.state_dict()) == set(plain.state_dict())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_m[name], grad, atol=1e-12, rtol=1e-10, msg=name)


def test_mixed_checkpointing_keeps_what_the_plan_says_per_layer():
    """Each selective layer of a mix keeps, beyond full checkpointing's layer input, exactly its
    mixer's saved tensors (q, k, v, output; the planner's per-layer term, less the log-sum-exp this
    stand-in kernel does not make): measured from what autograd saves in the forward."""
    from longctx.model.attention import register_attention
    register_attention("keep_qkv_out", lambda q, k, v, **kw: _KeepQKVOut.apply(q, k, v))
    tokens, hidden, heads, kv_heads = 40, 32, 4, 2
    config = ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, attention="keep_qkv_out")
    ids = torch.randint(0, 64, (1, tokens))

    def kept_bytes(mode, k=0):
        torch.manual_seed(0)
        model = Llama(config)
        apply_activation_checkpointing(model, mode, selective_layers=k)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids)
        return sum(n for ptr, n in kept.items() if ptr not in weights)
    d = hidden // heads
    mixer = tokens * (2 * heads * d + 2 * kv_heads * d) * 4      # q, out; k, v (fp32)
    full = kept_bytes("full")
    assert [kept_bytes("full", k) - full for k in (1, 2)] == [mixer, 2 * mixer]
    assert kept_bytes("selective") - full == 3 * mixer


def test_selective_layers_refuse_groups_and_offload():
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attention="sdpa")
    with pytest.raises(ValueError, match="train.selective_layers=1 .*drop train.checkpoint_group"):
        apply_activation_checkpointing(Llama(config), "full", group=2, selective_layers=1)
    with pytest.raises(ValueError, match="auto is resolved before"):
        apply_activation_checkpointing(Llama(config), "auto")
