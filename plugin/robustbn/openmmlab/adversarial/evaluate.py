"""Evaluate a model's predictions on attacked data with a run's own evaluator."""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Dict, Optional, Sequence

import torch
from mmengine.dist import get_dist_info
from mmengine.model import is_model_wrapper

from .attacks import AttackedModel, build_attack, check_attacks, perturb


def fresh_evaluator(evaluator):
    """A copy of ``evaluator`` with no results that writes no files (format_only /
    output_dir would overwrite the clean predictions' files)."""
    ev = copy.deepcopy(evaluator)
    for metric in ev.metrics:
        metric.results = []
        if getattr(metric, 'output_dir', None) is not None:
            metric.output_dir = None
        if getattr(metric, 'format_only', False):
            metric.format_only = False
    return ev


def _take(batch: dict, n: int) -> dict:
    return {k: (v[:n] if isinstance(v, (list, tuple, torch.Tensor)) else v)
            for k, v in batch.items()}


def evaluate_attacks(model, dataloader, evaluator, attacks: Sequence[dict],
                     max_samples: Optional[int] = None, seed: int = 0,
                     progress: Optional[Callable[[int], None]] = None,
                     timings: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """Attack every batch of ``dataloader`` (the first ``max_samples`` samples of the
    sampler's order) with each of ``attacks`` and evaluate the model's predictions on the
    attacked images with a fresh copy of ``evaluator``: ``{'adv/<attack>/<metric>': v}``.

    Predictions are made as in testing (``model.test_step``, through the wrapper), the
    attack's gradients with the model unwrapped, in eval mode. Under distributed evaluation
    every rank attacks its shard and the evaluator collects the results in the sampler's
    order, as for clean metrics.
    ``progress(n)`` is called after each batch with its number of samples; ``timings``
    receives the seconds spent per attack.
    """
    names = check_attacks(attacks)
    net = model.module if is_model_wrapper(model) else model
    wrapper = AttackedModel(net)
    built = [build_attack(cfg, wrapper) for cfg in attacks]
    evaluators = {name: fresh_evaluator(evaluator) for name in names}
    spent = {name: 0.0 for name in names}

    size = len(dataloader.dataset)
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f'max_samples must be >= 1 or None, got {max_samples}')
        size = min(size, max_samples)
    # The sampler deals samples to ranks in turn and the evaluator re-interleaves them, so
    # the first ceil(size / world) of each rank are the first `size` overall.
    world = get_dist_info()[1]
    per_rank = math.ceil(size / world) if max_samples is not None else None

    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    # Iterating a DataLoader draws from torch's generator: leave the run's stream as it was.
    try:
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            done = 0
            for batch in dataloader:
                if per_rank is not None:
                    if done >= per_rank:
                        break
                    batch = _take(batch, per_rank - done)
                for name, attack in built:
                    start = time.perf_counter()
                    adv = dict(batch, inputs=perturb(wrapper, attack, name, batch, seed),
                               data_samples=copy.deepcopy(batch['data_samples']))
                    with torch.no_grad():  # the wrapper's test_step: DeepSpeed casts inputs
                        outputs = model.test_step(adv)
                    evaluators[name].process(data_samples=outputs, data_batch=adv)
                    spent[name] += time.perf_counter() - start
                done += len(batch['data_samples'])
                if progress is not None:
                    progress(len(batch['data_samples']))
    finally:
        net.train(was_training)
    if timings is not None:
        timings.update(spent)
    return {f'adv/{name}/{key}': value for name in names
            for key, value in evaluators[name].evaluate(size).items()}
