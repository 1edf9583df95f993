"""Attack configs of AdversarialEvalHook and tools/adv_test.py are checked before any
training: an argument the attack class does not take, non-finite or negative sizes
(eps/alpha/std/sigma) and steps that are not integers >= 1 raise a ValueError naming the
attack (its index and type) and the argument when the hook is built, so a Runner config
fails at Runner.from_cfg; adv_test.py rejects --eps nan/inf on its command line.
"""
from __future__ import annotations

import math
import sys

import pytest

pytest.importorskip('torchattacks')

from helpers import ROOT, start, write_toy_cfg  # noqa: E402
from mmengine import Config  # noqa: E402
from mmengine.registry import HOOKS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import robustbn  # noqa: E402,F401  (registers AdversarialEvalHook)
from robustbn.openmmlab.adversarial import AdversarialEvalHook  # noqa: E402

NAN, INF = math.nan, math.inf

# (attacks, the attack named in the message, the argument named in it)
BAD = [
    ([dict(type='FGSM', epsilon=8)], r'attacks\[0\] \(FGSM\)', "'epsilon'"),
    ([dict(type='FGSM', eps=8), dict(type='PGD', eps=8, alpah=2, steps=3)],
     r'attacks\[1\] \(PGD\)', "'alpah'"),
    ([dict(type='CauchyNoise', std=25)], r'attacks\[0\] \(CauchyNoise\)', "'std'"),
    ([dict(type='GaussianNoise', sigma=25, eps=8)], r'attacks\[0\] \(GaussianNoise\)', "'eps'"),
    ([dict(type='VANILA', name='clean', eps=0)], r'attacks\[0\] \(VANILA\)', "'eps'"),
    ([dict(type='FGSM', eps=NAN)], r'attacks\[0\] \(FGSM\)', 'eps .*nan'),
    ([dict(type='PGD', eps=NAN, alpha=2, steps=3)], r'attacks\[0\] \(PGD\)', 'eps .*nan'),
    ([dict(type='FGSM', eps=INF)], r'attacks\[0\] \(FGSM\)', 'eps .*inf'),
    ([dict(type='FGSM', eps=8), dict(type='PGD', eps=8, alpha=-INF, steps=3)],
     r'attacks\[1\] \(PGD\)', 'alpha .*-inf'),
    ([dict(type='PGD', eps=8, alpha=NAN, steps=3)], r'attacks\[0\] \(PGD\)', 'alpha .*nan'),
    ([dict(type='PGD', eps=8, alpha=-2, steps=3)], r'attacks\[0\] \(PGD\)', 'alpha .*-2'),
    ([dict(type='GN', std=NAN)], r'attacks\[0\] \(GN\)', 'std .*nan'),
    ([dict(type='GN', std=-1)], r'attacks\[0\] \(GN\)', 'std .*-1'),
    ([dict(type='CauchyNoise', sigma=NAN)], r'attacks\[0\] \(CauchyNoise\)', 'sigma .*nan'),
    ([dict(type='GaussianNoise', sigma=INF)], r'attacks\[0\] \(GaussianNoise\)', 'sigma .*inf'),
    ([dict(type='FGSM', eps=8), dict(type='PGD', eps=8, alpha=2, steps=-3)],
     r'attacks\[1\] \(PGD\)', 'steps .*-3'),
    ([dict(type='PGD', eps=8, alpha=2, steps=0)], r'attacks\[0\] \(PGD\)', 'steps .*0'),
    ([dict(type='PGD', eps=8, alpha=2, steps=2.5)], r'attacks\[0\] \(PGD\)', 'steps .*2.5'),
]


@pytest.mark.parametrize('attacks,attack,arg', BAD,
                         ids=[f'{i}-{b[0][-1]["type"]}' for i, b in enumerate(BAD)])
def test_bad_attack_raises_at_hook_construction(attacks, attack, arg):
    with pytest.raises(ValueError, match=f'{attack}: .*{arg}'):
        AdversarialEvalHook(attacks=attacks)
    # as a config builds it (mmengine's registry prefixes the hook class, keeps the type)
    with pytest.raises(ValueError, match=f'{attack}: .*{arg}'):
        HOOKS.build(dict(type='AdversarialEvalHook', attacks=attacks))


def test_misspelt_argument_names_the_right_one():
    with pytest.raises(ValueError, match="unknown argument 'epsilon' \\(did you mean 'eps'"):
        AdversarialEvalHook(attacks=[dict(type='FGSM', epsilon=8)])


def test_good_configs_still_build():
    """The keys the hook reads itself (type, name) and pixel units keep working, for
    torchattacks classes and robustbn's noise; steps from numpy are integers too."""
    import numpy as np
    hook = AdversarialEvalHook(attacks=[
        dict(type='VANILA', name='clean'), dict(type='FGSM', eps=8),
        dict(type='PGD', eps=8, alpha=2, steps=np.int64(3), random_start=True),
        dict(type='GN', std=0), dict(type='CauchyNoise', sigma=40, name='cauchy'),
        dict(type='GaussianNoise', sigma=np.float32(25)), dict(type='FGSM', eps=0)])
    assert hook.names == ['clean', 'FGSM_eps8', 'PGD-3_eps8', 'GN_std0', 'cauchy',
                          'GaussianNoise_sigma25', 'FGSM_eps0']


def toy_runner_cfg(directory, attacks) -> Config:
    directory.mkdir()
    cfg = Config.fromfile(str(write_toy_cfg(directory)))
    cfg.work_dir = str(directory / 'work')
    cfg.experiment_name = f'attack_config_{directory.name}'  # one MessageHub per runner
    cfg.custom_hooks = [dict(type='AdversarialEvalHook', attacks=attacks)]
    return cfg


def test_misspelt_argument_fails_at_runner_build(tmp_path):
    good = Runner.from_cfg(toy_runner_cfg(tmp_path / 'good', [dict(type='FGSM', eps=8)]))
    assert any(isinstance(h, AdversarialEvalHook) for h in good.hooks)

    cfg = toy_runner_cfg(tmp_path / 'bad', [dict(type='FGSM', epsilon=8)])
    with pytest.raises(ValueError, match=r"attacks\[0\] \(FGSM\): unknown argument 'epsilon'"):
        Runner.from_cfg(cfg)  # not a training iteration, not a checkpoint
    assert not list((tmp_path / 'bad' / 'work').glob('**/*.pth'))


def test_adv_test_rejects_non_finite_sizes(tmp_path):
    cases = [['--eps', 'nan'], ['--eps', '0', '8', 'inf'], ['--pgd-alpha', 'nan']]
    procs = [start([sys.executable, 'tools/adv_test.py', ROOT / 'configs/cls/resnet9_digits_bn.py',
                    tmp_path / 'none.pth', *args, '--work-dir', tmp_path / f'work{i}'])
             for i, args in enumerate(cases)]  # concurrently: each spends its time importing
    for args, proc in zip(cases, procs):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, args
        flag, value = args[0], args[-1]
        assert f'error: {flag} must be finite numbers >= 0' in err and value in err, err
        assert 'Traceback' not in err
