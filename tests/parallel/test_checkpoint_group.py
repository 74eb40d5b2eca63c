"""Grouped activation checkpointing: the loss and every gradient of per-layer checkpointing, one
stored input per group, the recompute it costs, and what the planner says it keeps."""
import math

import pytest
import torch

from longctx.model import Llama, ModelConfig
from longctx.parallel.parallelize import apply_activation_checkpointing

LAYERS, TOKENS, HIDDEN = 7, 23, 32


def build(group: int, offload: bool = False):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, attention="sdpa", mlp_chunk_size=5)
    model = Llama(config)
    offloader = apply_activation_checkpointing(model, "full", offload, group=group)
    if offloader is not None:
        offloader.min_bytes = 0
    return model, offloader


def run(model):
    """Loss, gradients by parameter name, layer forwards run, and the hidden-sized tensors that
    stay saved between the forward and the backward."""
    forwards = []
    # pre-hooks: a recompute that stops early (once it has what the backward needs) never returns
    hooks = [layer.register_forward_pre_hook(lambda m, a: forwards.append(1)) for layer in model.modules()
             if type(layer).__name__ == "DecoderLayer"]
    kept = []

    def pack(t):
        if t.requires_grad and t.shape[-1] == HIDDEN and t.numel() == TOKENS * HIDDEN:
            kept.append(t)
        return t
    ids = torch.randint(0, 64, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    cu_seqlens = torch.tensor([0, 9, TOKENS], dtype=torch.int32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, cu_seqlens=cu_seqlens, labels=ids).loss
    stored = len({t.untyped_storage().data_ptr() for t in kept})
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, len(forwards), stored


@pytest.mark.parametrize("group", [2, 3, 7])
def test_same_loss_and_gradients_one_input_per_group_and_k_minus_1_more_forwards(group):
    per_layer, _ = build(1)
    grouped, _ = build(group)
    loss, grads, forwards, stored = run(per_layer)
    loss_g, grads_g, forwards_g, stored_g = run(grouped)
    assert torch.equal(loss_g, loss)
    assert set(grads_g) == set(grads) and set(grouped.state_dict()) == set(per_layer.state_dict())
    for name, grad in grads.items():
        assert torch.equal(grads_g[name], grad), name
    groups = math.ceil(LAYERS / group)
    # the hidden states kept between forward and backward (besides the final norm's input, which
    # the loss keeps): each layer's input, or each group's
    assert stored == LAYERS + 1 and stored_g == groups + 1
    # full checkpointing runs each layer twice; a group's recompute adds its layers but the last
    sizes = [min(group, LAYERS - i) for i in range(0, LAYERS, group)]
    assert forwards == 2 * LAYERS and forwards_g == 2 * LAYERS + sum(s - 1 for s in sizes)


def test_composes_with_activation_offload():
    grouped, _ = build(3)
    offloaded, offloader = build(3, offload=True)
    to_host, moved = offloader._to_host, []
    offloader._to_host = lambda t: moved.append(tuple(t.shape)) or to_host(t)
    loss, grads, _, _ = run(grouped)
    loss_o, grads_o, _, _ = run(offloaded)
    assert torch.equal(loss_o, loss)
    for name, grad in grads.items():
        assert torch.equal(grads_o[name], grad), name
    # the inputs of the groups but the last go to the host: 3 groups of 7 layers
    assert moved == [(1, TOKENS, HIDDEN)] * 2


def test_plan_counts_the_group_inputs_and_the_group_in_its_backward():
    from types import SimpleNamespace
    from longctx.train.plan import estimate
    model = ModelConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
                        num_attention_heads=4, num_key_value_heads=2)
    model.name, tokens = "test", 1 << 16

    def parts(group, offload=False):
        cfg = SimpleNamespace(model=model, train=SimpleNamespace(
            micro_batch=1, seq_len=tokens, precision="bf16_autocast", activation_checkpoint="full",
            activation_offload=offload, checkpoint_group=group),
            parallel=SimpleNamespace(sp=1, dp=1, dp_backend="none", zero_stage=0, cpu_offload=False, sp_method="none"),
            optim=SimpleNamespace(offload=False), lora=SimpleNamespace(enabled=False))
        return estimate(cfg, 1).parts
    hidden_state = tokens * HIDDEN * 2
    for group in (1, 2, 3, 7):
        p = parts(group)
        assert p["activations (checkpointed inputs)"] == math.ceil(LAYERS / group) * hidden_state
        assert p.get("activations (group in its backward)", 0) == (group - 1) * hidden_state
    # offloaded: two groups' inputs on the device, whatever their number
    assert parts(3, offload=True)["activations (checkpointed inputs)"] == 2 * hidden_state
