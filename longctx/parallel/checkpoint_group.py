"""Grouped activation checkpointing: one stored input per k decoder layers.

Full checkpointing keeps every layer's input (L hidden-sized tensors a sequence). Here the layers
run in groups of k, each group one non-reentrant `torch.utils.checkpoint` call whose layers are
each checkpointed again inside it (the `checkpoint_wrapper` of full checkpointing), so only the
groups' inputs stay: ceil(L/k) tensors.

The backward of a group goes in two steps:
  1. the group's recompute, from its stored input, rebuilds the inputs of its other layers (what
     the inner checkpoints saved). PyTorch's early stop ends it as soon as the last of those is
     saved, that is before the group's last layer runs: k - 1 layer forwards, not k;
  2. each layer, last first, is recomputed from its input and runs its backward, as under full
     checkpointing.
So a group of k layers costs k - 1 layer forwards more than full checkpointing (over a step of
forward, recompute and backward, about 4 layer-forward times a layer: (k - 1) / (4k) more
arithmetic, 19% at k = 4), and while a group is in its backward the inputs of its k layers are
on the device together (k - 1 beyond the stored one): `plan.py` counts both. Storing the layer
outputs of step 1 instead would be the same memory with no saving; recomputing every layer from
the group input alone would cost O(k^2) forwards. With k about sqrt(L) the stored and transient
inputs together are smallest (2 sqrt(L) instead of L).

The groups are modules outside the model's registered tree (`Llama.layer_groups`), so parameter
names, state dicts and checkpoints are those of full checkpointing. With activation offload the
groups' inputs, not the layers', go to the host (`ActivationOffloader.attach(groups)`).
"""
from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class CheckpointGroup(nn.Module):
    """k consecutive (already checkpoint-wrapped) decoder layers run as one checkpointed call."""

    def __init__(self, layers, preserve_rng_state: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.preserve_rng_state = preserve_rng_state

    def forward(self, x, *args):
        return checkpoint(self._run, x, *args, use_reentrant=False, preserve_rng_state=self.preserve_rng_state)

    def _run(self, x, *args):
        for layer in self.layers:
            x = layer(x, *args)
        return x


def group_layers(model, size: int, preserve_rng_state: bool = False) -> tuple:
    """Set `model.layer_groups` to groups of `size` consecutive layers (the last may be shorter);
    preserve_rng_state: the recompute draws the forward's random numbers again (LoRA's dropout)."""
    layers = list(model.layers)
    model.layer_groups = tuple(CheckpointGroup(layers[i:i + size], preserve_rng_state)
                               for i in range(0, len(layers), size))
    return model.layer_groups
