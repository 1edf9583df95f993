"""tools/analyze_estimators.py: simulation against textbook results, model mode on the
digits ResNet9 (untrained weights, a few test images), outputs and errors."""
import json
import math

import pytest
import torch
from helpers import ROOT, load_tool

ae = load_tool('analyze_estimators')
CONFIG = str(ROOT / 'configs' / 'cls' / 'resnet9_digits_syncjsbn.py')
ESTS = ae.builtin_estimators()
MEAN, VAR, LOGVAR = (ae.METRICS.index(m) for m in ('mean', 'var', 'logvar'))


def _cell(spread, draws=2000, channels=64, count=8, seed=0):
    return ae.simulate_cell(channels, count, draws, 'gaussian', 0.0, spread, 0.0, 0.0, 0.5,
                            seed, ESTS, 'cpu')


@pytest.mark.parametrize('spread', [0.5, 3.0])
def test_classic_mean_mse_not_above_sample_mean_gaussian(spread):
    """Efron-Morris (positive part, C = 64 >= 4): risk of the means <= the sample mean's."""
    cell = _cell(spread)
    err = cell['err']
    s = ae.ratio_summary(err[:, None], ESTS, 1000, torch.Generator().manual_seed(0))
    k = ESTS.index('classic')
    assert float(s['agg'][k, MEAN]) < 1
    assert float(s['ci_agg'][1][k, MEAN]) <= 1  # the bound is clear, not just the point
    # the paired per-draw difference is negative on average by several standard errors
    diff = err[k, MEAN] - err[ESTS.index('none'), MEAN]
    assert diff.mean() < -3 * diff.std() / math.sqrt(diff.numel())


def test_sample_estimator_mse_matches_closed_form():
    """Gaussian channels, N values: E (m - mu)^2 = s^2/N, E (v - s^2)^2 = s^4 (2N-1)/N^2
    (biased v), E (log v - log s^2)^2 = trigamma(k) + (digamma(k) + log(2/N))^2, k = (N-1)/2.
    """
    n = 8
    cell = _cell(1.0, draws=4000, count=n)
    err = cell['err'][ESTS.index('none')]
    var = cell['var']
    k = torch.tensor((n - 1) / 2, dtype=torch.float64)
    expected = {MEAN: var.mean() / n, VAR: (var.square() * (2 * n - 1) / n ** 2).mean(),
                LOGVAR: torch.polygamma(1, k) + (torch.digamma(k) + math.log(2 / n)) ** 2}
    for metric, value in expected.items():
        e = err[metric]
        se = e.std() / math.sqrt(e.numel())
        assert abs(e.mean() - value) < 4 * se, (ae.METRICS[metric], e.mean(), value)


def test_merge_moments_equal_torch():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 5, 3, 2, generator=gen, dtype=torch.float64) * 3 + 1
             for n in (1, 4, 7)]
    moms = [ae.image_moments(p) for p in parts]
    count, mean, m2 = (torch.cat(x) for x in zip(*moms))
    n, mu, s = ae.merge_moments(count, mean, m2)
    x = torch.cat(parts).transpose(0, 1).reshape(5, -1)
    assert float(n) == x.shape[1]
    torch.testing.assert_close(mu, x.mean(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(s / n, x.var(1, unbiased=False), rtol=0, atol=1e-12)


def test_simulation_outputs_deterministic(tmp_path):
    args = ['--simulate', '--channels', '4', '16', '--counts', '4', '--draws', '20',
            '--noises', 'gaussian', 'student_t3', '--adv-fractions', '0', '0.25',
            '--bootstrap', '50', '--no-progress', '--device', 'cpu']
    a = ae.main(args + ['--out-dir', str(tmp_path / 'a')])
    b = ae.main(args + ['--out-dir', str(tmp_path / 'b')])
    for key in ('environment', 'seconds', 'files', 'command'):
        a.pop(key), b.pop(key)
    assert a == b
    for name in ('results.json', 'results.md', 'simulation.png'):
        assert (tmp_path / 'a' / name).stat().st_size > 0
    assert len(a['scenarios']) == 2 * 2 * 2 * 2  # noises x adv x offsets x spreads


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """The digits ResNet9 (SyncJSBN) with its initial weights."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    import robustbn  # noqa: F401
    init_default_scope('mmengine')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(CONFIG).model)
    path = tmp_path_factory.mktemp('ckpt') / 'init.pth'
    torch.save(dict(state_dict=model.state_dict()), path)
    return str(path)


def test_population_statistics_equal_torch(checkpoint):
    """The merged per-image moments equal torch's mean/var of the whole set's layer
    inputs (float64), for clean and attacked images."""
    cfg, model = ae.load_model(CONFIG, checkpoint, torch.device('cpu'))
    batches = ae.load_batches(cfg, 24)
    assert sum(len(b['data_samples']) for b in batches) == 24
    for cond in ('clean', 'cauchy'):
        attack = ae.condition_attack(cond, ae.build_parser().parse_args([]))
        pop = ae.population(ae.capture(model, batches, attack, seed=0))
        # the same inputs, kept whole by separate hooks
        kept = {n: [] for n in pop}
        handles = [m.register_forward_pre_hook(
            lambda mod, args, n=n: kept[n].append(args[0].detach().double()))
            for n, m in ae.bn_layers(model).items()]
        try:
            ae.capture(model, batches, attack, seed=0)
        finally:
            for h in handles:
                h.remove()
        assert set(pop) == set(kept) and len(pop) == 12
        for name, (n, mu, var) in pop.items():
            x = torch.cat(kept[name]).transpose(0, 1).reshape(mu.numel(), -1)
            assert float(n) == x.shape[1]
            torch.testing.assert_close(mu, x.mean(1), rtol=0, atol=1e-12)
            torch.testing.assert_close(var, x.var(1, unbiased=False), rtol=0, atol=1e-12)


def test_model_mode_outputs_and_none_ratio(checkpoint, tmp_path):
    out = tmp_path / 'out'
    res = ae.main([CONFIG, checkpoint, '--max-samples', '24', '--batch-sizes', '2', '8',
                   '--draws', '6', '--conditions', 'clean', 'gaussian', 'fgsm',
                   '--bootstrap', '50', '--out-dir', str(out), '--plot',
                   str(tmp_path / 'plot.png'), '--no-progress', '--device', 'cpu'])
    for path in (out / 'results.json', out / 'results.md', tmp_path / 'plot.png'):
        assert path.stat().st_size > 0
    saved = json.loads((out / 'results.json').read_text())
    assert saved['conditions'].keys() == {'clean', 'gaussian', 'fgsm'}
    for cond in saved['conditions'].values():
        assert cond.keys() == {'2', '8'}
        for row in cond.values():
            none = row['none']
            assert all(v == 1.0 for v in none['ratio'].values())
            assert all(v == [1.0, 1.0] for v in none['ci'].values())
            for layer in none['layers'].values():
                assert all(v == 1.0 for v in layer['ratio'].values())
            for est in ESTS:
                assert all(math.isfinite(v) and v > 0 for v in row[est]['ratio'].values())
    assert res['images'] == 24 and len(res['layers']) == 12
    assert '| clean | 2 |' in (out / 'results.md').read_text()


@pytest.mark.parametrize('args, message', [
    (['missing.py', 'x.pth'], "config 'missing.py' does not exist"),
    (['NOMODEL', 'x.pth'], 'needs a model and a test_dataloader'),
    (['SYNTAX', 'x.pth'], 'cannot load config'),
    ([CONFIG, 'missing.pth'], "checkpoint 'missing.pth' does not exist"),
    ([CONFIG, 'CKPT', '--batch-sizes', '1', '4'], 'batch sizes must be integers from 2'),
    ([CONFIG, 'CKPT', '--batch-sizes', '64'], 'batch sizes must be integers from 2'),
    ([CONFIG, 'BAD', '--batch-sizes', '2'], 'cannot load checkpoint'),
    ([CONFIG, 'CKPT', '--truth', 'clean', '--conditions', 'fgsm'],
     '--truth clean needs the clean condition'),
    (['--simulate', '--counts', '1'], '--counts >= 2'),
    ([], 'give CONFIG and CHECKPOINT, or --simulate'),
])
def test_errors_are_clear(args, message, checkpoint, tmp_path, capsys):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    (tmp_path / 'nomodel.py').write_text('x = 1\n')
    (tmp_path / 'syntax.py').write_text('x = (\n')
    places = {'CKPT': checkpoint, 'BAD': str(bad), 'NOMODEL': str(tmp_path / 'nomodel.py'),
              'SYNTAX': str(tmp_path / 'syntax.py')}
    args = [places.get(a, a) for a in args]
    with pytest.raises(SystemExit) as exc:
        ae.main(args + ['--max-samples', '8', '--no-progress', '--device', 'cpu',
                        '--out-dir', str(tmp_path / 'out')])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_segmentation_config(tmp_path, cityscapes):
    """An mmseg HRNet-W18 (SyncJSBN) config: layer inputs captured, FGSM crafted."""
    from helpers import SEG_CHILD
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    import robustbn  # noqa: F401
    base = ROOT / 'configs' / 'seg' / 'fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn.py'
    cfg_path = tmp_path / 'hr18_small.py'
    cfg_path.write_text(SEG_CHILD.format(base=base, data=cityscapes))
    cfg = Config.fromfile(str(cfg_path))
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    torch.manual_seed(0)
    ckpt = tmp_path / 'init.pth'
    torch.save(dict(state_dict=MODELS.build(cfg.model).state_dict()), ckpt)
    res = ae.main([str(cfg_path), str(ckpt), '--batch-sizes', '2', '--draws', '3',
                   '--conditions', 'clean', 'fgsm', '--bootstrap', '20', '--no-progress',
                   '--device', 'cpu', '--out-dir', str(tmp_path / 'out')])
    assert res['images'] == 2 and len(res['layers']) > 100
    for cond in ('clean', 'fgsm'):
        row = res['conditions'][cond]['2']
        assert all(v == 1.0 for v in row['none']['ratio'].values())
        # B = all the images: the sample statistics are exact, a shrunk estimate is not
        assert all(not math.isnan(v) for e in ESTS for v in row[e]['ratio'].values())
