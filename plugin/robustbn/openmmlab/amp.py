"""Mixed precision on CPU for mmengine: bfloat16 autocast.

mmengine 0.10.7's ``AmpOptimWrapper`` asserts a GPU/NPU/MLU/MUSA device, while its
``autocast`` and torch's support CPU with bfloat16 only. ``CPUAmpOptimWrapper`` is the
plain ``OptimWrapper`` (gradient accumulation, clipping) inside a bfloat16 CPU autocast.
No loss scaling: bfloat16 has float32's exponent range, so gradients do not underflow.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper


class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose ``optim_context`` runs the forward under
    ``torch.autocast('cpu', dtype=torch.bfloat16)``. ``tools/train.py --amp`` selects it
    when CUDA is unavailable (``AmpOptimWrapper`` with float16 otherwise)."""

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        with super().optim_context(model), torch.autocast('cpu', dtype=torch.bfloat16):
            yield
