"""tools/benchmark_robustness.py: the (variant x seed) matrix trains through tools/train.py,
every checkpoint is evaluated (clean, FGSM, PGD, noise, corruptions) and aggregated; re-runs
keep finished work; the statistics on known numbers; the Slurm and torchrun command lines
(--dry-run); --collect; bad input fails before any training.

The end-to-end run is the digits ResNet9 with 64 training images (2 iterations) and 32
test images, 2 variants x 2 seeds, 2 runs at once.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip('mmcv._ext', reason='the models build on mmseg.models (compiled mmcv)')
pytest.importorskip('torchattacks')

from helpers import ROOT, load_tool, run, tool_env, write_toy_cfg  # noqa: E402
from mmengine import Config  # noqa: E402

TOOL = ROOT / 'tools' / 'benchmark_robustness.py'
BASE = ROOT / 'configs' / 'cls' / 'resnet9_digits_bn.py'
SMALL = ['--epochs', '1', '--max-samples', '32', '--eps', '8', '--pgd-steps', '2',
         '--sigmas', '25', '--eval', 'clean', 'fgsm', 'pgd', 'cauchy', 'corruptions',
         '--corruptions', 'gaussian_noise', '--severities', '1', '2',
         '--cfg-options', 'train_dataloader.dataset.indices=64', 'train_dataloader.batch_size=32',
         'test_dataloader.batch_size=16']
VARIANTS = ('BN', 'classic')


@pytest.fixture(scope='module')
def tool():
    return load_tool('benchmark_robustness')


def bench(work, *args):
    return run([sys.executable, TOOL, BASE, '--variants', *VARIANTS, '--work-dir', work,
                '--jobs', '2', '--threads', '1', *SMALL, *args], tool_env())


def states(out: str) -> dict:
    """{(variant, seed): [states in order]} from the tool's per-run lines."""
    found = {}
    for m in re.finditer(r'^\s*(\S+) seed (\d+)\s+(.+?)(?: [\d.]+ s)?$', out, re.M):
        found.setdefault((m[1], int(m[2])), []).append(m[3])
    return found


def mtimes(work) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(work.glob('runs/*/seed*/*.pth'))}


def report_rows(text: str, title: str) -> dict:
    """{variant: [cells]} of the first table after the heading containing ``title``."""
    block = text.split(title, 1)[1].split('\n\n')[1]
    return {r.split('|')[1].strip(): [c.strip() for c in r.split('|')[2:-1]]
            for r in block.splitlines()[2:]}


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope='module')
def matrix(tmp_path_factory):
    work = tmp_path_factory.mktemp('bench')
    return work, bench(work, '--seeds', '0', '1')


def test_every_run_trains_is_evaluated_and_aggregated(matrix):
    work, out = matrix
    got = states(out)
    assert set(got) == {(v, s) for v in VARIANTS for s in (0, 1)}
    for seq in got.values():
        assert seq == ['training', 'trained', 'evaluating', 'evaluated']
    table = json.loads((work / 'results.json').read_text())
    assert table['metric'] == 'accuracy/top1' and table['reference'] == 'BN'
    keys = {'clean', 'FGSM_eps8', 'PGD-2_eps8', 'CauchyNoise_sigma25',
            'error/gaussian_noise_s1', 'error/gaussian_noise_s2', 'error/gaussian_noise',
            'error/mean'}
    assert set(table['summary']) == keys
    # the variants' configs switch the norm layers and nothing else
    for variant, norm in (('BN', dict(type='BN', requires_grad=True)),
                          ('classic', dict(type='SyncJSBN', requires_grad=True,
                                           estimator='classic'))):
        cfg = Config.fromfile(table['variants'][variant]['config'])
        assert cfg.model.backbone.norm_cfg == norm
    for png in ('accuracy_vs_eps.png', 'corruption_error.png'):
        assert (work / png).read_bytes()[:4] == b'\x89PNG'


def test_report_numbers_equal_the_runs_json(matrix):
    work, _ = matrix
    report = (work / 'report.md').read_text()
    table = json.loads((work / 'results.json').read_text())
    rows = report_rows(report, '## Accuracy: clean and adversarial')
    for variant in VARIANTS:
        per_seed = [json.loads((work / 'runs' / variant / f'seed{s}' / 'eval.json').read_text())
                    ['results'] for s in (0, 1)]
        for col, name in enumerate(('clean', 'FGSM_eps8', 'PGD-2_eps8')):
            values = [r[name]['accuracy/top1'] for r in per_seed]
            assert rows[variant][col] == f'{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}'
            stats = table['summary'][name][variant]
            assert stats['values'] == {'0': values[0], '1': values[1]}
        errors = [np.mean([100 - r[f'gaussian_noise_s{k}']['accuracy/top1'] for k in (1, 2)])
                  for r in per_seed]
        assert table['summary']['error/gaussian_noise'][variant]['mean'] == \
            pytest.approx(np.mean(errors))
    diff = table['summary']['clean']['classic']['diff']
    runs = table['runs']
    d = [runs['classic'][s]['clean'] - runs['BN'][s]['clean'] for s in ('0', '1')]
    assert diff['mean'] == pytest.approx(np.mean(d))
    assert diff['wins'] + diff['losses'] + diff['ties'] == 2


def test_rerun_keeps_finished_work_and_redoes_a_deleted_run(matrix):
    work, _ = matrix
    before = mtimes(work)
    got = states(bench(work, '--seeds', '0', '1'))
    assert all(seq == ['trained (kept)', 'evaluated (kept)'] for seq in got.values()), got
    assert mtimes(work) == before

    shutil.rmtree(work / 'runs' / 'classic' / 'seed1')
    got = states(bench(work, '--seeds', '0', '1'))
    assert got.pop(('classic', 1)) == ['training', 'trained', 'evaluating', 'evaluated']
    assert all(seq == ['trained (kept)', 'evaluated (kept)'] for seq in got.values()), got
    def others(times):
        return {p: t for p, t in times.items() if 'classic/seed1' not in str(p)}
    assert others(mtimes(work)) == others(before)


def test_collect_evaluates_and_aggregates_what_exists(matrix):
    work, _ = matrix
    (work / 'runs' / 'BN' / 'seed0' / 'eval.json').unlink()
    before = mtimes(work)
    out = bench(work, '--seeds', '0', '1', '2', '--collect')
    got = states(out)
    assert got[('BN', 0)] == ['evaluating', 'evaluated']
    assert got[('BN', 2)] == got[('classic', 2)] == ['not finished']
    assert mtimes(work) == before  # nothing trained
    table = json.loads((work / 'results.json').read_text())
    assert table['missing'] == ['BN seed 2', 'classic seed 2']
    assert table['summary']['clean']['BN']['n'] == 2
    assert 'Missing runs (not in the statistics): BN seed 2, classic seed 2' in \
        (work / 'report.md').read_text()


# ----------------------------------------------------------------------------- statistics
def test_t_quantiles(tool):
    for dof, q in ((1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157)):
        assert tool.t_quantile(0.975, dof) == pytest.approx(q, abs=1e-6)


def test_aggregation_on_known_numbers(tool):
    runs = {'BN': {0: {'m': 90.0}, 1: {'m': 92.0}, 2: {'m': 94.0}},
            'js': {0: {'m': 91.0}, 1: {'m': 95.0}, 2: {'m': 94.0}}}
    s = tool.summarize(runs, 'BN')['m']
    # BN: mean 92, std 2, half width t(0.975, 2) * 2 / sqrt(3) = 4.302653 * 1.154701
    assert (s['BN']['n'], s['BN']['mean'], s['BN']['std']) == (3, 92.0, 2.0)
    assert s['BN']['ci'] == pytest.approx([92 - 4.968275, 92 + 4.968275], abs=1e-5)
    assert 'diff' not in s['BN']
    # paired differences 1, 3, 0: mean 4/3, std sqrt(7/3) = 1.527525,
    # half width 4.302653 * 1.527525 / sqrt(3) = 3.794583
    d = s['js']['diff']
    assert d['mean'] == pytest.approx(4 / 3) and d['std'] == pytest.approx(1.527525, abs=1e-6)
    assert d['ci'] == pytest.approx([4 / 3 - 3.794583, 4 / 3 + 3.794583], abs=1e-5)
    assert (d['wins'], d['losses'], d['ties'], d['seeds']) == (2, 0, 1, [0, 1, 2])
    # one seed: no spread, no interval; seeds without a partner are left out of the pairs
    s = tool.summarize({'BN': {0: {'m': 1.0}}, 'js': {0: {'m': 2.0}, 5: {'m': 9.0}}}, 'BN')['m']
    assert s['BN']['std'] is None and s['BN']['ci'] is None
    assert (s['js']['diff']['n'], s['js']['diff']['mean']) == (1, 1.0)


# ----------------------------------------------------------------------------- launchers
def dry_run(tool, capsys, tmp_path, *args):
    assert tool.main([str(BASE), '--variants', 'BN', 'paper', '--seeds', '0', '1',
                      '--work-dir', str(tmp_path), '--epochs', '2', '--dry-run', *args]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_slurm_command_lines(tool, capsys, tmp_path):
    lines = dry_run(tool, capsys, tmp_path, '--launcher', 'slurm', '--partition', 'gpu',
                    '--gpus', '16', '--gpus-per-node', '8', '--cfg-options', 'a.b=1')
    assert len(lines) == 4
    for line, (variant, seed) in zip(lines, [(v, s) for v in ('BN', 'paper') for s in (0, 1)]):
        run_dir = tmp_path / 'runs' / variant / f'seed{seed}'
        assert line == [
            'GPUS=16', 'GPUS_PER_NODE=8', 'bash', str(ROOT / 'tools' / 'slurm_train.sh'), 'gpu',
            f'rbn_{variant}_s{seed}', str(tmp_path / 'configs' / f'{variant}.py'),
            '--work-dir', str(run_dir), '--cfg-options', 'train_cfg.max_epochs=2',
            'param_scheduler.end=2', 'param_scheduler.T_max=2', 'a.b=1', f'randomness.seed={seed}']
    assert not (tmp_path / 'runs').exists()  # a dry run trains nothing
    cfg = Config.fromfile(str(tmp_path / 'configs' / 'paper.py'))
    assert cfg.model.backbone.norm_cfg == dict(type='SyncJSBN', requires_grad=True,
                                               estimator='paper')


def test_torchrun_command_lines(tool, capsys, tmp_path):
    lines = dry_run(tool, capsys, tmp_path, '--launcher', 'pytorch', '--gpus', '2',
                    '--jobs', '2', '--variant-options', 'paper',
                    'model.backbone.norm_cfg.eval_stats=batch')
    assert [line[:5] for line in lines] == [
        ['PORT=29500', 'bash', str(ROOT / 'tools' / 'dist_train.sh'),
         str(tmp_path / 'configs' / 'BN.py'), '2'],
        ['PORT=29501', 'bash', str(ROOT / 'tools' / 'dist_train.sh'),
         str(tmp_path / 'configs' / 'BN.py'), '2'],
        ['PORT=29500', 'bash', str(ROOT / 'tools' / 'dist_train.sh'),
         str(tmp_path / 'configs' / 'paper.py'), '2'],
        ['PORT=29501', 'bash', str(ROOT / 'tools' / 'dist_train.sh'),
         str(tmp_path / 'configs' / 'paper.py'), '2']]
    assert 'model.backbone.norm_cfg.eval_stats=batch' in lines[2]
    assert 'model.backbone.norm_cfg.eval_stats=batch' not in lines[0]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('args, message', [
    (['--variants', 'BN', 'papr'], "unknown variant 'papr'"),
    (['--seeds'], '--seeds is empty'),
    (['--variants', 'BN', 'BN'], "variant 'BN' given twice"),
    (['--variants', 'BN', 'paper', '--variant-options', 'wacv', 'a=1'],
     '--variant-options wacv: not among --variants'),
])
def test_bad_input_fails_before_training(tool, capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as exc:  # --dry-run: a missed error trains nothing
        tool.main([str(BASE), '--work-dir', str(tmp_path), '--dry-run', *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_config_without_norm_layers_fails_before_training(tool, capsys, tmp_path):
    cfg = write_toy_cfg(tmp_path)
    with pytest.raises(SystemExit):
        tool.main([str(cfg), '--work-dir', str(tmp_path / 'work'), '--dry-run'])
    assert 'no norm_cfg under model' in capsys.readouterr().err
    assert not (tmp_path / 'work').exists()
