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
