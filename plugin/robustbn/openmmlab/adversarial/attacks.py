"""Build torchattacks attacks on a model's raw 0-255 images, and run them on a batch.

Attack configs name torchattacks classes (``dict(type='PGD', eps=8, alpha=2, steps=10)``)
or robustbn's noise (``CauchyNoise``, ``GaussianNoise``); ``eps``, ``alpha``, ``std`` and
``sigma`` are in pixel units of the raw image (0-255) and divided by 255 for torchattacks,
whose images are in [0, 1]. Other arguments pass through unchanged. ``check_attacks``
validates configs before anything is built or trained: argument names against the
class's ``__init__``, sizes finite and >= 0, ``steps`` an integer >= 1.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
import numbers
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn
from torchattacks.attack import Attack

from .rng import PerSampleRNG, generators, sample_keys

PIXEL_KEYS = ('eps', 'alpha', 'std', 'sigma')
TORCH_IGNORE = -100  # nn.CrossEntropyLoss's default ignore_index, which torchattacks uses


class _PixelNoise(Attack):
    """Additive noise of scale ``sigma`` (images in [0, 1]), clamped to [0, 1]."""

    def __init__(self, model, sigma: float = 25 / 255) -> None:
        super().__init__(type(self).__name__, model)
        self.sigma = sigma
        self.supported_mode = ['default']

    def forward(self, images, labels=None):
        images = images.clone().detach().to(self.device)
        return torch.clamp(images + self.noise(images), 0, 1).detach()


class CauchyNoise(_PixelNoise):
    """The JS-BN paper's heavy-tailed noise: ``-sigma/sqrt(2) tan(pi U)``, U uniform in
    [1e-6, 1 - 1e-6] (a Cauchy of scale sigma/sqrt(2) with its extreme tail cut off)."""

    def noise(self, images):
        u = torch.rand_like(images).clamp_(1e-6, 1 - 1e-6)
        return -self.sigma / math.sqrt(2) * torch.tan(math.pi * u)


class GaussianNoise(_PixelNoise):
    """Gaussian noise of standard deviation ``sigma``."""

    def noise(self, images):
        return self.sigma * torch.randn_like(images)


NOISES = {cls.__name__: cls for cls in (CauchyNoise, GaussianNoise)}


def attack_class(type_name):
    if isinstance(type_name, type):
        cls = type_name
    else:
        cls = NOISES.get(type_name) or getattr(torchattacks, str(type_name), None)
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise ValueError(f'unknown attack type {type_name!r}: use a torchattacks class '
                         f'(FGSM, PGD, GN, ...) or one of {sorted(NOISES)}')
    return cls


def _fmt(v: float) -> str:
    return f'{round(float(v), 4):g}'


def attack_name(cfg: dict) -> str:
    """``cfg['name']``, or the type with its steps and pixel-unit sizes: 'FGSM_eps8',
    'PGD-10_eps8', 'CauchyNoise_sigma77'."""
    if cfg.get('name'):
        return str(cfg['name'])
    cls = attack_class(cfg.get('type'))
    params = inspect.signature(cls.__init__).parameters

    def value(key):  # the config's value, or the class default converted to pixels
        if key in cfg:
            return cfg[key]
        default = params[key].default if key in params else None
        return default * 255 if key in PIXEL_KEYS and default is not None else default

    name = cls.__name__ + (f'-{value("steps")}' if 'steps' in params else '')
    for key in ('eps', 'std', 'sigma'):
        if value(key) is not None:
            name += f'_{key}{_fmt(value(key))}'
    return name


HOOK_KEYS = ('type', 'name')  # read by the hook, not passed to the attack class
SIZE_KEYS = PIXEL_KEYS  # must be finite and >= 0
STEP_KEYS = ('steps', )  # must be integers >= 1


def attack_args(cls: type) -> Tuple[List[str], List[str], bool]:
    """The keyword arguments a config may give ``cls`` (its ``__init__`` less ``self`` and
    the model, which ``build_attack`` passes first): (accepted, required, takes **kwargs)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # less self
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if params and params[0].kind in positional:
        params = params[1:]  # the model
    named = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                             inspect.Parameter.KEYWORD_ONLY)]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return ([p.name for p in named], [p.name for p in named if p.default is p.empty], var_kw)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_attack(index: int, cfg) -> None:
    """Raise a ValueError naming the attack (index, type) and argument for what would fail
    or give meaningless numbers when the attack is built or run."""
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ValueError(f'attacks[{index}]: each attack must be a dict with a type, '
                         f'got {cfg!r}')
    try:
        cls = attack_class(cfg['type'])
    except ValueError as e:
        raise ValueError(f'attacks[{index}]: {e}') from None
    where = f'attacks[{index}] ({cls.__name__})'
    accepted, required, var_kw = attack_args(cls)
    args = [k for k in cfg if k not in HOOK_KEYS]
    unknown = [k for k in args if k not in accepted]
    if unknown and not var_kw:
        hint = difflib.get_close_matches(str(unknown[0]), accepted, n=1)
        raise ValueError(
            f'{where}: unknown argument {unknown[0]!r}'
            + (f' (did you mean {hint[0]!r}?)' if hint else '')
            + f'; {cls.__name__} takes {", ".join(accepted) or "no arguments"}'
            + f' (besides {", ".join(HOOK_KEYS)})')
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f'{where}: missing required argument {missing[0]!r}')
    name = cfg.get('name')
    if name is not None and not (isinstance(name, str) and name and '/' not in name):
        raise ValueError(f"{where}: name must be a non-empty string without '/' (it is "
                         f'the metric prefix adv/<name>/), got {name!r}')
    for key in SIZE_KEYS:
        v = cfg.get(key)
        if v is not None and not (_is_real(v) and math.isfinite(v) and v >= 0):
            raise ValueError(f'{where}: {key} must be a number >= 0 and finite (pixel '
                             f'units, 0-255), got {v!r}')
    for key in STEP_KEYS:
        v = cfg.get(key)
        if key in cfg and not (isinstance(v, numbers.Integral) and not isinstance(v, bool)
                               and v >= 1):
            raise ValueError(f'{where}: {key} must be an integer >= 1, got {v!r}')


def check_attacks(cfgs: Sequence[dict]) -> List[str]:
    """Validate attack configs without building them; returns their names.

    Each config's type must be a torchattacks class or CauchyNoise/GaussianNoise; its other
    keys (besides ``type`` and ``name``) arguments of that class's ``__init__``; ``eps``,
    ``alpha``, ``std`` and ``sigma`` finite numbers >= 0; ``steps`` an integer >= 1; and
    the names unique. Errors are ValueErrors naming the attack (``attacks[i] (TYPE)``) and
    the argument."""
    if isinstance(cfgs, dict) or not cfgs:
        raise ValueError('attacks must be a non-empty list of dicts, e.g. '
                         "[dict(type='FGSM', eps=8)]")
    names = []
    for index, cfg in enumerate(cfgs):
        _check_attack(index, cfg)
        names.append(attack_name(cfg))
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f'attack names must be unique, repeated: {sorted(dup)}; '
                         'give them a name=')
    return names


def build_attack(cfg: dict, model: 'AttackedModel') -> Tuple[str, Attack]:
    name = attack_name(cfg)
    kwargs = {k: (v / 255 if k in PIXEL_KEYS else v)
              for k, v in cfg.items() if k not in ('type', 'name')}
    try:
        return name, attack_class(cfg['type'])(model, **kwargs)
    except TypeError as e:
        raise ValueError(f'attack {cfg!r}: {e}') from None


def _is_segmentor(model) -> bool:
    return hasattr(model, 'decode_head') and hasattr(model, 'inference')


def _low_precision(model: nn.Module) -> Optional[torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype if p.dtype in (torch.bfloat16, torch.float16) else None
    return None


class AttackedModel(nn.Module):
    """``x`` in [0, 1] (raw image / 255, raw channel order) -> the logits the model predicts
    from: ``x * 255`` through the model's data preprocessor (BGR->RGB, mean/std, padding),
    then (N, K) logits of a classifier, or a segmentor's slide/whole inference logits
    cropped, unflipped and resized to each image's ``ori_shape`` (the label's size) as
    mmseg's ``postprocess_result`` does, (N, C, H, W).

    The model stays in eval mode: torchattacks calls ``eval()``/``train()`` on what it
    attacks and finds norm layers by class name ('BatchNorm'), which would miss the JS
    layers; here mode changes do nothing, so they keep their configured ``eval_stats``
    and no running statistics change.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = False
        self._samples, self._as_list = None, False

    def train(self, mode: bool = True) -> 'AttackedModel':
        return self

    def set_batch(self, data_samples, as_list: bool) -> None:
        # The preprocessor writes padding into the samples' metainfo: give it a copy.
        self._samples, self._as_list = copy.deepcopy(data_samples), as_list

    def forward(self, x: Tensor) -> Tensor:
        raw = x * 255  # exact inverse of raw / 255 for integer pixels (float32)
        data = self.model.data_preprocessor(
            dict(inputs=list(raw) if self._as_list else raw, data_samples=self._samples), False)
        inputs, samples = data['inputs'], data['data_samples']
        # A model whose parameters were cast to bf16/fp16 (DeepSpeed's bf16/fp16 modes)
        # takes inputs of that dtype, as its engine's inputs_to_half gives it; the attack
        # loss is computed on float32 logits.
        low = _low_precision(self.model)
        if low is not None:
            inputs = inputs.to(low)
        if _is_segmentor(self.model):
            logits = self._seg_logits(inputs, samples)
        else:
            logits = self.model(inputs, samples, mode='tensor')
        return logits.float()

    def _seg_logits(self, inputs: Tensor, samples) -> Tensor:
        metas = [dict(s.metainfo) for s in samples]  # slide inference writes into them
        logits = self.model.inference(inputs, metas)
        align = self.model.decode_head.align_corners
        out = []
        height, width = logits.shape[-2:]
        for i, meta in enumerate(s.metainfo for s in samples):
            left, right, top, bottom = meta.get('img_padding_size',
                                                meta.get('padding_size', [0] * 4))
            li = logits[i:i + 1, :, top:height - bottom, left:width - right]
            if meta.get('flip'):
                li = li.flip(dims=(3, ) if meta.get('flip_direction') == 'horizontal' else (2, ))
            out.append(F.interpolate(li, size=tuple(meta['ori_shape']), mode='bilinear',
                                     align_corners=align))
        if len({o.shape for o in out}) > 1:
            raise ValueError('adversarial evaluation of a segmentor needs equal ori_shape '
                             'within a batch')
        return torch.cat(out)


def attack_labels(model: nn.Module, samples, device) -> Tensor:
    """(N) class labels, or (N, H, W) segmentation labels with the decode head's ignore
    index mapped to -100, the ignore_index of torchattacks' CrossEntropyLoss."""
    if all('gt_sem_seg' in s for s in samples):
        shapes = {(tuple(s.gt_sem_seg.shape), tuple(s.metainfo['ori_shape'])) for s in samples}
        if len(shapes) > 1 or any(a != b for a, b in shapes):
            raise ValueError('segmentation labels must all have the ori_shape of their '
                             f'images (what predictions are resized to); got {shapes}')
        labels = torch.stack([s.gt_sem_seg.data.reshape(s.gt_sem_seg.shape)
                              for s in samples]).long()
        ignore = getattr(getattr(model, 'decode_head', None), 'ignore_index', 255)
        labels[labels == ignore] = TORCH_IGNORE
        return labels.to(device)
    if all('gt_label' in s for s in samples):
        labels = [torch.as_tensor(s.gt_label).reshape(-1) for s in samples]
        if any(x.numel() != 1 for x in labels):
            raise ValueError('adversarial evaluation needs one class label per image '
                             '(gt_label); multi-label samples are not supported')
        return torch.cat(labels).long().to(device)
    raise ValueError('adversarial evaluation needs labels: gt_label (classification) or '
                     'gt_sem_seg (segmentation) in every data sample')


def stack_raw(inputs) -> Tensor:
    """The batch's raw images as one (N, C, ...) tensor; checks they are 0-255 images."""
    if isinstance(inputs, (list, tuple)):
        if len({tuple(x.shape) for x in inputs}) > 1:
            raise ValueError('adversarial evaluation needs images of one size per batch, got '
                             f'{sorted({tuple(x.shape) for x in inputs})}')
        inputs = torch.stack(list(inputs))
    if not isinstance(inputs, Tensor):
        raise TypeError(f'inputs must be a tensor or a list of tensors, got {type(inputs)}')
    lo, hi = inputs.min().item(), inputs.max().item()
    if lo < 0 or hi > 255:
        raise ValueError('attacks work on raw 0-255 images (what the data preprocessor '
                         f'receives); these range over [{lo}, {hi}]')
    return inputs


def perturb(wrapper: AttackedModel, attack: Attack, tag: str, data_batch: dict,
            seed: int = 0, labels: Optional[Tensor] = None):
    """Adversarial raw images (float, in [0, 255]) for ``data_batch``, in the structure of
    its ``inputs`` (list or stacked). Random draws come from per-sample generators keyed by
    the image, ``tag`` (the attack's name) and ``seed``."""
    inputs, samples = data_batch['inputs'], data_batch['data_samples']
    as_list = isinstance(inputs, (list, tuple))
    raw = stack_raw(inputs)
    device = next(wrapper.parameters()).device
    if labels is None:
        labels = attack_labels(wrapper.model, samples, device)
    keys = sample_keys(raw, tag, seed)
    x = raw.to(device).float() / 255
    if (labels == TORCH_IGNORE).all():
        # Nothing to attack (a 0/0 loss would turn the images into NaN).
        adv = x
    else:
        wrapper.set_batch(samples, as_list)
        cuda = [device] if device.type == 'cuda' else []
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            # Draws that are not batch-shaped: the same for the same batch in every run.
            batch_seed = int(np.bitwise_xor.reduce(np.asarray(keys, dtype=np.uint64)))
            torch.default_generator.manual_seed(batch_seed)
            if cuda:
                torch.cuda.manual_seed(batch_seed)
            with PerSampleRNG(generators(keys, device)):
                adv = attack(x, labels)
    adv = adv.detach() * 255
    return list(adv) if as_list else adv
