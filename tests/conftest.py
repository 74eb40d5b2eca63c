import os
import sys

import torch

# Spawned worker processes import test modules by name: keep tests/ importable.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels run in Triton's interpreter. Triton reads this when a kernel is
# defined, so it is set before any test imports longctx.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
