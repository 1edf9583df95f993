"""The collectives of the synchronized layers, and a count of what they move.

Forward statistics are synchronized in one of two ways (``sync_mode``):

- ``'reduce'`` (default): one ``all_reduce`` of a float64 vector of 2C + 1 per-channel
  sums, (count, sum x, sum x^2) over the ranks; its size does not depend on the world size W.
- ``'gather'``: one ``all_gather`` of every rank's (count, mean, M2) rows (2C + 1 values in
  the statistics dtype per row); each rank receives W times that.

The backward always all-reduces the two per-channel gradient sums (2C values).

:class:`CommCounter` records the payload of each collective while it is active (the
tensor sizes handed to ``torch.distributed``, no device sync), so a test or a tool can see
what a layer sends whatever the backend does below.
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

SYNC_MODES = ('reduce', 'gather')


def check_sync_mode(mode: str) -> str:
    if mode not in SYNC_MODES:
        raise ValueError(f'sync_mode must be one of {SYNC_MODES}, got {mode!r}')
    return mode


class Collective(NamedTuple):
    """One collective call: ``op`` ('all_reduce' or 'all_gather'), the rank's input
    (``numel`` values of ``itemsize`` bytes) and the group's size."""
    op: str
    numel: int
    itemsize: int
    world: int

    @property
    def input_bytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def output_bytes(self) -> int:
        """What the rank gets back: the reduced tensor, or all ranks' inputs."""
        return self.input_bytes * (self.world if self.op == 'all_gather' else 1)


_active: List['CommCounter'] = []


class CommCounter:
    """Context manager recording the layers' collectives in ``calls`` (this process only).

    Example::

        >>> with CommCounter() as counter:
        ...     model(x).sum().backward()
        >>> counter.output_bytes('all_gather')
    """

    def __init__(self) -> None:
        self.calls: List[Collective] = []

    def __enter__(self) -> 'CommCounter':
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)

    def input_bytes(self, op=None) -> int:
        return sum(c.input_bytes for c in self.calls if op in (None, c.op))

    def output_bytes(self, op=None) -> int:
        return sum(c.output_bytes for c in self.calls if op in (None, c.op))


def _record(op: str, t: Tensor, group) -> None:
    if _active:
        call = Collective(op, t.numel(), t.element_size(), dist.get_world_size(group))
        for counter in _active:
            counter.calls.append(call)


def all_reduce(t: Tensor, group) -> Tensor:
    """Sum of ``t`` over the group, in place."""
    _record('all_reduce', t, group)
    dist.all_reduce(t, group=group)
    return t


def all_gather(t: Tensor, group) -> Tensor:
    """Every rank's ``t`` (1D), concatenated in rank order."""
    _record('all_gather', t, group)
    out = t.new_empty(dist.get_world_size(group) * t.numel())
    dist.all_gather_into_tensor(out, t, group=group)
    return out


def reduce_moment_rows(rows: Tensor, group) -> Tensor:
    """Rows (S, 2C + 1) of (count, mean per channel, M2 per channel) on every rank -> the
    one row of all ranks' rows together, exactly (up to rounding), with one ``all_reduce``
    of 2C + 1 float64 sums: (count, sum x, sum x^2) per channel.

    sum x^2 - N mean^2 cancels, but in float64: the absolute error of the variance is about
    2^-52 mean^2, of the order of the variance that rounding float32 inputs to 24 bits
    already adds (2^-48 mean^2 / 12), so the float32 statistics lose nothing to it; each
    rank's own M2 comes from its centred local moments, never from sums of squares.
    """
    c = (rows.size(1) - 1) // 2
    r64 = rows.to(torch.float64)
    count, mean, m2 = r64[:, :1], r64[:, 1:c + 1], r64[:, c + 1:]
    s1 = count * mean
    sums = torch.cat([count, s1, torch.addcmul(m2, s1, mean)], dim=1).sum(0)
    all_reduce(sums, group)
    n, s1, s2 = sums[:1], sums[1:c + 1], sums[c + 1:]
    mean = s1 / n.clamp_min(1)
    m2 = torch.addcmul(s2, s1, mean, value=-1).clamp_min_(0)
    return torch.cat([n, mean, m2]).to(rows.dtype)[None]


def sync_moment_rows(rows: Tensor, group, mode: str) -> Tensor:
    """Rows (S, 2C + 1) of (count, mean, M2) of this rank -> rows covering all ranks: one
    row (``'reduce'``) or the W * S rows of every rank (``'gather'``)."""
    if mode == 'reduce':
        return reduce_moment_rows(rows, group)
    return all_gather(rows.reshape(-1), group).view(-1, rows.size(1))


def forward_payload(channels: int, mode: str, dtype: torch.dtype = torch.float32,
                    rows: int = 1) -> Collective:
    """The forward collective of a synchronized layer with ``channels`` channels as one
    rank hands it over (``rows`` rows per rank in gather mode; world left 1)."""
    check_sync_mode(mode)
    width = 2 * channels + 1
    if mode == 'reduce':
        return Collective('all_reduce', width, 8, 1)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    return Collective('all_gather', rows * width, torch.finfo(stat).bits // 8, 1)


__all__ = ['SYNC_MODES', 'CommCounter', 'Collective', 'all_reduce', 'all_gather',
           'sync_moment_rows', 'reduce_moment_rows', 'forward_payload', 'check_sync_mode']
