"""Per-sample random numbers for attacks: a sample's random start or noise depends only on
the sample (and a seed), not on its batch, its rank or the number of ranks."""
from __future__ import annotations

import zlib
from typing import Sequence

import torch
from torch.overrides import TorchFunctionMode

# Batch-shaped random draws made by torchattacks' attacks (PGD/EOTPGD/FFGSM/TPGD/GN/APGD)
# and robustbn's noise: in-place fills, and factories named by the fill they amount to.
_FILLS = {torch.Tensor.uniform_: 'uniform_', torch.Tensor.normal_: 'normal_',
          torch.Tensor.cauchy_: 'cauchy_', torch.Tensor.exponential_: 'exponential_'}
_LIKE = {torch.rand_like: ('uniform_', ()), torch.randn_like: ('normal_', ())}
_SIZED = {torch.rand: ('uniform_', ()), torch.randn: ('normal_', ())}


def sample_keys(raw: torch.Tensor, tag: str, seed: int) -> list:
    """One 32-bit key per sample of a raw (N, ...) batch: its bytes, the attack and the seed."""
    salt = f'{seed}/{tag}'.encode()
    return [zlib.crc32(salt, zlib.crc32(x.contiguous().numpy().tobytes()))
            for x in raw.detach().cpu()]


class PerSampleRNG(TorchFunctionMode):
    """While active, every random draw whose first dimension is the batch size fills row i
    from ``generators[i]``. Other draws use torch's global generator (seed it around this)."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.generators = list(generators)

    def _batched(self, shape) -> bool:
        return len(shape) > 0 and shape[0] == len(self.generators)

    def _fill(self, out: torch.Tensor, method: str, params: tuple, kwargs: dict):
        for row, gen in zip(out, self.generators):
            getattr(row, method)(*params, generator=gen, **kwargs)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get('generator') is None:
            kwargs.pop('generator', None)
            if func in _FILLS and self._batched(args[0].shape):
                return self._fill(args[0], _FILLS[func], tuple(args[1:]), kwargs)
            if func in _LIKE and self._batched(args[0].shape):
                method, params = _LIKE[func]
                return self._fill(torch.empty_like(args[0], **kwargs), method, params, {})
            if func in _SIZED:
                size = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
                if self._batched(tuple(size)):
                    method, params = _SIZED[func]
                    out = torch.empty(tuple(size), **kwargs)
                    return self._fill(out, method, params, {})
        return func(*args, **kwargs)


def generators(keys: Sequence[int], device: torch.device) -> list:
    return [torch.Generator(device=device).manual_seed(int(k)) for k in keys]
