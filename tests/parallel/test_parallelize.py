"""Activation checkpointing and offload change memory, not results: loss and every gradient
equal the plain model's."""
import pytest
import torch

from longctx.model import Llama, ModelConfig
from longctx.parallel import parallelize
from longctx.parallel.parallelize import apply_activation_checkpointing


def loss_and_grads(model, ids, cu_seqlens):
    model.zero_grad()
    loss = model(ids, cu_seqlens=cu_seqlens, labels=ids).loss
    loss.backward()
    # named_parameters shows the checkpoint wrapper's level; the state dict (checkpoints, HF export) does not
    return loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                           for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode, offload", [("full", False), ("selective", False), ("full", True)],
                         ids=["full", "selective", "full-offload"])
def test_checkpointing_keeps_loss_and_gradients(mode, offload, monkeypatch):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attention="sdpa", mlp_chunk_size=5)
    plain = Llama(config)
    wrapped = Llama(config)
    wrapped.load_state_dict(plain.state_dict())
    packed = []  # what went through the offloading hooks: with full checkpointing, the layer inputs

    class CountingSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(lambda t: packed.append(tuple(t.shape)) or t.cpu(), lambda t: t)
    monkeypatch.setattr(parallelize.torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    apply_activation_checkpointing(wrapped, mode, offload)
    ids = torch.randint(0, 64, (1, 23))
    cu_seqlens = torch.tensor([0, 9, 23], dtype=torch.int32)
    loss, grads = loss_and_grads(plain, ids, cu_seqlens)
    loss_w, grads_w = loss_and_grads(wrapped, ids, cu_seqlens)
    torch.testing.assert_close(loss_w, loss, atol=1e-6, rtol=0)
    assert set(grads_w) == set(grads)
    assert set(wrapped.state_dict()) == set(plain.state_dict())  # checkpoints and exports keep their names
    for name, grad in grads.items():
        torch.testing.assert_close(grads_w[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    if offload:
        # per layer only its inputs (hidden states, rotary cos/sin, positions, cu_seqlens), not
        # the activations inside it: those are recomputed in the backward
        hidden = [shape for shape in packed if shape == (1, 23, 32)]
        assert len(hidden) == 3 and len(packed) <= 3 * 5, packed
    else:
        assert packed == []
