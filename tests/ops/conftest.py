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


@pytest.fixture
def interpreted_float_scalars(monkeypatch):
    """Float scalar arguments reach an interpreted kernel as fp32 scalars, as they do a compiled one.

    Triton 3.8's interpreter wraps int and bool arguments as tensors but hands floats over as Python
    floats, on which Liger's kernels stop (`gate_multiplier.to(tl.float32)`: InterpreterError,
    AttributeError("'float' object has no attribute 'to'")). Nothing changes on a GPU."""
    if torch.cuda.is_available():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    plain = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return plain(arg)
    monkeypatch.setattr(interpreter, "_implicit_cvt", implicit_cvt)
