"""Activation offload's bookkeeping, on the CPU (plain copies instead of streams): results equal
full checkpointing's exactly, each layer's inputs come back one layer ahead of need, at most two
layers' inputs are resident in the backward, and nothing stays held after a backward or a dropped
graph."""
import weakref

import pytest
import torch

from longctx.model import Llama, ModelConfig
from longctx.parallel.parallelize import apply_activation_checkpointing

LAYERS = 4


def build(offload: bool, seed: int = 0):
    """A tiny Llama under full checkpointing; with offload, every layer input that needs a
    gradient goes through the offloader (no size threshold)."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, attention="sdpa", mlp_chunk_size=5)
    model = Llama(config)
    offloader = apply_activation_checkpointing(model, "full", offload)
    if offload:
        offloader.min_bytes = 0
    return model, offloader


def batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (1, 23), generator=generator), torch.tensor([0, 9, 23], dtype=torch.int32)


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_offload_changes_nothing(run):
    """`run(model)` does forwards and backwards and returns what else to compare (or None): with
    offload, it and every gradient are bitwise those of full checkpointing."""
    results = []
    for offload in (False, True):
        model, _ = build(offload)
        results.append((run(model), grads(model)))
    (out, expected), (out_offload, got) = results
    assert (out is None and out_offload is None) or torch.equal(out_offload, out)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


class Recorder:
    """What the offloader does, in order: ("unpack", layer) for each layer's first unpack in a
    backward, ("fetch", layer, layers whose inputs are alive then); plus a weak reference to every
    layer's saved inputs and to every layer input that needs a gradient (host copies aside)."""

    def __init__(self, offloader):
        self.events, self.layers, self.inputs = [], [], {}
        pack, unpack, fetch = offloader._pack, offloader._unpack, offloader._fetch

        def recording_pack(tensor):
            layer, index = pack(tensor)
            if index == 0:
                self.layers.append(weakref.ref(layer))
            if tensor.requires_grad:
                self.inputs.setdefault(layer.layer, []).append(weakref.ref(tensor))
            return layer, index

        def recording_unpack(packed):
            if ("unpack", packed[0].layer) not in self.events:
                self.events.append(("unpack", packed[0].layer))
            return unpack(packed)

        def recording_fetch(layer, saved):
            fetch(layer, saved)
            if not saved:
                return
            for s in saved:
                self.inputs.setdefault(layer.layer, []).append(weakref.ref(s.tensor))
            self.events.append(("fetch", layer.layer, self.resident()))
        offloader._pack, offloader._unpack, offloader._fetch = recording_pack, recording_unpack, recording_fetch

    def resident(self):
        """Layers with an input (kept, or fetched back) on the device."""
        return sorted(layer for layer, refs in self.inputs.items() if any(r() is not None for r in refs))

    def held(self):
        return [ref() for ref in self.layers if ref() is not None]


def test_same_loss_and_gradients_as_full_checkpointing():
    ids, cu_seqlens = batch(1)

    def run(model):
        loss = model(ids, cu_seqlens=cu_seqlens, labels=ids).loss
        loss.backward()
        return loss.detach()
    assert_offload_changes_nothing(run)


@pytest.mark.parametrize("schedule", ["forward-backward", "forwards-then-backward"])
def test_gradient_accumulation(schedule):
    """Two micro-batches: each backward after its forward, or both forwards (two chains of saved
    layers alive at once) and one backward of the summed losses."""
    micro_batches = [batch(1), batch(2)]

    def run(model):
        if schedule == "forward-backward":
            for ids, cu_seqlens in micro_batches:
                model(ids, cu_seqlens=cu_seqlens, labels=ids).loss.backward()
        else:
            losses = [model(ids, cu_seqlens=cu_seqlens, labels=ids).loss for ids, cu_seqlens in micro_batches]
            sum(losses).backward()
    assert_offload_changes_nothing(run)


def test_prefetch_one_layer_ahead_and_two_layers_resident():
    model, offloader = build(True)
    recorder = Recorder(offloader)
    ids, cu_seqlens = batch(1)
    loss = model(ids, cu_seqlens=cu_seqlens, labels=ids).loss
    # after the forward only the last layer's input is on the device (kept: the backward needs it first)
    assert recorder.resident() == [LAYERS - 1]
    assert len(recorder.held()) == LAYERS
    loss.backward()
    # The recomputation of layer i asks for its inputs first, and starts layer i-1's copy back,
    # which runs under layer i's backward; never a fetch on demand. When it starts, layer i+1's
    # inputs are gone: two layers' inputs on the device at most.
    expected = []
    for layer in reversed(range(LAYERS)):
        expected.append(("unpack", layer))
        if layer > 0:
            expected.append(("fetch", layer - 1, [layer - 1, layer]))
    assert recorder.events == expected
    # nothing held once the backward is done: no device copies, no host copies, no layer records
    assert recorder.resident() == [] and recorder.held() == []
    assert offloader._current is None and offloader._previous() is None


def test_nothing_held_after_a_dropped_graph_or_under_no_grad():
    model, offloader = build(True)
    recorder = Recorder(offloader)
    ids, cu_seqlens = batch(1)
    loss = model(ids, cu_seqlens=cu_seqlens, labels=ids).loss
    assert len(recorder.held()) == LAYERS
    del loss  # no backward: the graph frees the saved layers at once (no cycles, no garbage collection)
    assert recorder.held() == [] and recorder.resident() == []
    packed = len(recorder.layers)
    with torch.no_grad():  # evaluation: no graph, so nothing is packed at all
        model(ids, cu_seqlens=cu_seqlens, labels=ids)
    assert len(recorder.layers) == packed and recorder.events == []


def test_second_backward_of_a_retained_graph():
    """The host copies stay with the graph: a retained graph's second backward fetches them again."""
    ids, cu_seqlens = batch(1)

    def run(model):
        loss = model(ids, cu_seqlens=cu_seqlens, labels=ids).loss
        loss.backward(retain_graph=True)
        loss.backward()
    assert_offload_changes_nothing(run)


def test_a_failing_forward_leaves_no_hooks_behind():
    model, offloader = build(True)

    def fail(module, args):
        raise RuntimeError("boom")
    handle = model.layers[1]._checkpoint_wrapped_module.mlp.register_forward_pre_hook(fail)
    ids, cu_seqlens = batch(1)
    with pytest.raises(RuntimeError, match="boom"):
        model(ids, cu_seqlens=cu_seqlens, labels=ids)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert offloader._current is None
    handle.remove()
    model(ids, cu_seqlens=cu_seqlens, labels=ids).loss.backward()
