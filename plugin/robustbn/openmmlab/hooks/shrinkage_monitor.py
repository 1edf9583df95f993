"""Log the James-Stein layers' shrinkage factors during training."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ...base import ShrunkBatchNorm
from ...jsbn import JSBatchNorm

FACTOR_NAMES = ('mean_factor', 'var_factor', 'var_scale')


class ShrinkageMonitorHook(Hook):
    """Every ``interval`` training iterations, log each JS layer's shrinkage factors.

    Factors (see ``robustbn.estimators.shrinkage_factors``; 1 means unchanged):
    ``mean_factor`` (spread of the channel means kept), ``var_factor`` (spread of the log
    variances kept) and ``var_scale`` (geometric-mean ratio of used to batch variance).
    Logged as their mean, min and max over layers (``shrinkage/<factor>``,
    ``shrinkage/<factor>_min``, ``shrinkage/<factor>_max``), and per layer
    (``shrinkage/<layer>/<factor>``) with ``per_layer=True``, to the logger and to the
    visualizer's scalars (``vis_data/scalars.json``; ``tools/plot_shrinkage.py`` plots it).

    Layers compute factors only in the iterations that are logged, and the one host copy
    happens after that iteration's step, so other iterations run untouched.

    Also logged: ``nonfinite/batches``, the training batches so far whose statistics were
    not finite in some channel, summed over all robustbn norm layers (per layer as
    ``nonfinite/<layer>`` with ``per_layer=True``); those channels kept their running
    statistics. A warning names the layers when the count grew since the last log.
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, interval: int = 50, per_layer: bool = False) -> None:
        if interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval}')
        self.interval = interval
        self.per_layer = per_layer
        self._nonfinite_seen = 0

    @staticmethod
    def _layers(runner) -> Dict[str, JSBatchNorm]:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        return {name: m for name, m in model.named_modules() if isinstance(m, JSBatchNorm)}

    def _set_recording(self, runner, on: bool) -> None:
        for layer in self._layers(runner).values():
            layer.record_factors = on
            if on:
                layer.last_factors = None

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self.every_n_train_iters(runner, self.interval):
            self._set_recording(runner, True)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        layers = {n: m.last_factors for n, m in self._layers(runner).items()
                  if m.last_factors is not None}
        self._set_recording(runner, False)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        counted = {n: m.nonfinite_batches for n, m in model.named_modules()
                   if isinstance(m, ShrunkBatchNorm)}
        if not layers and not counted:
            return
        names = list(layers)
        flat = [layers[n].float() for n in names] + [c.float().view(1) for c in counted.values()]
        flat = torch.cat(flat).cpu().tolist()  # the one host copy
        table = [flat[3 * i:3 * i + 3] for i in range(len(names))]
        scalars = self.summarize(names, table, self.per_layer) if names else {}
        scalars.update(self.nonfinite(dict(zip(counted, flat[3 * len(names):])),
                                      self.per_layer))
        runner.visualizer.add_scalars(scalars, step=runner.iter + 1)
        if names:
            runner.logger.info('shrinkage (%d layers): ' % len(names) + ', '.join(
                f'{f} {scalars[f"shrinkage/{f}"]:.4f} [{scalars[f"shrinkage/{f}_min"]:.4f}, '
                f'{scalars[f"shrinkage/{f}_max"]:.4f}]' for f in FACTOR_NAMES))
        total = int(scalars['nonfinite/batches'])
        if total > self._nonfinite_seen:
            where = [n for n, c in zip(counted, flat[3 * len(names):]) if c > 0]
            runner.logger.warning(
                f'non-finite batch statistics: {total} layer-batches so far, in '
                f'{", ".join(where[:10])}{" ..." if len(where) > 10 else ""}; those channels '
                'kept their running statistics')
            self._nonfinite_seen = total

    @staticmethod
    def nonfinite(counts: Dict[str, float], per_layer: bool = False) -> Dict[str, float]:
        out = {'nonfinite/batches': float(sum(counts.values()))}
        if per_layer:
            out.update({f'nonfinite/{n}': c for n, c in counts.items()})
        return out

    @staticmethod
    def summarize(names: List[str], rows: List[List[float]], per_layer: bool = False,
                  prefix: Optional[str] = 'shrinkage') -> Dict[str, float]:
        out = {}
        for j, f in enumerate(FACTOR_NAMES):
            col = [r[j] for r in rows]
            out[f'{prefix}/{f}'] = sum(col) / len(col)
            out[f'{prefix}/{f}_min'] = min(col)
            out[f'{prefix}/{f}_max'] = max(col)
            if per_layer:
                out.update({f'{prefix}/{n}/{f}': c for n, c in zip(names, col)})
        return out
