"""Check that every rank holds the same model buffers (running statistics)."""
from __future__ import annotations

import logging
from typing import Dict, List

import torch
from mmengine.dist import all_reduce, broadcast, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

ACTIONS = ('raise', 'broadcast')


def buffer_mismatches(model: torch.nn.Module, action: str = 'raise') -> List[str]:
    """Names of the buffers that differ (bit for bit) from rank 0's, the same list on
    every rank; with ``action='broadcast'`` rank 0's values are then copied to all ranks.

    A collective: every rank must call it. One broadcast per buffer dtype and one
    all-reduce of the per-buffer flags.
    """
    if action not in ACTIONS:
        raise ValueError(f'action must be one of {ACTIONS}, got {action!r}')
    if get_dist_info()[1] == 1:
        return []
    named = [(n, b) for n, b in model.named_buffers() if b.numel()]
    if not named:
        return []
    device = named[0][1].device
    flags = torch.zeros(len(named), device=device)
    groups: Dict[torch.dtype, List[int]] = {}
    for i, (_, buf) in enumerate(named):
        groups.setdefault(buf.dtype, []).append(i)
    refs: Dict[int, torch.Tensor] = {}
    for dtype, idx in groups.items():
        flat = torch.cat([named[i][1].detach().reshape(-1).to(device) for i in idx])
        broadcast(flat, 0)
        for i, ref in zip(idx, flat.split([named[i][1].numel() for i in idx])):
            buf = named[i][1]
            refs[i] = ref.view_as(buf)
            if not torch.equal(refs[i].to(buf.device), buf):
                flags[i] = 1
    all_reduce(flags)  # summed: every rank learns every rank's mismatches
    bad = [i for i, f in enumerate(flags.tolist()) if f > 0]
    if action == 'broadcast':
        for i in bad:
            named[i][1].copy_(refs[i])
    return [named[i][0] for i in bad]


class BufferConsistencyHook(Hook):
    """Every ``interval`` training iterations (or epochs with ``by_epoch=True``) and at the
    end of training, check that all ranks hold identical model buffers.

    Data-parallel engines keep parameters equal by construction (DeepSpeed broadcasts them
    at start and all ranks apply the same update) but not buffers: running statistics of
    layers that normalize with local statistics drift apart, and a DeepSpeed checkpoint
    stores rank 0's only. SyncJSBN/SyncGpreBN update theirs from global statistics, so
    they must agree exactly; this hook proves it where checkpoints are written (set
    ``interval`` to the checkpoint interval: it runs before CheckpointHook in the same
    iteration). ``action='raise'`` stops training with the differing buffers' names;
    ``'broadcast'`` copies rank 0's values to all ranks and logs how many differed.
    """

    priority = 'NORMAL'  # before CheckpointHook (VERY_LOW) in after_train_iter

    def __init__(self, interval: int = 1, by_epoch: bool = False,
                 action: str = 'raise') -> None:
        if interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval}')
        if action not in ACTIONS:
            raise ValueError(f'action must be one of {ACTIONS}, got {action!r}')
        self.interval, self.by_epoch, self.action = interval, by_epoch, action
        self.checks = 0

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.by_epoch and (self.every_n_train_iters(runner, self.interval)
                                  or self.is_last_train_iter(runner)):
            self._check(runner, f'iteration {runner.iter + 1}')

    def after_train_epoch(self, runner) -> None:
        if self.by_epoch and (self.every_n_epochs(runner, self.interval)
                              or self.is_last_train_epoch(runner)):
            self._check(runner, f'epoch {runner.epoch + 1}')

    def _check(self, runner, where: str) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        bad = buffer_mismatches(model, self.action)
        self.checks += 1
        if not bad:
            return
        if self.action == 'raise':
            names = ', '.join(bad[:10]) + (f' and {len(bad) - 10} more' if len(bad) > 10 else '')
            raise RuntimeError(
                f'model buffers differ between ranks after {where}: {names}. '
                'Layers with local statistics (BN, JSBN) keep per-rank running statistics: '
                "use the synchronized layers (SyncJSBN, SyncBN) or action='broadcast'.")
        # Expected with per-GPU statistics: information, not a warning.
        print_log(f"copied rank 0's values of {len(bad)} buffers to all ranks after {where}",
                  logger='current', level=logging.INFO)
