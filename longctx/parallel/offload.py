"""Activation offload: the layer inputs that full checkpointing keeps wait in pinned CPU memory.

In the forward each decoder layer's checkpointed inputs are copied to the host on a side stream,
so the compute stream never waits for the copy. In the backward, when the recomputation of layer i
asks for its inputs, the copy of layer i-1's inputs back to the device starts on the side stream,
so that it runs under layer i's backward and is there when layer i-1 is recomputed. So at most two
layers' inputs are on the device during the backward: the layer being recomputed and the one
arriving (what `plan.py` counts). The last layer's input is kept on the device: the backward needs
it first, and nothing could hide its copy back.

What a pack needs is held by its layer's `_LayerInputs`, which autograd keeps through what the pack
hook returns: a graph dropped without a backward frees it, and there is no list here to drain.
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch


class _Saved:
    """One saved tensor: kept as it is, or offloaded (its host copy; the device copy while fetched)."""
    __slots__ = ("tensor", "host")

    def __init__(self, tensor, host=None):
        self.tensor = tensor    # on the device: kept, or fetched back (None while offloaded)
        self.host = host        # the host copy of an offloaded tensor (None if kept)


class _LayerInputs:
    """What one layer's forward saved, with the layer before it in the same forward (fetched next)."""

    def __init__(self, layer: int, previous: _LayerInputs | None, offload: bool):
        self.layer = layer
        self.previous = previous
        self.offload = offload
        self.saved: list[_Saved] = []
        self.device = None      # where the offloaded tensors live in the forward and the backward
        self.copied = None      # CUDA event: device copies started that the compute stream has not waited for

    def __del__(self):
        # Fetched but never used (a backward that stopped early): the device copies go back to the
        # allocator as memory of the compute stream, which must not reuse it before they are written.
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)


class ActivationOffloader:
    """Saved-tensor hooks around each layer's forward that offload its checkpointed inputs.

    One object serves all layers of a model (`attach`); state lives per layer and per forward, so
    gradient accumulation (several forwards, then backwards) and dropped graphs need no care.
    Tensors that need no gradient (rotary angles, positions, cu_seqlens: the same for every layer,
    one copy on the device as without offload) and those under `min_bytes` stay where they are.
    On the CPU the same bookkeeping runs with plain copies (what the tests exercise).
    """

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self._streams = {}      # device -> the side stream of the copies both ways
        self._current = None    # the layer whose forward runs now
        self._previous = None   # weak reference to the layer before it in this forward
        self._hooks = None

    def attach(self, layers) -> None:
        """Forward hooks, not a wrapper, so that parameter names do not change."""
        last = len(layers) - 1
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(functools.partial(self._enter, index, index < last))
            layer.register_forward_hook(self._leave, always_call=True)

    def _enter(self, index, offload, module, args):
        # weak: a forward whose graph is dropped frees its layers; the first layer starts a new chain
        previous = self._previous() if index > 0 and self._previous is not None else None
        self._current = _LayerInputs(index, previous, offload)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    def _leave(self, module, args, output):
        if self._hooks is None:  # a pre-hook before ours raised (this hook runs on errors too)
            return
        self._hooks.__exit__(None, None, None)
        self._previous, self._current, self._hooks = weakref.ref(self._current), None, None

    def _side_stream(self, device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, tensor):
        layer = self._current
        if layer.offload and tensor.requires_grad and tensor.numel() * tensor.element_size() >= self.min_bytes:
            layer.device = tensor.device
            layer.saved.append(_Saved(None, self._to_host(tensor.detach())))
        else:
            layer.saved.append(_Saved(tensor))
        return layer, len(layer.saved) - 1

    def _to_host(self, tensor):
        if not tensor.is_cuda:
            return tensor.clone()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)  # PyTorch's caching host allocator
        stream = self._side_stream(tensor.device)
        # the copy reads the tensor after the kernels queued so far, which write it
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        # The compute stream may drop the tensor as soon as this returns: the allocator must not hand
        # its memory out again before the side stream has read it. (The host buffer is safe too: the
        # caching host allocator records the copy's stream and waits for it before reusing the block.)
        tensor.record_stream(stream)
        return host

    def _fetch(self, layer, saved):
        """Start copying `saved` (offloaded tensors of `layer`) back to the device."""
        if not saved:
            return
        for s in saved:
            # Allocated on the compute stream, which uses and frees them: no record_stream, so the
            # memory is reused in stream order (a layer's inputs freed, the next one's arriving).
            s.tensor = torch.empty(s.host.shape, dtype=s.host.dtype, device=layer.device)
        cuda = layer.device.type == "cuda"
        if cuda:
            stream = self._side_stream(layer.device)
            # that memory may have been released by kernels still queued on the compute stream
            stream.wait_stream(torch.cuda.current_stream(layer.device))
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for s in saved:
                s.tensor.copy_(s.host, non_blocking=cuda)
        if cuda:  # one stream carries all copies in order: the latest event covers the earlier ones
            layer.copied = stream.record_event()

    def _unpack(self, packed):
        layer, index = packed
        saved = layer.saved[index]
        if saved.tensor is None:  # not prefetched: a chain broken by a layer that saved nothing, or a second backward
            self._fetch(layer, [saved])
        previous = layer.previous
        if previous is not None:  # the next layer the backward recomputes: its copy runs under this one
            self._fetch(previous, [s for s in previous.saved if s.host is not None and s.tensor is None])
        if layer.copied is not None:
            torch.cuda.current_stream(layer.device).wait_event(layer.copied)
            layer.copied = None
        tensor = saved.tensor
        if saved.host is not None:  # the device copy is the backward's now, freed after its use; the
            saved.tensor = None     # host copy stays for a retained graph and goes with the graph
        return tensor
