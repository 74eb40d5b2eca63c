import pytest
import torch

_empty = torch.empty


@pytest.fixture
def nan_empty(monkeypatch):
    """Tensors the kernel launchers allocate with torch.empty start as NaN, so unwritten elements show."""
    def empty(*args, **kwargs):
        t = _empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", empty)
