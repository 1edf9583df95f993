"""How close are the built-in estimators' batch statistics to the true ones?

Model mode (a trained checkpoint)::

    python tools/analyze_estimators.py CONFIG CHECKPOINT [--batch-sizes 2 4 8 16 32 64 128]
        [--draws R] [--conditions clean gaussian cauchy fgsm pgd] [--max-samples N]
        [--out-dir DIR] [--plot PNG]

The model runs in eval mode (its norm layers normalize with their running statistics, so
a layer's input does not depend on the estimator or on the other images of a batch) over
the test set of CONFIG (or its first ``--max-samples`` images), once per condition: clean
images, Gaussian and Cauchy pixel noise (robustbn's GaussianNoise/CauchyNoise), FGSM and
PGD images crafted against the same model (the adversarial package's attacks; ``--sigma``
and ``--eps`` in 0-255 pixel units). Forward hooks reduce the input of every BN-like layer
(any torch ``_BatchNorm``: BatchNorm*, SyncBatchNorm, JSBN*, SyncJSBN, GpreBN*) to each
image's per-channel count, mean and sum of squared deviations in float64, at once, so no
activation is kept (moments are streamed, no spatial position is dropped). Memory bound:
16 bytes x images x (channels summed over the BN-like layers) -- 276 kB per image for
HRNet-W18's 306 layers (17 238 channels), whatever the image size -- plus one forward
pass of a test batch and a float64 copy of the largest single layer input.

The population statistics of a layer (the truth) merge all images' moments exactly
(Chan et al.). A random batch of B images (``--draws`` per B, seeded) merges its images'
moments to the batch mean and biased variance over its count values per channel, which is
exactly what the layer would see in a training-mode forward pass of those B images (eval
mode makes each image's layer input independent of the rest of the batch). Every built-in
estimator (``robustbn.ESTIMATORS[name](mean, var, count)``) turns them into the statistics
it would use; per layer and draw the tool records

- ``mean``: MSE of the used means against the population means (averaged over channels),
- ``var`` and ``logvar``: the same for the variances and the log variances,
- ``output``: mean squared difference, per element of the batch's layer input, between
  normalizing with the estimate and with the population statistics
  (``(x - mu) / sqrt(var + eps)``, no affine), computed exactly from the batch moments.

Reported: each error's mean over draws as a ratio to that of the sample estimator
(``'none'``; < 1: the estimator is closer to the truth), per layer and aggregated over
layers (geometric mean of the per-layer ratios), with a bootstrap 95 % interval over
draws (paired, ``--bootstrap`` resamples). Files: ``OUT/results.json``, ``OUT/results.md``
and the plot (``OUT/estimators.png`` or ``--plot``).

With ``--truth clean`` the truth of every condition is the clean images' population (how
close a perturbed batch's estimate stays to the clean statistics) instead of the
population of that condition's images.

Layers that use batch statistics in eval mode (GpreBN, ``eval_stats='batch'``,
``track_running_stats=False``) make a layer input depend on its batch: their moments are
taken from the test loader's batches, and the results record a warning.

Simulation mode (no model; the setting of the James-Stein theorems)::

    python tools/analyze_estimators.py --simulate [--channels 4 16 64 256]
        [--counts 4 16 64] [--draws R] [--noises gaussian student_t3 uniform]
        [--adv-fractions 0 0.1] [--out-dir DIR] [--plot PNG]

C channels with known means (around 0 or around a common offset, ``--spreads``) and
log-normal variances; N values per channel with Gaussian, heavy-tailed (Student t, 3
degrees of freedom) or bounded sub-Gaussian (uniform) noise of unit variance; optionally a
fraction of each channel's values (each value with probability ``--adv-fractions``)
shifted by ``--adv-shift`` standard deviations, all the same way (an adversary; the truth
stays the clean distribution's). Scenarios are paired: the same C uses the same standard
normal draws for its true means and variances, the same N the same random stream. Same
MSE ratios against the truth.

Everything is seeded (``--seed``) and deterministic; it runs on CPU or GPU (``--device``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
METRICS = ('mean', 'var', 'logvar', 'output')
METRIC_TITLES = {'mean': 'MSE of the means', 'var': 'MSE of the variances',
                 'logvar': 'MSE of the log variances',
                 'output': 'MSE of the normalized output'}
CONDITIONS = ('clean', 'gaussian', 'cauchy', 'fgsm', 'pgd')
NOISES = ('gaussian', 'student_t3', 'uniform')
TINY = torch.finfo(torch.float64).tiny


class ToolError(Exception):
    """A bad argument, config or checkpoint: reported as ``error: ...`` (exit status 2)."""


def builtin_estimators() -> List[str]:
    from robustbn.estimators import ESTIMATORS
    names = ['none', 'paper', 'paper_mean', 'wacv', 'classic']
    return [n for n in names if n in ESTIMATORS]


def progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


# ----------------------------------------------------------------------------- moments
def merge_moments(count: Tensor, mean: Tensor, m2: Tensor):
    """Merge per-part moments along dim 0: counts (P, ...) or (P,), means and sums of
    squared deviations (P, C) -> (total count, mean (C), m2 (C)); exact in float64."""
    count = count.to(mean.dtype)
    while count.dim() < mean.dim():
        count = count.unsqueeze(-1)
    total = count.sum(0)
    mu = (count * mean).sum(0) / total
    return total, mu, m2.sum(0) + (count * (mean - mu).square()).sum(0)


def image_moments(x: Tensor):
    """Per image (dim 0), per channel (dim 1): count, mean and sum of squared deviations
    of ``x`` in float64."""
    x = x.detach().to(torch.float64)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    mean = x.mean(2)
    m2 = (x - mean.unsqueeze(2)).square().sum(2)
    return torch.full((x.shape[0],), x.shape[2], dtype=torch.float64, device=x.device), mean, m2


def batch_stat_layers(model: nn.Module) -> List[str]:
    """BN-like layers whose eval-mode output uses the batch's statistics."""
    from robustbn.gprebn import GpreBatchNorm
    out = []
    for name, m in bn_layers(model).items():
        if isinstance(m, GpreBatchNorm) or getattr(m, 'eval_stats', 'running') == 'batch' \
                or not m.track_running_stats:
            out.append(name)
    return out


def bn_layers(model: nn.Module) -> Dict[str, nn.Module]:
    from torch.nn.modules.batchnorm import _BatchNorm
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


class MomentRecorder:
    """Forward pre-hooks on every BN-like layer: each call appends the per-image moments of
    the layer's input (``image_moments``); ``take()`` returns and clears them."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = bn_layers(model)
        if not self.layers:
            raise ToolError('the model has no BN-like layer (torch _BatchNorm subclass)')
        self.parts: Dict[str, list] = {n: [] for n in self.layers}
        self.active = True  # off while an attack runs the model
        self.handles = [m.register_forward_pre_hook(self._hook(n))
                        for n, m in self.layers.items()]

    def _hook(self, name):
        def hook(module, args):
            if self.active:
                self.parts[name].append(image_moments(args[0]))
        return hook

    def take(self) -> Dict[str, tuple]:
        out = {}
        for name, parts in self.parts.items():
            if len(parts) != 1:
                raise ToolError(f'layer {name} ran {len(parts)} times in one forward pass; '
                                'layers called more than once are not supported')
            out[name] = parts[0]
            parts.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------- errors
def normalize_error(m, v, n, mu, var, mu_p, var_p, eps: float) -> Tensor:
    """Mean over the batch's elements of ((x - mu)/s - (x - mu_p)/s_p)^2 for values x with
    per-channel mean m, biased variance v (any count n per channel): with a = 1/s - 1/s_p
    and b = mu_p/s_p - mu/s, sum_i (a x_i + b)^2 = n (a^2 v + (a m + b)^2)."""
    s, s_p = (var + eps).sqrt(), (var_p + eps).sqrt()
    a = 1 / s - 1 / s_p
    b = mu_p / s_p - mu / s
    return (a.square() * v + (a * m + b).square()).mean(-1)


def draw_errors(m: Tensor, v: Tensor, n, mu_p: Tensor, var_p: Tensor, eps: float,
                estimators: Sequence[str]) -> Tensor:
    """(E, 4, R) errors (METRICS order) of every estimator on R draws of batch statistics
    ``m``, ``v`` (R, C), ``n`` values per channel, against the truth ``mu_p``, ``var_p``."""
    from robustbn.estimators import ESTIMATORS
    out = []
    for name in estimators:
        spec = ESTIMATORS[name]
        mu, var = apply_estimator(spec, m, v, n)
        err = [(mu - mu_p).square().mean(-1), (var - var_p).square().mean(-1),
               (var.clamp_min(TINY).log() - var_p.clamp_min(TINY).log()).square().mean(-1),
               normalize_error(m, v, n, mu, var, mu_p, var_p, eps)]
        out.append(torch.stack(err))
    return torch.stack(out)


def apply_estimator(spec, m: Tensor, v: Tensor, n):
    """``spec`` on each row of (R, C) statistics (vmap, or a loop where vmap fails)."""
    try:
        return torch.vmap(lambda a, b: spec(a, b, n))(m, v)
    except Exception:  # an estimator with an op vmap lacks
        rows = [spec(a, b, n) for a, b in zip(m, v)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def ratio_summary(err: Tensor, estimators: Sequence[str], bootstrap: int,
                  gen: torch.Generator) -> dict:
    """err (E, L, 4, R) -> per-layer and aggregated (geometric mean over layers) ratios of
    mean error to 'none''s, with bootstrap 95 % intervals over the R draws (paired)."""
    err = err.cpu()
    ref = estimators.index('none')
    r = err.shape[-1]

    def ratios(mean):  # (..., E, L, 4) mean errors -> ratios to 'none'
        base = mean.select(-3, ref).unsqueeze(-3)
        same = mean == base  # 'none' itself, and 0/0
        return torch.where(same, torch.ones_like(mean), mean / base)

    point = ratios(err.mean(-1))
    agg = point.clamp_min(TINY).log().mean(-2).exp()
    # bootstrap: resample the draws (K times R indices) as weights, one matmul
    idx = torch.randint(0, r, (bootstrap, r), generator=gen)
    weights = torch.zeros(bootstrap, r, dtype=err.dtype).scatter_add_(
        1, idx, torch.ones(bootstrap, r, dtype=err.dtype)) / r
    boot = ratios((err @ weights.T).movedim(-1, 0))  # (K, E, L, 4)
    q = torch.tensor([0.025, 0.975], dtype=err.dtype)
    return dict(point=point, agg=agg, ci_layer=boot.quantile(q, dim=0),
                ci_agg=boot.clamp_min(TINY).log().mean(-2).exp().quantile(q, dim=0),
                mse=err.mean(-1))


# ----------------------------------------------------------------------------- model mode
def load_model(config: str, checkpoint: str, device: torch.device, cfg_options=None):
    """(cfg, model in eval mode on ``device``) as tools/test.py builds it."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    import robustbn  # noqa: F401  (registers everything)

    if not Path(config).is_file():
        raise ToolError(f'config {config!r} does not exist')
    try:
        cfg = Config.fromfile(config)
    except Exception as e:
        raise ToolError(f'cannot load config {config!r}: {type(e).__name__}: {e}') from None
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'model' not in cfg or 'test_dataloader' not in cfg:
        raise ToolError(f'config {config!r} needs a model and a test_dataloader')
    if not Path(checkpoint).is_file():
        raise ToolError(f'checkpoint {checkpoint!r} does not exist (train one with '
                        f'`make demo` or tools/train.py {config})')
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    try:
        model = MODELS.build(cfg.model)
    except Exception as e:
        raise ToolError(f'cannot build the model of {config!r}: {type(e).__name__}: {e}') \
            from None
    try:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                        logger='silent')
    except Exception as e:
        raise ToolError(f'cannot load checkpoint {checkpoint!r} into the model of '
                        f'{config!r}: {type(e).__name__}: {e}') from None
    return cfg, model.to(device).eval()


def load_batches(cfg, max_samples: Optional[int]) -> List[dict]:
    """The test loader's batches (raw images and data samples), up to ``max_samples``
    images."""
    from mmengine.runner import Runner
    loader = Runner.build_dataloader(cfg.test_dataloader, seed=0)
    batches, total = [], 0
    for data in loader:
        data = dict(data)
        size = len(data['data_samples'])
        if max_samples is not None and total + size > max_samples:
            keep = max_samples - total
            if keep <= 0:
                break
            data['inputs'] = data['inputs'][:keep]
            data['data_samples'] = data['data_samples'][:keep]
            size = keep
        batches.append(data)
        total += size
        if max_samples is not None and total >= max_samples:
            break
    if not batches:
        raise ToolError('the test set is empty')
    return batches


def condition_attack(name: str, args) -> Optional[dict]:
    return {'clean': None,
            'gaussian': dict(type='GaussianNoise', sigma=args.sigma, name='gaussian'),
            'cauchy': dict(type='CauchyNoise', sigma=args.sigma, name='cauchy'),
            'fgsm': dict(type='FGSM', eps=args.eps, name='fgsm'),
            'pgd': dict(type='PGD', eps=args.eps, alpha=args.pgd_alpha, steps=args.pgd_steps,
                        random_start=True, name='pgd')}[name]


@torch.no_grad()
def capture(model: nn.Module, batches: List[dict], attack_cfg: Optional[dict], seed: int,
            bar=None) -> Dict[str, tuple]:
    """Per-image moments (count (N,), mean (N, C), m2 (N, C)) of every BN-like layer's
    input over ``batches``, under ``attack_cfg`` (None: clean images)."""
    from robustbn.openmmlab.adversarial.attacks import AttackedModel, build_attack, perturb
    rec = MomentRecorder(model)
    parts: Dict[str, list] = {n: [] for n in rec.layers}
    try:
        if attack_cfg is not None:
            wrapper = AttackedModel(model)
            tag, attack = build_attack(attack_cfg, wrapper)
        for data in batches:
            data = dict(data)
            if attack_cfg is not None:
                rec.active = False
                data['inputs'] = perturb(wrapper, attack, tag, data, seed=seed)
                rec.active = True
            out = model.data_preprocessor(dict(data), False)
            model(out['inputs'], out['data_samples'], mode='tensor')
            for name, mom in rec.take().items():
                parts[name].append(mom)
            if bar is not None:
                bar.update(1)
    finally:
        rec.remove()
    return {n: tuple(torch.cat(p) for p in zip(*ps)) for n, ps in parts.items()}


def population(moments: Dict[str, tuple]) -> Dict[str, tuple]:
    """Per layer: (count, mean, biased variance) over all images (float64)."""
    out = {}
    for name, (count, mean, m2) in moments.items():
        n, mu, s = merge_moments(count, mean, m2)
        out[name] = (n, mu, s / n)
    return out


def check_batch_sizes(sizes: Sequence[int], images: int) -> List[int]:
    bad = [b for b in sizes if not isinstance(b, int) or b < 2 or b > images]
    if bad or not sizes:
        raise ToolError(f'batch sizes must be integers from 2 to the number of images '
                        f'({images}); got {list(sizes)}')
    return sorted(set(sizes))


def model_errors(moments, pop, eps: Dict[str, float], sizes, draws: int,
                 estimators, seed: int, bar=None) -> Dict[int, Tensor]:
    """{B: (E, L, 4, R) errors} of ``draws`` random batches of B images per size."""
    names = list(moments)
    images = moments[names[0]][0].shape[0]
    out = {}
    for b in sizes:
        gen = torch.Generator().manual_seed(seed * 1000003 + b)
        idx = torch.stack([torch.randperm(images, generator=gen)[:b] for _ in range(draws)])
        per_layer = []
        for name in names:
            count, mean, m2 = moments[name]
            i = idx.to(mean.device)
            # (R, B, ...) -> merge over B: move B to the front
            n, m, s = merge_moments(count[i].T, mean[i].transpose(0, 1),
                                    m2[i].transpose(0, 1))
            v = s / n
            _, mu_p, var_p = pop[name]
            nval = float(n[0])  # every draw of one size has the same count per channel
            if not bool((n == n[0]).all()):
                raise ToolError(f'layer {name}: images of different sizes; use equal sizes')
            per_layer.append(draw_errors(m, v, nval, mu_p, var_p, eps[name], estimators))
            if bar is not None:
                bar.update(1)
        out[b] = torch.stack(per_layer, 1)  # (E, L, 4, R)
    return out


def run_model(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    conditions = list(dict.fromkeys(args.conditions))
    if args.truth == 'clean':
        if 'clean' not in conditions:
            raise ToolError('--truth clean needs the clean condition in --conditions')
        conditions = ['clean'] + [c for c in conditions if c != 'clean']
    cfg, model = load_model(args.config, args.checkpoint, device, args.cfg_options)
    estimators = builtin_estimators()
    batches = load_batches(cfg, args.max_samples)
    images = sum(len(d['data_samples']) for d in batches)
    sizes = check_batch_sizes(args.batch_sizes, images)
    layers = bn_layers(model)
    eps = {n: float(m.eps) for n, m in layers.items()}
    warnings = []
    dependent = batch_stat_layers(model)
    if dependent:
        warnings.append('layers using batch statistics in eval mode (moments taken from the '
                        f'test loader batches): {", ".join(dependent)}')
    results = dict(mode='model', config=args.config, checkpoint=args.checkpoint,
                   images=images, batch_sizes=sizes, draws=args.draws,
                   bootstrap=args.bootstrap, seed=args.seed, estimators=estimators,
                   truth=args.truth, metrics=list(METRICS), layers={n: dict(type=type(m).__name__,
                                                          channels=m.num_features)
                                                  for n, m in layers.items()},
                   attacks={c: condition_attack(c, args) for c in conditions},
                   warnings=warnings, conditions={}, environment=environment(device))
    total = len(conditions) * (len(batches) + len(sizes) * len(layers))
    bar = progress(total, 'analyze', not args.no_progress)
    pops = {}
    start = time.time()
    for cond in conditions:
        bar.set_description(f'{cond}: capture')
        moments = capture(model, batches, condition_attack(cond, args), args.seed, bar)
        pops[cond] = population(moments)
        truth = pops['clean'] if args.truth == 'clean' else pops[cond]
        bar.set_description(f'{cond}: draws')
        errs = model_errors(moments, truth, eps, sizes, args.draws, estimators, args.seed,
                            bar)
        gen = torch.Generator().manual_seed(args.seed)
        res = {}
        for b, err in errs.items():
            s = ratio_summary(err, estimators, args.bootstrap, gen)
            res[str(b)] = summary_json(s, estimators, list(layers))
        results['conditions'][cond] = res
    bar.close()
    results['seconds'] = round(time.time() - start, 1)
    return results


def summary_json(s: dict, estimators, layers) -> dict:
    def r6(x):
        return float(f'{float(x):.6g}')

    out = {}
    for e, est in enumerate(estimators):
        out[est] = dict(
            ratio={m: r6(s['agg'][e, k]) for k, m in enumerate(METRICS)},
            ci={m: [r6(s['ci_agg'][0][e, k]), r6(s['ci_agg'][1][e, k])]
                for k, m in enumerate(METRICS)},
            layers={name: dict(
                ratio={m: r6(s['point'][e, li, k]) for k, m in enumerate(METRICS)},
                ci={m: [r6(s['ci_layer'][0][e, li, k]), r6(s['ci_layer'][1][e, li, k])]
                    for k, m in enumerate(METRICS)},
                mse={m: r6(s['mse'][e, li, k]) for k, m in enumerate(METRICS)})
                for li, name in enumerate(layers)})
    return out


# ----------------------------------------------------------------------------- simulation
def sample_noise(kind: str, shape, gen: torch.Generator, dtype, device) -> Tensor:
    """Unit-variance noise: Gaussian, Student t (3 dof, heavy tails) or uniform."""
    if kind == 'gaussian':
        return torch.randn(shape, generator=gen, dtype=dtype).to(device)
    if kind == 'student_t3':
        z = torch.randn(shape, generator=gen, dtype=dtype)
        chi2 = torch.randn((3, ) + tuple(shape), generator=gen, dtype=dtype).square().sum(0)
        return (z / (chi2 / 3).sqrt() / math.sqrt(3)).to(device)
    if kind == 'uniform':
        return ((torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1)
                * math.sqrt(3)).to(device)
    raise ToolError(f'unknown noise {kind!r}; valid: {", ".join(NOISES)}')


def simulate_cell(channels: int, count: int, draws: int, noise: str, offset: float,
                  spread: float, adv_fraction: float, adv_shift: float, var_spread: float,
                  seed: int, estimators, device) -> dict:
    """Errors (E, 4, R) of the estimators on ``draws`` samples of C channels x N values,
    and the truth (means, variances). The truth's standardized draws come from ``seed``
    alone and the noise from ``seed`` and N, so cells that differ only in the mean layout,
    the noise kind or the adversary are paired (same truth draws, same random stream)."""
    dt = torch.float64
    gen = torch.Generator().manual_seed(seed)
    z_mu = torch.randn(channels, generator=gen, dtype=dt)
    z_var = torch.randn(channels, generator=gen, dtype=dt)
    mu, var = offset + spread * z_mu, (var_spread * z_var).exp()
    gen = torch.Generator().manual_seed(seed * 1009 + count)
    x = mu[:, None] + var.sqrt()[:, None] * sample_noise(noise, (draws, channels, count),
                                                          gen, dt, 'cpu')
    if adv_fraction:  # each value shifted with probability adv_fraction, all the same way
        hit = torch.rand((draws, channels, count), generator=gen, dtype=dt) < adv_fraction
        x = x + hit * (adv_shift * var.sqrt()[:, None])
    x = x.to(device)
    m, v = x.mean(-1), x.var(-1, unbiased=False)
    mu, var = mu.to(device), var.to(device)
    return dict(err=draw_errors(m, v, float(count), mu, var, 0.0, estimators),
                mu=mu, var=var)


def scenarios(args) -> List[dict]:
    out = []
    for noise in args.noises:
        for adv in args.adv_fractions:
            for offset in args.offsets:
                for spread in args.spreads:
                    out.append(dict(noise=noise, adv_fraction=adv, offset=offset,
                                    spread=spread))
    return out


def scenario_name(s: dict) -> str:
    adv = f', adv {s["adv_fraction"]:g}' if s['adv_fraction'] else ''
    return f'{s["noise"]}{adv}, means {s["offset"]:g} +- {s["spread"]:g}'


def run_simulation(args) -> dict:
    device = torch.device(args.device)
    estimators = builtin_estimators()
    bad = [c for c in args.channels if c < 1] + [n for n in args.counts if n < 2]
    if bad or args.draws < 2:
        raise ToolError('--channels must be >= 1, --counts >= 2 and --draws >= 2')
    for noise in args.noises:
        if noise not in NOISES:
            raise ToolError(f'unknown noise {noise!r}; valid: {", ".join(NOISES)}')
    scs = scenarios(args)
    results = dict(mode='simulate', channels=args.channels, counts=args.counts,
                   draws=args.draws, bootstrap=args.bootstrap, seed=args.seed,
                   estimators=estimators, metrics=list(METRICS), adv_shift=args.adv_shift,
                   var_spread=args.var_spread, scenarios=[], environment=environment(device))
    bar = progress(len(scs) * len(args.channels) * len(args.counts), 'simulate',
                   not args.no_progress)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for sc in scs:
        cells = []
        for ci, c in enumerate(args.channels):
            for n in args.counts:
                seed = args.seed * 7919 + ci  # paired across scenarios (simulate_cell)
                cell = simulate_cell(c, n, args.draws, sc['noise'], sc['offset'],
                                     sc['spread'], sc['adv_fraction'], args.adv_shift,
                                     args.var_spread, seed, estimators, device)
                s = ratio_summary(cell['err'][:, None], estimators, args.bootstrap, gen)
                summ = summary_json(s, estimators, ['all'])
                cells.append(dict(channels=c, count=n, estimators={
                    e: dict(ratio=v['ratio'], ci=v['ci'], mse=v['layers']['all']['mse'])
                    for e, v in summ.items()}))
                bar.update(1)
        results['scenarios'].append(dict(sc, name=scenario_name(sc), cells=cells))
    bar.close()
    results['seconds'] = round(time.time() - start, 1)
    return results


# ----------------------------------------------------------------------------- reports
def environment(device: torch.device) -> dict:
    import platform
    env = dict(python=platform.python_version(), torch=torch.__version__,
               device=str(device), cpu_count=os.cpu_count(),
               threads=torch.get_num_threads())
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
    return env


def _fmt_ratio(r, ci) -> str:
    return f'{r:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]'


def markdown(results: dict) -> str:
    ests = [e for e in results['estimators'] if e != 'none']
    lines = []
    if results['mode'] == 'model':
        lines += [f'Model: `{results["config"]}`, checkpoint `{results["checkpoint"]}`, '
                  f'{results["images"]} images, {len(results["layers"])} BN-like layers, '
                  f'{results["draws"]} draws per batch size.', '',
                  'Error of each estimator / error of the sample statistics (`none`), '
                  'geometric mean over layers, bootstrap 95 % interval; < 1: closer to '
                  'the population statistics.', '']
        for metric in METRICS:
            lines += [f'**{METRIC_TITLES[metric]}**', '',
                      '| condition | B | ' + ' | '.join(ests) + ' |',
                      '|---|---:|' + '---:|' * len(ests)]
            for cond, res in results['conditions'].items():
                for b, row in res.items():
                    lines.append(f'| {cond} | {b} | ' + ' | '.join(
                        _fmt_ratio(row[e]['ratio'][metric], row[e]['ci'][metric])
                        for e in ests) + ' |')
            lines.append('')
        for w in results['warnings']:
            lines.append(f'Warning: {w}')
    else:
        lines += [f'Simulation: {results["draws"]} draws per cell; ratio of MSE to the '
                  'sample statistics\' (`none`), bootstrap 95 % interval.', '']
        for metric in ('mean', 'logvar'):
            lines += [f'**{METRIC_TITLES[metric]}**', '',
                      '| scenario | C | N | none MSE | ' + ' | '.join(ests) + ' |',
                      '|---|---:|---:|---:|' + '---:|' * len(ests)]
            for sc in results['scenarios']:
                for cell in sc['cells']:
                    e = cell['estimators']
                    lines.append(f'| {sc["name"]} | {cell["channels"]} | {cell["count"]} | '
                                 f'{e["none"]["mse"][metric]:.4g} | ' + ' | '.join(
                                     _fmt_ratio(e[x]['ratio'][metric], e[x]['ci'][metric])
                                     for x in ests) + ' |')
            lines.append('')
    env = results['environment']
    lines.append(f'python {env["python"]}, torch {env["torch"]}, device {env["device"]}, '
                 f'{env["cpu_count"]} CPUs, {results["seconds"]} s.')
    return '\n'.join(lines) + '\n'


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ests = [e for e in results['estimators'] if e != 'none']
    if results['mode'] == 'model':
        conds = list(results['conditions'])
        fig, axes = plt.subplots(len(METRICS), len(conds), squeeze=False,
                                 figsize=(3.2 * len(conds), 2.6 * len(METRICS)),
                                 sharex=True)
        for j, cond in enumerate(conds):
            res = results['conditions'][cond]
            sizes = [int(b) for b in res]
            for i, metric in enumerate(METRICS):
                ax = axes[i, j]
                for e in ests:
                    y = [res[str(b)][e]['ratio'][metric] for b in sizes]
                    lo = [res[str(b)][e]['ci'][metric][0] for b in sizes]
                    hi = [res[str(b)][e]['ci'][metric][1] for b in sizes]
                    ax.plot(sizes, y, marker='o', ms=3, label=e)
                    ax.fill_between(sizes, lo, hi, alpha=0.2)
                ax.axhline(1, color='k', lw=0.8, ls='--')
                ax.set_xscale('log', base=2)
                ax.set_yscale('log')
                if i == 0:
                    ax.set_title(cond)
                if j == 0:
                    ax.set_ylabel(f'{metric} MSE / none')
                if i == len(METRICS) - 1:
                    ax.set_xlabel('batch size')
        name = Path(results['checkpoint']).parent.name or Path(results['config']).stem
        fig.suptitle(f'{name}: estimator error relative to the sample statistics')
    else:
        scs = results['scenarios']
        noises = list(dict.fromkeys(sc['noise'] for sc in scs))
        layouts = list(dict.fromkeys((sc['offset'], sc['spread']) for sc in scs))
        rows = [(nz, metric) for nz in noises for metric in ('mean', 'logvar')]
        fig, axes = plt.subplots(len(rows), len(layouts), squeeze=False, sharex=True,
                                 figsize=(3.2 * len(layouts), 2.3 * len(rows)))
        c_plot = results['channels'][min(2, len(results['channels']) - 1)]
        colors = {e: f'C{i}' for i, e in enumerate(ests)}
        for sc in scs:
            j = layouts.index((sc['offset'], sc['spread']))
            cells = [c for c in sc['cells'] if c['channels'] == c_plot]
            ns = [c['count'] for c in cells]
            for metric in ('mean', 'logvar'):
                ax = axes[rows.index((sc['noise'], metric)), j]
                for e in ests:
                    ax.plot(ns, [c['estimators'][e]['ratio'][metric] for c in cells],
                            marker='o', ms=3, color=colors[e],
                            ls='--' if sc['adv_fraction'] else '-',
                            label=e + (f' (adv {sc["adv_fraction"]:g})'
                                       if sc['adv_fraction'] else ''))
                ax.axhline(1, color='k', lw=0.8, ls=':')
                ax.set_xscale('log', base=2)
                ax.set_yscale('log')
                ax.set_title(f'{sc["noise"]}, means {sc["offset"]:g} +- {sc["spread"]:g}',
                             fontsize=8)
                if j == 0:
                    ax.set_ylabel(f'{metric} MSE / none', fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel('N (values per channel)')
        fig.suptitle(f'simulation, C = {c_plot}: estimator MSE relative to the sample '
                     'statistics (dashed: adversarial shift)')
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(results: dict, out_dir: Path, plot_path: Optional[Path]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_path or out_dir / ('simulation.png' if results['mode'] == 'simulate'
                                  else 'estimators.png')
    results['files'] = dict(json=str(out_dir / 'results.json'),
                            markdown=str(out_dir / 'results.md'), plot=str(png))
    (out_dir / 'results.json').write_text(json.dumps(results, indent=1) + '\n')
    (out_dir / 'results.md').write_text(markdown(results))
    plot(results, png)
    return results['files']


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', nargs='?', help='model mode: the mmengine config')
    p.add_argument('checkpoint', nargs='?', help='model mode: the checkpoint (.pth)')
    p.add_argument('--simulate', action='store_true', help='simulation mode (no model)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[2, 4, 8, 16, 32, 64, 128])
    p.add_argument('--draws', type=int, default=None,
                   help='random batches per size (model; default 100) or samples per '
                        'cell (simulation; default 200)')
    p.add_argument('--conditions', nargs='+', default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument('--truth', choices=('condition', 'clean'), default='condition',
                   help='population statistics under the same condition (default) or of '
                        'the clean images')
    p.add_argument('--max-samples', type=int, default=None, help='first N test images')
    p.add_argument('--sigma', type=float, default=16.0,
                   help='Gaussian/Cauchy noise scale, 0-255 pixel units (default 16)')
    p.add_argument('--eps', type=float, default=7.65,
                   help='FGSM/PGD eps, 0-255 pixel units (default 7.65, the paper\'s 0.03)')
    p.add_argument('--pgd-alpha', type=float, default=1.0)
    p.add_argument('--pgd-steps', type=int, default=5)
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    p.add_argument('--channels', type=int, nargs='+', default=[4, 16, 64, 256])
    p.add_argument('--counts', type=int, nargs='+', default=[4, 16, 64])
    p.add_argument('--noises', nargs='+', default=list(NOISES))
    p.add_argument('--adv-fractions', type=float, nargs='+', default=[0.0, 0.1])
    p.add_argument('--adv-shift', type=float, default=3.0,
                   help='adversarial shift in standard deviations of the channel')
    p.add_argument('--offsets', type=float, nargs='+', default=[0.0, 3.0],
                   help='centre of the true means')
    p.add_argument('--spreads', type=float, nargs='+', default=[0.3, 2.0],
                   help='standard deviation of the true means around their centre')
    p.add_argument('--var-spread', type=float, default=0.5,
                   help='standard deviation of the log true variances')
    p.add_argument('--bootstrap', type=int, default=1000, help='bootstrap resamples')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--out-dir', type=Path, default=None,
                   help='default work_dirs/analyze_estimators/<config name or simulation>')
    p.add_argument('--plot', type=Path, default=None, help='the PNG (default OUT/*.png)')
    p.add_argument('--no-progress', action='store_true')
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.bootstrap < 1:
            raise ToolError('--bootstrap must be >= 1')
        if args.simulate:
            if args.config or args.checkpoint:
                raise ToolError('--simulate takes no config or checkpoint')
            args.draws = 200 if args.draws is None else args.draws
            results = run_simulation(args)
            name = 'simulation'
        else:
            if not (args.config and args.checkpoint):
                raise ToolError('give CONFIG and CHECKPOINT, or --simulate')
            args.draws = 100 if args.draws is None else args.draws
            if args.draws < 2:
                raise ToolError('--draws must be >= 2')
            if args.max_samples is not None and args.max_samples < 2:
                raise ToolError('--max-samples must be >= 2')
            results = run_model(args)
            name = Path(args.config).stem
        results['command'] = 'python tools/analyze_estimators.py ' + ' '.join(
            sys.argv[1:] if argv is None else argv)
        out_dir = args.out_dir or ROOT / 'work_dirs' / 'analyze_estimators' / name
        files = write_outputs(results, out_dir, args.plot)
    except ToolError as e:
        parser.error(str(e))
    print(markdown(results))
    print('wrote ' + ', '.join(files.values()))
    return results


if __name__ == '__main__':
    main()
