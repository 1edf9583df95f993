"""The fast path (robustbn.fast) on CPU: dispatch and its switch, the closed-form estimator
VJPs against autograd, the Triton kernels run in Triton's interpreter (a subprocess with
TRITON_INTERPRET=1, cases in fast_path_cases.py) against the reference path, and the same
kernels compiled for sm_90 without a GPU (fast_path_compile.py, a second subprocess run
alongside)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import fast_path_cases
import fast_path_compile
import pytest
import torch
from helpers import ROOT, AtenOps, load_tool

import robustbn
from robustbn import JSBN2d, fast, lean
from robustbn import estimators as E

ESTIMATORS = sorted(robustbn.ESTIMATORS)
PAPER = robustbn.ESTIMATORS['paper']
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- dispatch
def _forbid_fast(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError('the fast path ran')
    monkeypatch.setattr(fast, 'shrunk_batch_norm_fast', boom)


def _train_step(layer, x):
    x = x.clone().requires_grad_()
    layer(x).square().sum().backward()
    return x.grad


@pytest.mark.parametrize('mode', ['auto', 'off'])
def test_cpu_and_off_use_the_reference_path(monkeypatch, mode):
    _forbid_fast(monkeypatch)
    x = torch.randn(4, 6, 3, 3)
    with fast.fast_path(mode):
        assert fast.fast_path_estimator(x, PAPER, 1) is None
        grad = _train_step(JSBN2d(6), x)
    assert torch.isfinite(grad).all()


def test_off_switch_overrides_everything(monkeypatch):
    monkeypatch.setattr(fast, 'INTERPRETING', True)
    x = torch.randn(4, 6, 3, 3)
    with fast.fast_path('on'):
        assert fast.fast_path_estimator(x, PAPER, 1) == 'paper'
    with fast.fast_path('off'):
        assert fast.fast_path_estimator(x, PAPER, 1) is None


def test_forced_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(fast, 'INTERPRETING', False)
    with fast.fast_path('on'), pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        JSBN2d(6)(torch.randn(4, 6, 3, 3))


def test_missing_triton_falls_back_in_auto_and_errors_when_forced(monkeypatch):
    monkeypatch.setattr(fast, 'TRITON_AVAILABLE', False)
    monkeypatch.setattr(fast, 'INTERPRETING', True)
    x = torch.randn(4, 6, 3, 3)
    with fast.fast_path('auto'):
        assert fast.fast_path_estimator(x, PAPER, 1) is None
    with fast.fast_path('on'), pytest.raises(RuntimeError, match='triton is not installed'):
        fast.fast_path_estimator(x, PAPER, 1)


def test_calls_the_kernels_cannot_take_use_the_reference(monkeypatch):
    monkeypatch.setattr(fast, 'INTERPRETING', True)
    _forbid_fast(monkeypatch)
    x = torch.randn(4, 6, 3, 3)

    def custom(m, v, n):
        return 0.5 * m, v

    with fast.fast_path('on'):
        assert fast.fast_path_estimator(x, custom, 1) is None
        assert fast.fast_path_estimator(x, PAPER, 3) is None  # more than 2 updates
        assert fast.fast_path_estimator(x.long(), PAPER, 1) is None
        wide = torch.empty(2, fast.MAX_CHANNELS + 1, device='meta')
        assert fast.fast_path_estimator(wide, PAPER, 1) is None
        y = robustbn.shrunk_batch_norm(x, None, None, None, None, custom)  # reference path
    assert torch.isfinite(y).all()


def test_builtin_names():
    for name, spec in robustbn.ESTIMATORS.items():
        assert fast.builtin_name(spec) == name
    assert fast.builtin_name(E.paper) is None  # the bare function: no declaration
    assert fast.builtin_name(lambda m, v, n: (m, v)) is None


def test_switch_and_environment_variable(monkeypatch):
    monkeypatch.delenv('ROBUSTBN_FAST', raising=False)
    assert fast._mode_from_env() == 'off'  # the documented default
    for value, mode in (('0', 'off'), ('1', 'on'), ('auto', 'auto'), (' ON ', 'on'),
                        ('off', 'off')):
        monkeypatch.setenv('ROBUSTBN_FAST', value)
        assert fast._mode_from_env() == mode
    monkeypatch.setenv('ROBUSTBN_FAST', 'fast')
    with pytest.raises(ValueError, match='ROBUSTBN_FAST'):
        fast._mode_from_env()
    with pytest.raises(ValueError, match='mode'):
        fast.set_fast_path('yes')
    before = fast.get_fast_path()
    with fast.fast_path('off'):
        assert fast.get_fast_path() == 'off'
    assert fast.get_fast_path() == before


@pytest.mark.parametrize('name,fwd,bwd', [('paper', 20, 50), ('classic', 30, 80),
                                          ('none', 5, 10)])
def test_reference_path_dispatches_many_ops(name, fwd, bwd):
    """What the fast path's 3 + 3 kernels replace on a GPU, where the per-layer scalars stay
    on the device (docs/benchmarks.md); on CPU the lean path's counts are in test_lean.py."""
    x = torch.randn(2, 18, 4, 8, requires_grad=True)
    w, b = torch.rand(18, requires_grad=True), torch.rand(18, requires_grad=True)
    with fast.fast_path('off'), lean.lean_path(False):
        with AtenOps() as f:
            y = robustbn.shrunk_batch_norm(x, w, b, torch.zeros(18), torch.ones(18),
                                           robustbn.ESTIMATORS[name], 1e-5, 0.1)
        with AtenOps() as bw:
            torch.autograd.grad(y, (x, w, b), torch.randn(x.shape))
    assert f.count >= fwd and bw.count >= bwd, (f.count, bw.count)


# ----------------------------------------------------------------------------- VJPs
VJP_CASES = ['random', 'zero_means', 'constant_means', 'constant_variances', 'zero_variance',
             'count_tensor', 'count_two']


def _vjp_inputs(case, c):
    g = torch.Generator().manual_seed(c)
    kw = dict(generator=g, dtype=torch.float64)
    m = 0.3 * torch.randn(c, **kw) + 0.2
    v = torch.rand(c, **kw) + 0.1
    n = 20.0
    if case == 'zero_means':
        m.zero_()
    elif case == 'constant_means':
        m.fill_(0.3)
    elif case == 'constant_variances':
        v.fill_(0.7)
    elif case == 'zero_variance':
        v[0] = 0.0
    elif case == 'count_tensor':
        n = torch.tensor(7.0, dtype=torch.float64)
    elif case == 'count_two':  # classic: tau2 and 2/(N-1) large, positive part clamps
        n = 2.0
    return m, v, n, torch.randn(c, **kw), torch.randn(c, **kw)


def _autograd_vjp(est, m, v, n, d_mu, d_var):
    m_, v_ = m.clone().requires_grad_(), v.clone().requires_grad_()
    mu, var = est(m_, v_, n)
    dm, dv = torch.autograd.grad((mu, var), (m_, v_), (d_mu, d_var), allow_unused=True)
    return (torch.zeros_like(m) if dm is None else dm), (torch.zeros_like(v) if dv is None else dv)


def test_every_builtin_estimator_has_a_vjp_and_a_kernel_code():
    specs = list(robustbn.ESTIMATORS.values())
    assert all(s.vjp is not None and s.fast_code is not None for s in specs)
    assert len({s.fast_code for s in specs}) == len(specs)


@pytest.mark.parametrize('case', VJP_CASES)
@pytest.mark.parametrize('c', [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize('name', ESTIMATORS)
def test_closed_form_vjp_equals_autograd(name, c, case):
    m, v, n, d_mu, d_var = _vjp_inputs(case, c)
    want = _autograd_vjp(robustbn.ESTIMATORS[name], m, v, n, d_mu, d_var)
    got = robustbn.ESTIMATORS[name].backward(m, v, n, d_mu, d_var)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_classic_positive_part_is_active_in_the_vjp_cases():
    # count_two must exercise the clamp of classic (factor 0), else that branch is untested
    m, v, n, _, _ = _vjp_inputs('count_two', 16)
    mu, _ = E.classic(m, v, n)
    torch.testing.assert_close(mu, m.mean().expand(16))


# ----------------------------------------------------------------------------- kernels
def _start(script, **env):
    env = dict(os.environ, **env)
    env.pop('ROBUSTBN_FAST', None)
    return subprocess.Popen([sys.executable, str(TESTS / script)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope='module', autouse=True)
def kernel_checks():
    """Both scripts start with the module (their work overlaps the in-process tests) and
    are waited for by the tests that need their results."""
    if importlib.util.find_spec('triton') is None:
        yield None
        return
    procs = {'interpreter': _start('fast_path_cases.py', TRITON_INTERPRET='1'),
             'compile': _start('fast_path_compile.py', TRITON_INTERPRET='0')}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope='module')
def subprocess_results(kernel_checks):
    if kernel_checks is None:
        pytest.skip('triton is not installed')
    results = {}
    for key, proc in kernel_checks.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        results[key] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize('name', list(fast_path_cases.CASES))
def test_kernels_in_interpreter_match_reference(subprocess_results, name):
    assert subprocess_results['interpreter'][name] is None, \
        subprocess_results['interpreter'][name]


@pytest.mark.parametrize('name', [v[0] for v in fast_path_compile.VARIANTS])
def test_kernels_compile_for_sm90_without_spills(subprocess_results, name):
    assert subprocess_results['compile'][name] is None, subprocess_results['compile'][name]


# ----------------------------------------------------------------------------- benchmarks
# tools/benchmark_train.py builds its models with OpenMMLab: tests/openmmlab/test_benchmarks.py
def test_benchmark_norm_cpu_smoke(capsys):
    rows = load_tool('benchmark_norm').main(
        ['--device', 'cpu', '--shapes', '2,6,4,4', '--dtypes', 'fp32', 'bf16', '--iters', '1',
         '--warmup', '1', '--repeats', '1'])
    out = capsys.readouterr().out
    # CPU: the reference layers only (the fast path and NCCL are CUDA), with host (lean)
    # and device scalars, and the fixed-cost row (estimator 'none')
    layers = {'bn', 'jsbn_ref', 'jsbn_dev', 'jsbn_none', 'gprebn_ref', 'gprebn_dev'}
    assert {r['layer'] for r in rows} == layers
    assert len(rows) == len(layers) * 2 * 2 and all(r['wall_ms'] > 0 for r in rows)
    assert '| 2,6,4,4 | bf16 | cl | JSBN2d reference |' in out and 'triton' in out
    assert '| 2,6,4,4 | fp32 | nchw | GpreBN2d reference, device scalars |' in out
    assert "| 2,6,4,4 | fp32 | cl | JSBN2d reference, estimator 'none' |" in out

