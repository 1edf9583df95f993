"""Adversarial metrics next to the clean ones, after validation and at test."""
from __future__ import annotations

import numbers
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.utils import is_list_of

PREFIX = 'adv/'


def _is_scalar(value) -> bool:  # as RuntimeInfoHook decides what goes to update_scalar
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.size == 1 if isinstance(value, np.ndarray) else value.numel() == 1
    return isinstance(value, numbers.Number)


class AdversarialEvalHook(Hook):
    """After every ``interval``-th validation (``on_val``) and after testing (``on_test``),
    attack the validation/test data with each of ``attacks`` and evaluate the predictions
    on the attacked images with the run's own evaluator, as ``adv/<attack>/<metric>``
    (e.g. ``adv/PGD-10_eps8/mIoU``, ``adv/FGSM_eps8/accuracy/top1``). They go to the
    message hub next to the clean metrics, so LoggerHook logs them (and writes them to
    the test JSON); after validation they are also added to the metrics that the later
    hooks receive, so ``CheckpointHook(save_best='adv/...')`` can use them. The
    metrics of the latest run are in ``last_metrics``.

    Args:
        attacks: torchattacks classes by name and robustbn's ``CauchyNoise`` /
            ``GaussianNoise``, e.g. ``[dict(type='FGSM', eps=8), dict(type='PGD', eps=8,
            alpha=2, steps=10, random_start=True)]``; ``eps``, ``alpha``, ``std`` and
            ``sigma`` in pixel units of the raw 0-255 image; ``name`` sets the metric
            prefix (default e.g. ``PGD-10_eps8``). Checked when the hook is built, before
            any training (``check_attacks``): an argument the attack class does not take,
            a negative or non-finite eps/alpha/std/sigma or steps that is not an integer
            >= 1 raises a ValueError naming the attack and the argument.
        interval: attack after every ``interval``-th validation run.
        max_samples: attack the first ``max_samples`` samples only (None: all).
        seed: seeds the attacks' random draws, per sample (see
            ``robustbn.openmmlab.adversarial.rng``).
        on_val, on_test: when to run.
    """

    # After RuntimeInfoHook (VERY_HIGH), which puts the clean metrics into the message hub,
    # and before LoggerHook (BELOW_NORMAL), ParamSchedulerHook (LOW), CheckpointHook
    # (VERY_LOW) and EarlyStoppingHook (LOWEST), which read the metrics.
    priority = 'ABOVE_NORMAL'

    def __init__(self, attacks: List[dict], interval: int = 1, max_samples: Optional[int] = None,
                 seed: int = 0, on_val: bool = True, on_test: bool = True) -> None:
        from .attacks import check_attacks  # imports torchattacks only when used

        if not (isinstance(attacks, (list, tuple)) and is_list_of(list(attacks), dict)):
            raise ValueError('attacks must be a list of dicts, e.g. '
                             f"[dict(type='FGSM', eps=8)]; got {attacks!r}")
        self.attacks = [dict(a) for a in attacks]
        self.names = check_attacks(self.attacks)
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f'interval must be an integer >= 1, got {interval!r}')
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise ValueError(f'max_samples must be an integer >= 1 or None, got {max_samples!r}')
        self.interval, self.max_samples, self.seed = interval, max_samples, seed
        self.on_val, self.on_test = on_val, on_test
        self._val_runs = 0
        self.last_metrics: Dict[str, float] = {}

    def before_run(self, runner) -> None:
        """Fail early when save_best names adversarial metrics this hook will not provide
        at every validation."""
        for hook in runner.hooks:
            keys = getattr(hook, 'key_indicators', None) or []
            for key in (k for k in keys if isinstance(k, str) and k.startswith(PREFIX)):
                attack = key[len(PREFIX):].split('/', 1)[0]
                if attack not in self.names:
                    raise ValueError(f"save_best={key!r} names attack {attack!r}; "
                                     f'AdversarialEvalHook attacks: {self.names}')
                if not self.on_val or self.interval != 1:
                    raise ValueError(f'save_best={key!r} needs adversarial metrics after every '
                                     'validation: AdversarialEvalHook(on_val=True, interval=1)')

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        if not self.on_val:
            return
        self._val_runs += 1
        if self._val_runs % self.interval == 0:
            adv = self._evaluate(runner, runner.val_loop, 'val')
            if metrics is not None:  # the dict CheckpointHook & co. receive after this hook
                metrics.update(adv)

    def after_test_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        # Logged, but runner.test() keeps returning the evaluator's own metrics.
        if self.on_test:
            self._evaluate(runner, runner.test_loop, 'test')

    def _evaluate(self, runner, loop, mode: str) -> Dict[str, float]:
        from .evaluate import evaluate_attacks

        start = time.perf_counter()
        timings: Dict[str, float] = {}
        adv = evaluate_attacks(runner.model, loop.dataloader, loop.evaluator, self.attacks,
                               self.max_samples, self.seed, timings=timings)
        for key, value in adv.items():  # as RuntimeInfoHook did for the clean metrics
            if _is_scalar(value):
                runner.message_hub.update_scalar(f'{mode}/{key}', value)
            else:
                runner.message_hub.update_info(f'{mode}/{key}', value)
        runner.logger.info(
            f'adversarial {mode} ({time.perf_counter() - start:.1f} s: '
            + ', '.join(f'{n} {t:.1f} s' for n, t in timings.items()) + '): '
            + ', '.join(f'{k} {float(v):.4f}' for k, v in adv.items() if _is_scalar(v)))
        self.last_metrics = adv
        return adv
