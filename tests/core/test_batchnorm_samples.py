"""PyTorch's own BatchNorm module samples (torch.testing._internal.common_modules:
BatchNorm1d/2d/3d, zero batch included) against robustbn's layers with estimator='none':
outputs, input and parameter gradients, running statistics and the batch count, in
training and eval mode. Run as a script (Triton's interpreter, fast path forced on) by the
last test, so the fast path is held to the same samples."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import robustbn

_frozen = torch.backends.flags_frozen()
common_modules = pytest.importorskip('torch.testing._internal.common_modules')
if not _frozen:
    # Importing torch's internal test utilities freezes the cuDNN flags for the whole
    # process (common_utils calls torch.backends.disable_global_flags()); runners of other
    # test modules in this pytest process set them (mmengine's env setup): undo it.
    torch.backends.flags_frozen.__globals__['__allow_nonbracketed_mutation_flag'] = True
    assert not torch.backends.flags_frozen()

# The kernels take the EMA factor as a float argument, which Triton's interpreter rounds to
# float32 (fast_path_cases.py's F64 buffer tolerance); the reference path is exact.
FAST = robustbn.fast.get_fast_path() == 'on'
BUFFER_TOL = 1e-7 if FAST else 1e-12
OURS = {nn.BatchNorm1d: (robustbn.JSBN1d, robustbn.SyncJSBN),
        nn.BatchNorm2d: (robustbn.JSBN2d, robustbn.SyncJSBN),
        nn.BatchNorm3d: (robustbn.JSBN3d, robustbn.SyncJSBN)}


def samples():
    """(id, torch class, our class, constructor args/kwargs, forward input, training)."""
    out = []
    for info in common_modules.module_db:
        if info.module_cls not in OURS:
            continue
        for training in (True, False):
            inputs = info.module_inputs_func(info, device='cpu', dtype=torch.float64,
                                              requires_grad=True, training=training)
            for k, sample in enumerate(inputs):
                for ours in OURS[info.module_cls]:
                    name = (f'{info.module_cls.__name__}-{ours.__name__}-'
                            f'{sample.desc or k}-{"train" if training else "eval"}')
                    out.append((name, info.module_cls, ours, sample.constructor_input,
                                sample.forward_input.args[0], training))
    return out


def check(torch_cls, ours_cls, ctor, x, training):
    ref = torch_cls(*ctor.args, **ctor.kwargs).double()
    ours = ours_cls(*ctor.args, **ctor.kwargs, estimator='none').double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial parameters and statistics, the same in both
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
    ours.load_state_dict(ref.state_dict())
    ref.train(training)
    ours.train(training)
    grad = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    for _ in range(2):  # the second step sees the first one's running statistics
        xs = [x.detach().clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((ref, ours), xs)]
        torch.testing.assert_close(ys[1], ys[0], rtol=1e-9, atol=1e-9)
        for y in ys:
            (y * grad).sum().backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-9, atol=1e-9)
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)
        for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=BUFFER_TOL, atol=BUFFER_TOL,
                                       msg=lambda m: f'{name}: {m}')


SAMPLES = samples()


@pytest.mark.parametrize('name,torch_cls,ours,ctor,x,training', SAMPLES,
                         ids=[s[0] for s in SAMPLES])
def test_estimator_none_equals_torch_batchnorm(name, torch_cls, ours, ctor, x, training):
    check(torch_cls, ours, ctor, x, training)


def test_samples_cover_the_zero_batch():
    assert sum('zero_batch' in s[0] for s in SAMPLES) == 12  # 3 classes x 2 layers x 2 modes


@pytest.mark.skipif(not robustbn.fast.TRITON_AVAILABLE, reason='needs triton')
def test_fast_path_on_the_same_samples_in_triton_interpreter():
    env = dict(os.environ, ROBUSTBN_FAST='on', TRITON_INTERPRET='1')
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                         timeout=1200)
    assert out.returncode == 0 and out.stdout.strip().endswith(f'{len(SAMPLES)} ok'), \
        out.stdout[-2000:] + out.stderr[-3000:]


if __name__ == '__main__':
    assert FAST and robustbn.fast.INTERPRETING
    for sample in SAMPLES:
        check(*sample[1:])
    print(f'{len(SAMPLES)} ok')
